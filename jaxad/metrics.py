"""Image-level anomaly-detection metrics, computed exactly on the host.

Convention everywhere: a higher score is more anomalous and label 1 is an anomaly, so the anomaly
is the positive class (docs/methods.md §1.6); scores that are higher = normal (CSI, OECL, MCL) must be
negated first. Results equal scikit-learn's to float64 rounding, ties included; scikit-learn is
the test oracle, not a dependency.
"""
import numpy as np


def _check(scores, labels):
    """Float64 scores and int labels, or a ValueError that says what is wrong."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.ndim != 1:
        raise ValueError(f'scores and labels must be 1-D, got shapes {scores.shape} and '
                         f'{labels.shape}')
    if len(scores) != len(labels):
        raise ValueError(f'scores and labels differ in length: {len(scores)} vs {len(labels)}')
    bad = int(np.sum(~np.isfinite(scores)))
    if bad:
        raise ValueError(f'scores contain {bad} NaN/inf value(s) out of {len(scores)}')
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError(f'labels must be 0 (normal) or 1 (anomaly), got {np.unique(labels)}')
    labels = labels.astype(np.int64)
    n_pos = int(labels.sum())
    if n_pos in (0, len(labels)):
        raise ValueError(f'labels are all {"anomalies" if n_pos else "normal"} '
                         f'({len(labels)} images): the metrics need both kinds')
    return scores, labels


def _average_ranks(x):
    """1-based ranks, tied values sharing the mean of their ranks (scipy's 'average')."""
    order = np.argsort(x, kind='mergesort')
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    return ranks


def _curve(scores, labels):
    """Cumulative true/false positives at each distinct threshold, highest threshold first.

    A threshold flags every image scored >= it, so a block of tied scores is flagged at once;
    that is how ties count in scikit-learn.
    """
    order = np.argsort(-scores, kind='mergesort')
    s, y = scores[order], labels[order]
    last_of_block = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tps = np.cumsum(y)[last_of_block]
    return tps, last_of_block + 1 - tps


def auroc(scores, labels):
    """Area under the ROC curve via Mann-Whitney U: exact, a tied pair counts one half."""
    scores, labels = _check(scores, labels)
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    rank_sum = _average_ranks(scores)[labels == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def aupr(scores, labels):
    """Step-wise average precision: sum of precision x recall gain (sklearn's AP, no trapezoid)."""
    scores, labels = _check(scores, labels)
    tps, fps = _curve(scores, labels)
    recall_gain = np.diff(np.r_[0, tps]) / tps[-1]
    return float(np.sum(recall_gain * tps / (tps + fps)))


def fpr_at_tpr(scores, labels, tpr=0.95):
    """False-positive rate at the highest threshold that detects at least `tpr` of the anomalies.

    Anomaly = positive: the fraction of normal images scored >= that threshold, i.e. the minimum
    FPR over thresholds with TPR >= tpr, equal to `fpr[tpr_curve >= tpr].min()` on sklearn's
    `roc_curve(labels, scores, drop_intermediate=False)`. OOD papers often take the in-distribution
    as positive instead (anomalies accepted at 95% normal recall), a different number.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f'tpr must be in (0, 1], got {tpr}')
    scores, labels = _check(scores, labels)
    tps, fps = _curve(scores, labels)
    first = np.argmax(tps / tps[-1] >= tpr)  # the TPR curve is non-decreasing and ends at 1
    return float(fps[first] / fps[-1])


def image_metrics(scores, labels):
    """The three image-level numbers reported for every score."""
    return {'image_AUROC': auroc(scores, labels),
            'image_AUPR': aupr(scores, labels),
            'FPR@95TPR': fpr_at_tpr(scores, labels, 0.95)}


def per_class_auroc(scores, labels, classes, normal_classes):
    """AUROC of all normal images against each anomalous class alone, keyed by class id.

    CSI reports these beside the pooled AUROC; with equal class sizes their mean is the pooled
    value. `classes` holds original class ids and must agree with `labels` (anomaly = a class
    outside normal_classes), which catches a mix-up of the two label arrays.
    """
    scores, labels = _check(scores, labels)
    classes = np.asarray(classes)
    if classes.shape != labels.shape:
        raise ValueError(f'classes has shape {classes.shape} but labels has {labels.shape}')
    is_anomaly = ~np.isin(classes, np.asarray(list(normal_classes)))
    wrong = int(np.sum(is_anomaly != (labels == 1)))
    if wrong:
        raise ValueError(f'{wrong} label(s) disagree with classes and '
                         f'normal_classes={list(normal_classes)}')
    normal = labels == 0
    return {int(c): auroc(scores[normal | (classes == c)], labels[normal | (classes == c)])
            for c in np.unique(classes[is_anomaly])}
