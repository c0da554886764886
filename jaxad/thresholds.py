"""Decision thresholds on the headline score: calibration, saving, lookup.

A threshold turns `pred_score` (higher = more anomalous) into `is_anomaly =
pred_score >= threshold`. Rules, each named in every output that uses it:

  fixed            `config.threshold.value`, set by the user (wins when set).
  normal_quantile  the `config.threshold.quantile` quantile (NumPy's default,
                   linear interpolation) of the scores of held-out *normal*
                   images: about 1 - quantile of normal images get flagged. It
                   needs no anomalies, so it never degenerates into "flag
                   everything" when validation holds none (anomalib #2433).
  f1_max           the score that maximises F1 on labelled validation images
                   (normal + anomalies); only when anomalies are given.

The held-out normal images come either from training (`threshold.holdout_fraction
> 0`: a seeded split of the normal training images kept out of training and out
of the scoring bank, calibrated on in `loop.Run.finish`) or from the user
(`--mode=calibrate --input=NORMAL [--anomalies=ANOMALOUS]`, checkpoint alone).
The result is `workdir/threshold.json` (process 0 writes it).
"""
import json

import jax
import numpy as np
from absl import logging

from jaxad import storage
from jaxad.errors import ConfigError, DataError

FILENAME = 'threshold.json'
RULES = ('fixed', 'normal_quantile', 'f1_max')
HOW_TO_GET_ONE = ('no threshold for this run, so is_anomaly is left empty: calibrate one with '
                  '`--mode=calibrate --input=NORMAL_IMAGES [--anomalies=ANOMALOUS_IMAGES]`, '
                  'train with threshold.holdout_fraction > 0, or set threshold.value')


# ------------------------------------------------------------------------ rules


def check_quantile(quantile):
    if not 0.0 < quantile < 1.0:
        raise ConfigError(f'threshold.quantile={quantile} must be between 0 and 1 (e.g. 0.95)')
    return float(quantile)


def normal_quantile(normal_scores, quantile):
    """The `quantile` of the scores of normal images (np.quantile, linear)."""
    scores = _finite_1d(normal_scores, 'normal scores')
    return float(np.quantile(scores, check_quantile(quantile)))


def f1_max(scores, labels):
    """(threshold, f1): the threshold t maximising the F1 of `scores >= t` (label 1 = anomaly).

    Candidates are the distinct scores; among equal F1 the highest threshold
    (fewest images flagged) wins.
    """
    scores = _finite_1d(scores, 'scores')
    labels = np.asarray(labels)
    if labels.shape != scores.shape or not np.all((labels == 0) | (labels == 1)):
        raise DataError(f'f1_max needs one 0/1 label per score, got labels of shape '
                        f'{labels.shape} for {scores.shape[0]} scores')
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise DataError('f1_max needs labelled anomalies and none were given; use the '
                        "'normal_quantile' rule on normal images instead")
    order = np.argsort(-scores, kind='mergesort')
    s, y = scores[order], labels[order].astype(np.int64)
    last_of_block = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tps = np.cumsum(y)[last_of_block]  # flagged anomalies at t = s[last_of_block]
    flagged = last_of_block + 1
    f1 = 2.0 * tps / (flagged + n_pos)  # 2PR/(P+R) = 2 TP / (flagged + positives)
    best = int(np.argmax(f1))  # first maximum = highest threshold
    return float(s[last_of_block[best]]), float(f1[best])


def _finite_1d(scores, what):
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1 or len(scores) == 0:
        raise DataError(f'{what}: need a non-empty 1-D array of scores, got shape {scores.shape}')
    bad = int(np.sum(~np.isfinite(scores)))
    if bad:
        raise DataError(f'{what}: {bad} of {len(scores)} scores are NaN/inf')
    return scores


