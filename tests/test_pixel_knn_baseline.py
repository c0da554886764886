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


def test_k1_l2_is_every_results_baseline_with_its_ties():
    """k = 1, l2 on uint8 images is jaxad.baseline.raw_pixel_1nn (results.json's baseline):
    the exact squared distance of the raw integers, so quantised images at equal distances
    tie, as scipy's float64 sqeuclidean of the integers and sklearn's AUROC count them."""
    from jaxad import baseline as jaxad_baseline
    rng = np.random.default_rng(3)
    n_train, n_test, classes = 50, 120, 3
    train_y, test_y = rng.integers(0, classes, n_train), rng.integers(0, classes, n_test)
    # two grey levels on 3x3x3 pixels: many test images at the same distance
    train_i = (rng.integers(0, 2, (n_train, 3, 3, 3)) * 255).astype(np.uint8)
    test_i = (rng.integers(0, 2, (n_test, 3, 3, 3)) * 255).astype(np.uint8)
    got = baseline.one_class_knn_aurocs(train_i, train_y, test_i, test_y, range(classes))
    for c in range(classes):
        d = distance.cdist(test_i.reshape(n_test, -1).astype(float),
                           train_i[train_y == c].reshape(-1, 27).astype(float), 'sqeuclidean')
        nearest = d.min(axis=1)
        assert len(np.unique(nearest)) < n_test // 4  # the ties this test is about
        want = skm.roc_auc_score((test_y != c).astype(int), nearest)
        assert got[c] == pytest.approx(want, abs=1e-12)
        assert got[c] == jaxad_baseline.raw_pixel_1nn(
            train_i, np.flatnonzero(train_y == c), test_i, (test_y != c))['image_AUROC']


EPS32 = float(np.finfo(np.float32).eps)  # 2**-23


def expansion_tolerance(bank, queries, want_sorted):
    """Per-query bound on |knn_scores - exact| for the float32 expansion.

    knn_scores centres on the bank mean m and forms ||a||^2 + ||b||^2 - 2 a.b from float32
    a = q - m, b = x - m (norms summed in float64). A float32 dot product of length d errs by
    at most gamma_d * sum|a_i b_i| <= (d * eps/2) * (||a||^2 + ||b||^2) / 2 (Higham's
    gamma_d ~ d * eps/2, any summation order or FMA; Cauchy-Schwarz and AM-GM), so -2 a.b
    errs by <= (d * eps/2) * S with S = ||a||^2 + ||b||^2. Rounding q, x and m to float32
    adds about eps * (||q|| + ||m||) * ||q - x||, well inside the remaining factor 2 for this
    [0, 1] data. Hence per pair |sq_got - sq_exact| <= B = d * eps * S. The cancellation makes
    this an ABSOLUTE error in the squared distance: at an exact match (sq_exact = 0) it can
    leave a float32-sized residue, which some BLAS kernels do (4.2e-4 after the sqrt).
    The i-th smallest of the perturbed squares is within B_q = max_j B of the i-th smallest
    exact one, and |sqrt(u) - sqrt(v)| <= min(sqrt|u - v|, |u - v| / sqrt(v)), so each of the k
    nearest distances d_i is off by at most min(sqrt(B_q), B_q / d_i): that mean is the bound.
    """
    m = bank.mean(axis=0)
    s = (((queries - m) ** 2).sum(1)[:, None] + ((bank - m) ** 2).sum(1)[None, :]).max(1)
    b = bank.shape[1] * EPS32 * s  # (Q,): bound on the squared-distance error
    with np.errstate(divide='ignore'):
        per_rank = np.minimum(np.sqrt(b)[:, None], b[:, None] / want_sorted)
    return per_rank.mean(axis=1)


