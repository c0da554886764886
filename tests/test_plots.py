"""Evaluation plots: the ROC points against scikit-learn, and the files written."""
import importlib
import os

import numpy as np
import pytest
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


def test_anomaly_overlays(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    maps = rng.uniform(size=(5, 6, 6))
    masks = np.zeros((5, 24, 24), np.uint8)
    masks[1, 4:10, 4:10] = 1
    paths = plots.write_anomaly_overlays(images, maps, str(tmp_path / 'ov'), masks=masks,
                                         names=[f'x{i}.png' for i in range(5)],
                                         scores=maps.max((1, 2)), limit=3)
    assert [os.path.basename(p) for p in paths] == ['0000_x0.png', '0001_x1.png', '0002_x2.png']
    for p in paths:
        with Image.open(p) as im:
            assert im.size[0] > 3 * 24 and im.mode in ('RGB', 'RGBA')
    grey = plots.write_anomaly_overlays(images[:2, ..., :1], maps[:2], str(tmp_path / 'g'))
    assert len(grey) == 2
    with pytest.raises(ValueError, match='do not match'):
        plots.write_anomaly_overlays(images, maps, str(tmp_path), masks=masks[:, :5])
