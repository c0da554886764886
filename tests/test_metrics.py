"""Metrics against scikit-learn (the oracle CSI, MSC and DROC use), with and without ties."""
import numpy as np
import pytest
from sklearn import metrics as skm

from jaxad import metrics


def random_case(seed, n=300, anomaly_frac=0.3, decimals=None):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < anomaly_frac).astype(int)
    labels[:2] = [0, 1]  # both classes present
    scores = rng.normal(size=n) + labels
    if decimals is not None:
        scores = np.round(scores, decimals)  # many ties, some across the two classes
    return scores, labels


def sklearn_fpr_at_tpr(scores, labels, tpr):
    fpr, tpr_curve, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    return fpr[tpr_curve >= tpr].min()


@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('decimals', [None, 1, 0])
def test_matches_sklearn(seed, decimals):
    scores, labels = random_case(seed, n=50 + 97 * seed, anomaly_frac=0.1 + 0.15 * seed,
                                 decimals=decimals)
    if decimals is not None:
        assert len(np.unique(scores)) < len(scores)
    np.testing.assert_allclose(metrics.auroc(scores, labels), skm.roc_auc_score(labels, scores),
                               rtol=1e-12)
    np.testing.assert_allclose(metrics.aupr(scores, labels),
                               skm.average_precision_score(labels, scores), rtol=1e-12)
    for tpr in (0.95, 0.8, 0.5, 1.0):
        assert metrics.fpr_at_tpr(scores, labels, tpr) == pytest.approx(
            sklearn_fpr_at_tpr(scores, labels, tpr), abs=1e-12)


def test_fpr_at_tpr_hand_case():
    # 20 anomalies: 19 score above every normal, one ties with the top normal at 0.5.
    scores = np.r_[np.linspace(1, 2, 19), 0.5, 0.5, np.linspace(0, 0.4, 9)]
    labels = np.r_[np.ones(20), np.zeros(10)]
    assert metrics.fpr_at_tpr(scores, labels, 0.95) == 0.0  # 19/20 found before any normal
    # Catching the last anomaly flags the normal it ties with.
    assert metrics.fpr_at_tpr(scores, labels, 1.0) == pytest.approx(0.1)


def test_hand_cases():
    labels = np.array([0, 0, 0, 1, 1])
    perfect = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert metrics.image_metrics(perfect, labels) == {
        'image_AUROC': 1.0, 'image_AUPR': 1.0, 'FPR@95TPR': 0.0}
    reversed_ = -perfect
    assert metrics.auroc(reversed_, labels) == 0.0
    assert metrics.fpr_at_tpr(reversed_, labels) == 1.0
    assert metrics.aupr(reversed_, labels) == pytest.approx(
        skm.average_precision_score(labels, reversed_))
    constant = np.zeros(5)
    assert metrics.auroc(constant, labels) == 0.5
    assert metrics.aupr(constant, labels) == pytest.approx(0.4)  # the anomaly fraction
    assert metrics.fpr_at_tpr(constant, labels) == 1.0


def test_image_metrics_types_and_bool_labels():
    scores, labels = random_case(0)
    out = metrics.image_metrics(scores.astype(np.float32), labels.astype(bool))
    assert set(out) == {'image_AUROC', 'image_AUPR', 'FPR@95TPR'}
    assert all(type(v) is float and 0.0 <= v <= 1.0 for v in out.values())


def test_per_class_auroc():
    rng = np.random.default_rng(0)
    classes = np.repeat(np.arange(5), 40)
    scores = rng.normal(size=len(classes)) + 0.5 * classes
    normal_classes = (0, 2)
    labels = (~np.isin(classes, normal_classes)).astype(int)
    got = metrics.per_class_auroc(scores, labels, classes, normal_classes)
    assert list(got) == [1, 3, 4] and all(type(k) is int for k in got)
    for c, value in got.items():
        keep = (labels == 0) | (classes == c)
        assert value == pytest.approx(skm.roc_auc_score(labels[keep], scores[keep]), abs=1e-12)
    # Equal class sizes: the mean of the pairwise AUROCs is the pooled AUROC (docs/methods.md §1.6).
    assert np.mean(list(got.values())) == pytest.approx(metrics.auroc(scores, labels), abs=1e-12)
    with pytest.raises(ValueError, match='40 label'):
        metrics.per_class_auroc(scores, labels, classes, (0,))


@pytest.mark.parametrize(
    'fn', [metrics.auroc, metrics.aupr, metrics.fpr_at_tpr, metrics.image_metrics])
def test_errors(fn):
    with pytest.raises(ValueError, match='all normal'):
        fn([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match='all anomalies'):
        fn([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match='3 vs 2'):
        fn([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match='2 NaN/inf'):
        fn([0.1, np.nan, np.inf, 0.3], [0, 1, 0, 1])
    with pytest.raises(ValueError, match='0 \\(normal\\) or 1'):
        fn([0.1, 0.2], [0, 2])


def test_bad_tpr():
    with pytest.raises(ValueError, match='tpr'):
        metrics.fpr_at_tpr([0.1, 0.2], [0, 1], tpr=0.0)
