"""Single runs: `train_and_evaluate(config, workdir)` (the public entry; a config with
`table.classes` is handed to `jaxad.table`) and `evaluate_checkpoint`.

Order of work: validate the config, load and check the data (every input
error surfaces here, before any compile), build mesh/model/optimizer, resume
from the latest checkpoint if there is one, train (`jaxad.loop.Run.train`, the loop
tables use too), then fit the scoring state on the normal training images, save it with
the final checkpoint and evaluate on the test split.
"""
import functools
import time

import jax
from absl import logging

from jaxad import evaluate as eval_lib
from jaxad import fingerprint, predict, preemption, sharding, table, thresholds
from jaxad.config import validate_config
from jaxad.data import sources
from jaxad.errors import TrainingError
from jaxad.lease import holds_workdir
from jaxad.methods import StepBudget
from jaxad.loop import (Run, check_image_shape, init_key, jit_train_step,
                        load_auxiliary_outliers, make_init_fn, start_record, train_batches)
from jaxad.writers import Progress


def init_consts(method, state, train_set, indices, config, mesh):
    """`state` with the method's constants computed from its *initial* model on the normal
    training images (MSC: the centre of the pretrained features, §3.1); unchanged for
    methods without constants. Called once, before step 1, never on resume."""
    if not method.uses_consts:
        return state
    logging.info('computing the method constants from the initial model on %d images',
                 len(indices))
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    feats = eval_lib.extract_features(method, variables, train_set, indices,
                                      batch_size=config.eval.batch_size, mesh=mesh,
                                      key=eval_lib.eval_bank_key(config.seed),
                                      label='initial features')
    consts = jax.device_put(jax.jit(method.fit_consts)(feats), sharding.replicated(mesh))
    return state.replace(consts=consts)


class Setup(Run):
    """A single detector's run (checkpoints, metrics.jsonl and results in WORKDIR): its data,
    and everything `loop.Run` needs of it."""

    def __init__(self, config, workdir):
        validate_config(config)
        self.workdir = workdir
        data = config.data
        self.train_set = sources.load_split(data, 'train')
        self.test_set = sources.with_ood(sources.load_split(data, 'test'), config.eval.ood)
        self.normal_classes = [int(c) for c in data.normal_classes]
        num_classes = len(self.train_set.class_names)
        self.normal_indices = sources.one_class_indices(
            self.train_set.labels, self.normal_classes, num_classes, self.train_set.name)
        # threshold.holdout_fraction > 0: kept out of training and the scoring bank,
        # calibrates the decision threshold in `finish` (jaxad.thresholds).
        self.normal_indices, self.holdout_indices = thresholds.holdout_split(
            self.normal_indices, thresholds.holdout_fraction(config), config.seed)
        sources.one_class_indices(self.test_set.labels, self.normal_classes, num_classes,
                                  self.test_set.name)
        sources.check_has_anomalies(self.test_set, self.normal_classes)
        image_shape = check_image_shape(self.train_set, data)
        check_image_shape(self.test_set, data)
        mesh = sharding.make_mesh(config.num_devices)
        budget = StepBudget.of(config, len(self.normal_indices),
                               f'class(es) {self.normal_classes}')
        self._build(config, workdir, budget, mesh, image_shape, 'training')
        self.outlier_set = load_auxiliary_outliers(self.method, config, image_shape)

    @functools.cached_property
    def state_sharding(self):
        return sharding.replicated(self.mesh)

    @functools.cached_property
    def rng(self):
        return jax.random.key(self.config.seed)

    def init_fn(self):
        return make_init_fn(self.method, self.tx, self.image_shape)

    def init_keys(self):
        return init_key(self.config.seed)

    def jit_step(self, train_step):
        return jit_train_step(train_step, self.mesh)

    def batches(self, start_step):
        host = train_batches(self.method, self.config, self.train_set, self.normal_indices,
                             self.normal_classes, self.outlier_set, start_step)
        return (sharding.to_global(b, self.mesh) for b in host)

    def fit_consts(self, state):
        return init_consts(self.method, state, self.train_set, self.normal_indices,
                           self.config, self.mesh)


