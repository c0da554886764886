"""Evaluation plots: the ROC points against scikit-learn, and the files written."""
import importlib

import numpy as np
from sklearn.metrics import roc_curve

from jaxad import plots

# The `test` extra installs matplotlib: fail, don't skip, when it is missing.
importlib.import_module('matplotlib')


def test_roc_points_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)  # many ties
    fpr, tpr = plots.roc_points(scores, labels)
    want_fpr, want_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, want_fpr)
    np.testing.assert_allclose(tpr, want_tpr)


def test_plots_written(tmp_path):
    rng = np.random.default_rng(1)
    anomaly = np.r_[np.zeros(50), np.ones(30)]
    scores = {'csi': rng.normal(size=80) + anomaly, 'knn': rng.normal(size=80)}
    paths = plots.write_evaluation_plots(scores, anomaly, 'csi', str(tmp_path / 'p'),
                                         title='test', threshold=0.5)
    assert [p.split('/')[-1] for p in paths] == ['roc.png', 'score_hist.png']
    for p in paths:
        with open(p, 'rb') as f:
            head = f.read(8)
        assert head == b'\x89PNG\r\n\x1a\n'
        assert (tmp_path / 'p' / p.split('/')[-1]).stat().st_size > 5000