def calibrate(normal_scores, quantile, anomaly_scores=None, *, score_name, step=None,
              source=''):
    """The threshold record from normal scores (and anomaly scores, for f1_max).

    With anomalies the rule is f1_max over normal + anomalous images; the
    normal quantile is recorded beside it either way.
    """
    record = {'score': score_name, 'quantile': check_quantile(quantile),
              'normal_quantile': normal_quantile(normal_scores, quantile),
              'num_normal': int(len(normal_scores)), 'step': step, 'source': source}
    if anomaly_scores is not None and len(anomaly_scores):
        scores = np.concatenate([np.asarray(normal_scores), np.asarray(anomaly_scores)])
        labels = np.r_[np.zeros(len(normal_scores)), np.ones(len(anomaly_scores))]
        value, f1 = f1_max(scores, labels)
        record.update(rule='f1_max', value=value, f1=f1, num_anomalies=int(len(anomaly_scores)))
    else:
        record.update(rule='normal_quantile', value=record['normal_quantile'], num_anomalies=0)
    record['num_images'] = record['num_normal'] + record['num_anomalies']
    return record


def fixed(value, *, score_name, step=None):
    return {'rule': 'fixed', 'value': float(value), 'score': score_name, 'step': step,
            'source': 'config threshold.value'}


# ------------------------------------------------------------- held-out split


def holdout_fraction(config):
    """config.threshold.holdout_fraction, 0 for a config without a threshold block."""
    return float(config.threshold.holdout_fraction) if 'threshold' in config else 0.0


def holdout_split(normal_indices, fraction, seed):
    """(train, holdout) index arrays: a seeded `fraction` of `normal_indices` held out.

    Both sorted; the split depends only on (indices, fraction, seed). fraction
    0 holds nothing out.
    """
    normal_indices = np.asarray(normal_indices, np.int64)
    if fraction == 0:
        return normal_indices, normal_indices[:0]
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f'threshold.holdout_fraction={fraction} must be in [0, 1)')
    n = len(normal_indices)
    n_hold = int(round(fraction * n))
    if not 0 < n_hold < n:
        raise ConfigError(f'threshold.holdout_fraction={fraction} of {n} normal training images '
                          f'holds out {n_hold}; it must leave at least one on each side')
    perm = np.random.default_rng([int(seed), 7]).permutation(n)
    return np.sort(normal_indices[perm[n_hold:]]), np.sort(normal_indices[perm[:n_hold]])


# ------------------------------------------------------------- save and load


def path_in(workdir):
    return storage.join(storage.normalize(workdir), FILENAME)


def save(workdir, record):
    """Writes `workdir/threshold.json` (process 0 only); returns its path."""
    path = path_in(workdir)
    if jax.process_index() == 0:
        storage.write_json(path, record, indent=2)
        logging.info('threshold (%s) %.6g on score %r written to %s', record['rule'],
                     record['value'], record['score'], path)
    return path


def load(workdir):
    """The saved record of `workdir`, or None."""
    path = path_in(workdir)
    if not storage.isfile(path):
        return None
    try:
        record = json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:
        raise DataError(f'cannot read threshold file {path}: {e}') from e
    if record.get('rule') not in RULES or not isinstance(record.get('value'), (int, float)):
        raise DataError(f'{path} is not a threshold record (rule one of {RULES} and a value)')
    return record


def resolve(config, workdir, score_name, step=None):
    """The threshold in force: config threshold.value (rule 'fixed'), else the saved one, else None."""
    value = config.threshold.value if 'threshold' in config else None
    if value is not None:
        return fixed(value, score_name=score_name, step=step)
    record = load(workdir)
    if record is not None and step is not None and record.get('step') not in (None, step):
        logging.warning('threshold in %s was calibrated at step %s but the checkpoint is step %d; '
                        'recalibrate with --mode=calibrate', path_in(workdir), record['step'], step)
    return record


def apply(record, scores):
    """is_anomaly (bool array) for `scores` of the record's score, or None without a record."""
    if record is None:
        return None
    return np.asarray(scores) >= record['value']
