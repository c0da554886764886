"""benchmarks/pixel_knn_baseline.py against a brute-force reference, and on digits."""
import importlib.util
import json
import os

import numpy as np
import pytest
from scipy.spatial import distance
from sklearn import metrics as skm

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     'benchmarks', 'pixel_knn_baseline.py')
_spec = importlib.util.spec_from_file_location('pixel_knn_baseline', _PATH)
baseline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(baseline)


def reference_aurocs(train_x, train_y, test_x, test_y, classes, k, metric='euclidean'):
    """Straight from the definition: float64 cdist, k smallest, sklearn AUROC."""
    out = {}
    for c in classes:
        d = distance.cdist(test_x, train_x[train_y == c], metric)
        scores = np.sort(d, axis=1)[:, :k].mean(axis=1)
        out[c] = skm.roc_auc_score((test_y != c).astype(int), scores)
    return out


@pytest.mark.parametrize('k,metric', [(1, 'l2'), (3, 'l2'), (1, 'cosine')])
def test_matches_brute_force(k, metric):
    rng = np.random.default_rng(k)
    # uint8 NHWC images; class c is brighter in a class-specific corner, plus noise.
    n_train, n_test, classes = 60, 90, 3
    train_y = rng.integers(0, classes, n_train)
    test_y = rng.integers(0, classes, n_test)

    def images(labels):
        x = rng.integers(0, 160, (len(labels), 4, 4, 3))
        x[np.arange(len(labels)), labels, labels] += 90
        return x.astype(np.uint8)

    train_i, test_i = images(train_y), images(test_y)
    got = baseline.one_class_knn_aurocs(train_i, train_y, test_i, test_y, range(classes), k=k,
                                      metric=metric)
    want = reference_aurocs(train_i.reshape(n_train, -1) / 255.0, train_y,
                            test_i.reshape(n_test, -1) / 255.0, test_y, range(classes), k,
                            'euclidean' if metric == 'l2' else 'cosine')
    assert sorted(got) == list(range(classes))
    for c in range(classes):
        np.testing.assert_allclose(got[c], want[c], rtol=0, atol=1e-12)


def test_scores_blockwise_match_cdist():
    rng = np.random.default_rng(0)
    bank, queries = rng.random((37, 20)), rng.random((50, 20))
    queries[3] = bank[5]  # an exact match: distance 0, not NaN from a negative square
    want = distance.cdist(queries, bank).min(axis=1)
    got = baseline.knn_scores(bank, queries, k=1, block_rows=7)  # several partial blocks
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[3] == pytest.approx(0, abs=1e-3)
    want3 = np.sort(distance.cdist(queries, bank), axis=1)[:, :3].mean(axis=1)
    np.testing.assert_allclose(baseline.knn_scores(bank, queries, k=3, block_rows=16), want3,
                               atol=1e-5)


def test_digits_two_classes():
    train, test = baseline.load_data('digits')
    aurocs = baseline.one_class_knn_aurocs(train.images, train.labels, test.images,
                                           test.labels, [0, 1])
    assert set(aurocs) == {0, 1}
    for c, a in aurocs.items():
        assert a > 0.9, (c, a)


def test_main_prints_json(capsys):
    result = baseline.main(['--dataset', 'digits', '--classes', '3,8'])
    printed = json.loads(capsys.readouterr().out)
    assert printed == result
    assert printed['method'] == 'raw_pixel_1nn_l2'
    assert set(printed['per_class']) == {'3', '8'}
    mean = np.mean(list(printed['per_class'].values()))
    assert printed['mean_image_AUROC'] == pytest.approx(mean, abs=1e-6)
    assert printed['num_test'] == len(baseline.load_data('digits')[1])
