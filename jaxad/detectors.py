"""What a run trains on: its data splits and its detectors, loaded once before any model
is built (every input error surfaces here, before a compile).

A *detector* is one anomaly detector: the normal class(es) it learns, its normal training
images and its step budget. A single run has one (`data.normal_classes`); a one-class
table has one per item of `table.classes`. Both come from `load`, so single runs and
tables read, check and split their data the same way (`jaxad.train` drives both).
"""
import dataclasses

import numpy as np

from jaxad import loop, reuse, thresholds
from jaxad.config import normal_classes as parse_normal_classes
from jaxad.data import sources
from jaxad.errors import ConfigError
from jaxad.methods import StepBudget, method_class


@dataclasses.dataclass(frozen=True)
class Detector:
    """One detector: what it calls normal, the images it trains and fits its scoring state
    on, and its step budget."""
    normal_classes: tuple
    name: str
    indices: np.ndarray  # its normal training images (training and scoring bank)
    steps_per_epoch: int
    total_steps: int
    # Normal training images kept out of training and the scoring bank to calibrate the
    # decision threshold (`threshold.holdout_fraction`; jaxad.thresholds); empty otherwise.
    holdout_indices: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros((0,), np.int64))

    @property
    def budget(self):
        return StepBudget(self.steps_per_epoch, self.total_steps)


@dataclasses.dataclass(frozen=True)
class RunData:
    """The splits every detector of a run shares, and the detectors."""
    train_set: object
    test_set: object  # with `eval.ood` appended
    image_shape: tuple  # (H, W, C), checked against data.image_size / data.channels
    outlier_set: object  # the outlier-exposure data set when `oe.source` names one, else None
    detectors: list


def parse_members(spec, class_names):
    """'all' / '0,3,5' / '0+1,2' -> list of normal-class tuples, in order."""
    items = []
    for item in str(spec).split(','):
        if item == 'all':
            items.extend((c,) for c in range(len(class_names)))
        else:
            items.append(parse_normal_classes(item))
    for classes in items:
        bad = [c for c in classes if not 0 <= c < len(class_names)]
        if bad:
            raise ConfigError(f'table.classes={spec!r}: class {bad[0]} is not one of the '
                              f'{len(class_names)} classes 0..{len(class_names) - 1}')
    if len(set(items)) != len(items):
        raise ConfigError(f'table.classes={spec!r} lists a detector twice')
    return items


def load(config):
    """The run's data and its detectors: one for `data.normal_classes`, or with
    `table.classes` set one per item of it (`parse_members`).

    Each detector's normal classes must exist in both splits and its test split must hold
    anomalies; `threshold.holdout_fraction` holds a seeded part of its normal images out.
    """
    data = config.data
    train_set = sources.load_split(data, 'train')
    test_set = sources.with_ood(sources.load_split(data, 'test'), config.eval.ood)
    names = train_set.class_names
    class_lists = (parse_members(config.table.classes, names) if config.table.classes
                   else [config.data.normal_classes])
    detectors = []
    for classes in class_lists:
        classes = tuple(int(c) for c in classes)
        indices = sources.one_class_indices(train_set.labels, classes, len(names),
                                            train_set.name)
        indices, holdout = thresholds.holdout_split(
            indices, thresholds.holdout_fraction(config), config.seed)
        sources.one_class_indices(test_set.labels, classes, len(names), test_set.name)
        sources.check_has_anomalies(test_set, list(classes))
        budget = StepBudget.of(config, len(indices), f'class(es) {list(classes)}')
        if not method_class(config.method).trains:  # a fixed encoder: no step to take
            budget = StepBudget(budget.steps_per_epoch, 0)
        detectors.append(Detector(classes, '+'.join(names[c] for c in classes), indices,
                                  budget.steps_per_epoch, budget.total_steps, holdout))
    image_shape = loop.check_image_shape(train_set, data)
    loop.check_image_shape(test_set, data)
    # Whether the method needs an outlier set does not depend on the step budget.
    outlier_set = loop.load_auxiliary_outliers(reuse.method(config), config, image_shape)
    return RunData(train_set, test_set, image_shape, outlier_set, detectors)
