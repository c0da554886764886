"""The evaluator with a pixel method: anomaly maps scored against ground-truth masks
(pixel_AUROC, AUPRO), image F1-max, and overlay PNGs, through `evaluate.evaluate`."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxad import config as jc
from jaxad import evaluate, pixel_metrics, sharding
from jaxad.data import sources


class BrightnessMethod:
    """A stand-in pixel method: the map is each pixel's brightness (at half resolution),
    the image score its maximum."""
    headline_score = 'max'

    def features(self, variables, images, indices, key):
        x = images.astype(jnp.float32).mean(-1) / 255.0
        b, h, w = x.shape
        return {'map': x.reshape(b, h // 2, 2, w // 2, 2).mean((2, 4))}

    def score(self, scoring, feats):
        return {'max': feats['map'].max((1, 2)), 'map': feats['map']}


def synthetic_set(n=12, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 80, (n, size, size, 3)).astype(np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    labels = np.zeros(n, np.int64)
    for i in range(n // 2, n):  # defects: bright squares
        y, x = rng.integers(0, size - 6, 2)
        images[i, y:y + 6, x:x + 6] = 250
        masks[i, y:y + 6, x:x + 6] = 1
        labels[i] = 1
    return sources.ImageSet(images, labels, ['good', 'defect'], 'synthetic', masks=masks)


def test_maps_are_scored_against_masks_and_drawn(tmp_path):
    test_set = synthetic_set()
    config = jc.csi_base()
    config.eval.batch_size = 4
    config.eval.num_overlays = 3
    method = BrightnessMethod()
    results = evaluate.evaluate(method, {}, {}, test_set, (0,), config=config,
                                mesh=sharding.make_mesh(1), workdir=str(tmp_path))
    # The reference: the same maps, computed and resized outside the evaluator.
    x = test_set.images.astype(np.float32).mean(-1) / 255.0
    half = x.reshape(12, 8, 2, 8, 2).mean((2, 4))
    full = evaluate.resize_maps(half, (16, 16))
    want = pixel_metrics.pixel_metrics(full, test_set.masks)
    want['per_class_pixel_AUROC'] = {'defect': want['pixel_AUROC']}
    assert results['pixel']['map'] == want
    assert results['pixel_AUROC'] == want['pixel_AUROC'] > 0.95
    assert 'map' not in results['scores'] and results['image_AUROC'] == 1.0
    assert results['image_F1max'] == 1.0
    with np.load(tmp_path / 'anomaly_maps.npz') as f:  # the maps as scored, per test image
        np.testing.assert_allclose(f['map_map'], half, rtol=1e-6)  # float32 on device
        np.testing.assert_array_equal(f['labels'], test_set.labels)
        np.testing.assert_allclose(f['score_max'], half.reshape(12, -1).max(1), rtol=1e-6)
        assert list(f['class_names'][-2:]) == ['defect', 'defect']
    saved = json.load(open(tmp_path / 'results.json'))
    assert saved['AUPRO'] == want['AUPRO']
    overlays = sorted(os.listdir(tmp_path / 'plots' / 'overlays'))
    assert len(overlays) == 3 and overlays[-1].endswith('defect_11.png')


def test_resize_maps_is_bilinear_and_blockwise():
    maps = np.random.default_rng(1).uniform(size=(70, 4, 4)).astype(np.float32)
    out = evaluate.resize_maps(maps, (8, 8), block=16)
    import jax
    np.testing.assert_allclose(out, np.asarray(jax.image.resize(maps, (70, 8, 8), 'bilinear')),
                               atol=1e-6)
    np.testing.assert_array_equal(evaluate.resize_maps(maps, (4, 4)), maps)


def test_per_class_pixel_auroc_pairs_each_defect_type_with_the_normal_images():
    """sklearn on the pixels of the normal images plus one defect type's images."""
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(1)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 3])  # class 3 has no mask pixels: left out
    masks = np.zeros((8, 6, 6), np.uint8)
    masks[3:7, 1:4, 2:5] = 1
    maps = rng.normal(size=(8, 6, 6)) + masks * np.array([0, 0, 0, 3, 3, 0.5, 0.5, 0])[:, None, None]
    out = evaluate.pixel_results(maps, masks, labels, ['good', 'cut', 'stain', 'odd'], (0,))
    for c, name in ((1, 'cut'), (2, 'stain')):
        sel = (labels == 0) | (labels == c)
        want = roc_auc_score(masks[sel].ravel(), maps[sel].ravel())
        assert out['per_class_pixel_AUROC'][name] == pytest.approx(want, abs=1e-12)
    assert set(out['per_class_pixel_AUROC']) == {'cut', 'stain'}
    assert out['per_class_pixel_AUROC']['cut'] > out['per_class_pixel_AUROC']['stain']