def finish(setup, state, extra=None, watch=None):
    """Fits the scoring state, saves the final checkpoint, evaluates.

    watch: the run's `jaxad.preemption.Watch`, active until the final checkpoint and the
    threshold are written; a signal by then raises `Preempted` there (the rerun evaluates
    the saved run), and the evaluation itself is not watched.
    """
    config = setup.config
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    scoring = _fit_scoring(setup, state)
    step = int(state.step)
    setup.checkpoints.save(step, state, scoring=scoring)
    setup.checkpoints.wait()
    # config.json and the scoring settings now describe the saved scoring state.
    fingerprint.write_run_record(config, setup.workdir)
    fingerprint.write_scoring_settings(config, setup.workdir)
    threshold = predict.calibrate_after_training(
        config, setup.method, setup.workdir, variables, scoring, step,
        train_images=setup.train_set.images, holdout_indices=setup.holdout_indices)
    if watch is not None:
        if watch.reached():
            raise watch.preempted(step, setup.total_steps, setup.checkpoints.directory,
                                  final=True)
        watch.disarm()  # evaluation: the signals act as without jaxad again
    extra = dict(extra or {}, **({'threshold': threshold} if threshold else {}))
    return eval_lib.evaluate(setup.method, variables, scoring, setup.test_set,
                             setup.normal_classes, config=config, mesh=setup.mesh,
                             workdir=setup.workdir, extra=dict(step=step, **extra))


@holds_workdir
def train_and_evaluate(config, workdir):
    """Trains (or resumes) the configured detector and evaluates it.

    A workdir whose checkpoints another training config made is refused first
    (`jaxad.fingerprint`). Rerunning a finished run trains nothing and rescores from its
    checkpoint (refitting the scoring state when the scoring settings changed). Returns
    the results dict also written to `workdir/results.json`. With `table.classes` set
    this trains the one-class table (`jaxad.table`).
    """
    if config.table.classes:
        return table.train_table(config, workdir)
    fingerprint.check_workdir(config, workdir)  # before any data is read or compiled
    t0 = time.time()
    start_record(config, workdir)
    setup = Setup(config, workdir)
    try:
        state, start = setup.resume()
        if start >= setup.total_steps and setup.checkpoints.has_scoring(start):
            logging.info('run already finished at step %d; evaluating only', start)
            return _evaluate_finished(setup, state, start)
        # SIGTERM / SIGINT from here to the final checkpoint: stop at a step, with its
        # checkpoint (jaxad.preemption); `finish` ends the watch before evaluating.
        with preemption.Watch() as watch:
            state = setup.train(state, start, Progress(setup.total_steps, first=start),
                                watch=watch)
            return finish(setup, state, extra=dict(train_seconds=round(time.time() - t0, 2)),
                          watch=watch)
    finally:
        setup.checkpoints.close()


@holds_workdir
def evaluate_checkpoint(config, workdir):
    """`--mode=eval`: scores the test split from the latest checkpoint, no training."""
    if config.table.classes:
        return table.evaluate_table(config, workdir)
    fingerprint.check_workdir(config, workdir)
    setup = Setup(config, workdir)
    try:
        state, step = setup.restore_latest()
        if state is None:
            raise TrainingError(f'no checkpoint in {setup.checkpoints.directory}; '
                                'train first (--mode=train)')
        return _evaluate_finished(setup, state, step)
    finally:
        setup.checkpoints.close()


def _fit_scoring(setup, state):
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    return eval_lib.fit_scoring(setup.method, variables, setup.train_set, setup.normal_indices,
                                config=setup.config, mesh=setup.mesh)


def _evaluate_finished(setup, state, step):
    """Evaluates a restored state: with its saved scoring state, or, when this config's
    scoring fields differ from those it was fitted with, a scoring state refitted now
    (results.json names the changes; the saved one is kept)."""
    changes = []
    if setup.checkpoints.has_scoring(step):
        changes = fingerprint.scoring_changes(setup.config, setup.workdir, setup.workdir)
    extra = dict(step=step)
    if changes:
        logging.warning('scoring settings differ from those of the saved scoring state (%s): '
                        'refitting it on the training images; the checkpoint keeps the saved '
                        'one', '; '.join(changes))
        scoring = _fit_scoring(setup, state)
        extra.update(scoring_state='refitted', scoring_changes=changes)
    elif setup.checkpoints.has_scoring(step):
        # Damaged: the step is set aside, its scoring state refitted from `state` (exactly
        # what `finish` fitted) and the step saved again.
        scoring = setup.checkpoints.restore_or_refit_scoring(
            step, state, lambda: _fit_scoring(setup, state))
    else:
        logging.info('checkpoint step %d has no scoring state; computing it', step)
        scoring = _fit_scoring(setup, state)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    return eval_lib.evaluate(setup.method, variables, scoring, setup.test_set,
                             setup.normal_classes, config=setup.config, mesh=setup.mesh,
                             workdir=setup.workdir, extra=extra)