def test_scores_blockwise_match_cdist():
    rng = np.random.default_rng(0)
    bank, queries = rng.random((37, 20)), rng.random((50, 20))
    queries[3] = bank[5]  # an exact match: distance 0, not NaN from a negative square
    exact = np.sort(distance.cdist(queries, bank), axis=1)
    for k, block_rows in ((1, 7), (3, 16)):  # several partial blocks
        want = exact[:, :k].mean(axis=1)
        tol = expansion_tolerance(bank, queries, exact[:, :k])
        # A mis-indexed query row or bank column is off by a whole distance (~1 here):
        # the bound stays far below that, also at the exact match (row 3, ~3e-3).
        assert tol.max() < 0.01 * np.median(want)
        got = baseline.knn_scores(bank, queries, k=k, block_rows=block_rows)
        assert got.shape == want.shape and np.all(np.isfinite(got))
        err = np.abs(got - want)
        assert np.all(err <= tol), (k, np.argmax(err / tol), (err / tol).max())


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
    assert printed['method'] == 'raw_pixel_1nn_l2' and printed['exact']
    assert printed['image_shape'] == [16, 16, 3]  # configs/quickstart.py's geometry
    assert set(printed['per_class']) == {'3', '8'}
    mean = np.mean(list(printed['per_class'].values()))
    assert printed['mean_image_AUROC'] == pytest.approx(mean, abs=1e-6)
    assert printed['num_test'] == len(baseline.load_data('digits')[1])


def test_every_results_baseline_is_the_definition_and_computed_once():
    """jaxad.baseline.raw_pixel_1nn (what results.json's baseline.raw_pixel_1nn holds): the
    image AUROC of each test image's L2 distance to the nearest bank image (raw uint8 values),
    as scipy and sklearn compute it; a lazy image sequence gives the same; the same bank and
    test split are scored once per process, another bank again."""
    from jaxad import baseline as jaxad_baseline
    rng = np.random.default_rng(7)
    train = rng.integers(0, 256, (40, 5, 5, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (30, 5, 5, 3), dtype=np.uint8)
    # normal test images: bank images with strong noise, so the ranking is imperfect
    test[:10] = np.clip(train[0:20:2].astype(int) + rng.integers(-150, 150, (10, 5, 5, 3)),
                        0, 255)
    test[10:15] = np.clip(train[0:10:2].astype(int) + 20, 0, 255)  # anomalies near it too
    anomaly = np.arange(30) >= 10
    bank_indices = np.arange(0, 40, 2)
    want = skm.roc_auc_score(anomaly, distance.cdist(
        test.reshape(30, -1).astype(float), train[bank_indices].reshape(20, -1).astype(float),
        'sqeuclidean').min(axis=1))
    got = jaxad_baseline.raw_pixel_1nn(train, bank_indices, test, anomaly)
    assert got['image_AUROC'] == pytest.approx(want, abs=1e-12)
    assert got['bank_images'] == 20 and 0.5 < want < 1.0
    cached = len(jaxad_baseline._CACHE)
    lazy = jaxad_baseline.raw_pixel_1nn(list(train), bank_indices, list(test), anomaly)
    assert lazy == got and len(jaxad_baseline._CACHE) == cached
    other = jaxad_baseline.raw_pixel_1nn(train, bank_indices + 1, test, anomaly)
    assert len(jaxad_baseline._CACHE) == cached + 1 and other != got
    result = {'image_AUROC': want - 0.01, 'baseline': {'raw_pixel_1nn': got}}
    assert jaxad_baseline.below(result)
    assert 'is BELOW the raw-pixel 1-NN baseline' in jaxad_baseline.verdict(result)
    assert not jaxad_baseline.below(dict(result, image_AUROC=want + 0.01))
    assert not jaxad_baseline.below({'image_AUROC': 0.1})  # a result saved before baselines


def test_config_and_image_size_flags(capsys):
    """--config takes a section's own config (FILE[:ARGS]); --image_size overrides its
    data.image_size, so the bank and test images have the geometry its detectors see."""
    result = baseline.main(['--config', 'configs/quickstart.py:normal_class=3',
                            '--image_size', '8', '--classes', '3'])
    assert json.loads(capsys.readouterr().out) == result
    assert result['image_shape'] == [8, 8, 3] and result['dataset'] == 'digits'
    assert result['config'] == 'configs/quickstart.py:normal_class=3'
    cfg = baseline.data_config('fashion_mnist', config='configs/oecl_fmnist.py:normal_class=0')
    assert cfg.source == 'fashion_mnist' and cfg.channels == 1  # the config's 3 repeated: x3
