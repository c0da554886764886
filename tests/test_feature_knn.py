"""feature_knn: kNN on a fixed encoder's features, no training (jaxad/methods/feature_knn.py).

The conformance test runs it through train, checkpoint, predict and export
(tests/test_conformance.py); here: its scores against scipy's distances, the pixel encoder
against the raw-pixel baseline every result carries, the ResNet encoder's features against
the model applied directly, the reported AUROCs (and AUPRO) of whole runs against sklearn's
(and a literal AUPRO) on scores computed outside jaxad's scoring code, and the config's
refusals.
"""
import json

import jax
import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.metrics import roc_auc_score

from configs import knn_features
from jaxad import config as jc
from jaxad import train
from jaxad.errors import ConfigError
from jaxad.methods import get_method
from tests.helpers import set_fields


def knn_config(npz, **overrides):
    c = jc.base_config('feature_knn')
    return set_fields(c, **{
        'data.source': 'numpy', 'data.numpy_path': str(npz), 'data.image_size': 8,
        'data.normal_classes': (0,), 'model.name': 'resnet10', 'model.width': 4,
        'batch_size': 8, 'num_devices': 1, 'eval.batch_size': 16, 'eval.plots': False,
        **overrides})


U32 = 2.0 ** -24  # float32 unit roundoff


def auroc_tolerance(scores, anomaly, err):
    """How far the AUROC of scores each within `err` (scalar or per row) of `scores` can be
    from theirs: only an (anomalous, normal) pair whose intervals overlap can change order,
    each by at most 1 / (pairs); the others count the same. Plus 1e-12 for the float64 sums
    (jaxad's rank sum against sklearn's trapezoid)."""
    anomaly = np.asarray(anomaly, bool)
    err = np.broadcast_to(np.asarray(err, np.float64), scores.shape)
    gap = np.abs(scores[anomaly][:, None] - scores[~anomaly][None, :])
    close = gap <= err[anomaly][:, None] + err[~anomaly][None, :]
    return close.sum() / close.size + 1e-12


def l2_rounding(test, bank, dist):
    """Bound on the float32 rounding of the distances `dist` (N,) from `test` rows to `bank`
    rows as jaxad computes them, sqrt(|x|^2 + |b|^2 - 2 x.b) (jaxad/density.py): each
    D-term dot product is off by at most about D u times the sum of its |terms|, so the
    squared distance by about 2 (D + 2) u (|x|^2 + |b|^2) (3x that here, a margin), which
    moves the square root by at most the value returned (largest where dist is small)."""
    sq = 3 * 2 * (test.shape[1] + 2) * U32 * (np.sum(test ** 2, axis=1)
                                              + np.max(np.sum(bank ** 2, axis=1)))
    return np.sqrt(dist ** 2 + sq) - dist


@pytest.mark.parametrize('metric,k', [('l2', 1), ('l2', 3), ('cosine', 2)])
def test_scores_are_the_mean_distance_to_the_k_nearest_bank_features(metric, k, tmp_path):
    rng = np.random.default_rng(k)
    bank = rng.normal(size=(40, 12)).astype(np.float32)
    test = rng.normal(size=(25, 12)).astype(np.float32)
    method = get_method(knn_config(tmp_path / 'unused.npz', **{
        'feature_knn.metric': metric, 'feature_knn.k': k}))
    got = np.asarray(jax.jit(method.score)(method.fit_scoring({'feat': bank}),
                                           {'feat': test})['knn'])
    d = cdist(test.astype(np.float64), bank.astype(np.float64),
              'euclidean' if metric == 'l2' else 'cosine')
    want = np.sort(d, axis=1)[:, :k].mean(axis=1)
    # float32 distances: |a|^2 + |b|^2 - 2ab of 12-dim unit-scale vectors, relative 1e-5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_pixel_encoder_is_the_raw_pixel_baseline_and_takes_no_step(tmp_path):
    """encoder=pixels, k=1, l2 is the detector every result compares itself with: its image
    AUROC is the run's own baseline.raw_pixel_1nn, exactly. On sklearn's digits at their
    own 8x8 (x3 channels) every squared distance of uint8 values is an integer below
    192 * 255**2 < 2**24, so the float32 computation on the device is exact, as the host's
    float64 one is, and the many tied distances tie in both. No step, no optimiser state."""
    config = knn_config('', **{'data.source': 'digits', 'data.normal_classes': (8,),
                               'feature_knn.encoder': 'pixels', 'eval.num_samples': 1,
                               'eval.batch_size': 128})
    results = train.train_and_evaluate(config, str(tmp_path / 'run'))
    base = results['baseline']['raw_pixel_1nn']['image_AUROC']
    assert 0.5 < base < 1.0  # a split on which the ranking is not trivial
    assert results['image_AUROC'] == base
    assert results['step'] == 0
    metrics = (tmp_path / 'run' / 'metrics.jsonl')
    assert not metrics.exists() or metrics.read_text() == ''
    setup = train.Setup(config, str(tmp_path / 'run'))
    try:
        state, step = setup.restore_latest()
    finally:
        setup.close()
    assert step == 0 and jax.tree_util.tree_leaves(state.opt_state) == []
    assert jax.tree_util.tree_leaves(state.params) == []  # no weights
    saved = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert saved['method'] == 'feature_knn' and saved['headline_score'] == 'knn'


@pytest.mark.parametrize('mode', ['vmap', 'unroll'])
def test_a_table_of_pixel_encoders_is_each_class_baseline(mode, tmp_path):
    """A one-class table of three digits as one stack (the pixel encoder has no weights: the
    stack still has its model axis): each member's AUROC is its class's baseline, exactly
    (see the test above), and results.md says the detector is nowhere below it."""
    config = knn_config('', **{'data.source': 'digits', 'data.normal_classes': (),
                               'table.classes': '0,1,8', 'table.stack_mode': mode,
                               'feature_knn.encoder': 'pixels', 'eval.num_samples': 1,
                               'eval.batch_size': 128})
    results = train.train_and_evaluate(config, str(tmp_path))
    assert [r['name'] for r in results['classes']] == ['0', '1', '8']
    for r in results['classes']:
        assert r['step'] == 0
        assert r['image_AUROC'] == r['baseline']['raw_pixel_1nn']['image_AUROC'], r['name']
    assert results['classes'][2]['image_AUROC'] < 1.0
    assert 'The detector is not below it for any class.' in (tmp_path / 'results.md').read_text()


def test_the_resnet_encoder_feature_is_the_models_pooled_feature(tmp_path):
    """encoder=resnet: the eval-mode pooled feature of the model (random weights here), the
    images resized to feature_knn.image_size first."""
    config = knn_config(tmp_path / 'unused.npz', **{'feature_knn.image_size': 16})
    method = get_method(config)
    variables = method.init_variables(jax.random.key(0), (8, 8, 3))
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    got = method.features(variables, images, None, None)['feat']
    x = jax.image.resize(images.astype(np.float32) / 255.0, (4, 16, 16, 3), 'bilinear',
                         antialias=False)
    want = method.model.apply(variables, x, train=False)['features']
    assert got.shape == (4, 4 * 8)  # resnet10 width 4: 32 pooled channels
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_vit_encoder_reads_timm_weights_and_scores_their_class_token(tmp_path):
    """encoder=vit with a timm-layout .pth (tests/test_vit.py's PyTorch reference, random
    weights): the run scores with the class token of the ImageNet-normalised image, resized
    to feature_knn.image_size (here 16 px: a 2 x 2 grid of 8 px patches, positions resized
    from the file's 4 x 4), equal to the PyTorch model's; no step."""
    from tests.helpers import import_torch
    from tests.test_vit import ATOL, torch_vit
    torch = import_torch()
    ref = torch_vit(128, 2, 8, 4, 0, False, False)
    weights = tmp_path / 'vit.pth'
    torch.save(ref.state_dict(), weights)
    config = knn_config('', **{'data.source': 'digits', 'data.normal_classes': (3,),
                               'feature_knn.encoder': 'vit', 'feature_knn.weights': str(weights),
                               'feature_knn.image_size': 16, 'eval.num_samples': 1,
                               'eval.batch_size': 128})
    results = train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert results['step'] == 0
    method = get_method(config)
    variables = jax.jit(lambda: method.init_variables(jax.random.key(0), (8, 8, 3)))()
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    got = method.features(variables, images, None, None)['feat']

    def torch_cls(images):
        x = jax.image.resize(images.astype(np.float32) / 255.0, (len(images), 16, 16, 3),
                             'bilinear', antialias=False)
        x = (np.asarray(x) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        with torch.no_grad():
            cls, _ = ref(torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2))
        return cls.numpy().astype(np.float64)
    np.testing.assert_allclose(got, torch_cls(images), atol=ATOL, rtol=0)

    # The run's AUROC from PyTorch's class tokens of its bank (the training 3s) and test
    # images, scipy's 1-NN distances and sklearn's AUROC.
    from jaxad.data.sources import load_digits
    train_set, test_set = (load_digits(split, 8, config.data.test_fraction,
                                       config.data.split_seed) for split in ('train', 'test'))
    bank = torch_cls(train_set.images[train_set.labels == 3])
    test = torch_cls(test_set.images)
    dist = cdist(test, bank).min(axis=1)
    anomaly = test_set.labels != 3
    want = roc_auc_score(anomaly, dist)
    # Every class-token component is within ATOL of PyTorch's (checked above), so each of the
    # run's distances is within ||d test|| + ||d bank|| <= 2 sqrt(D) ATOL of scipy's
    # (triangle inequality), plus its own float32 rounding; pairs closer than that may swap.
    err = 2 * np.sqrt(bank.shape[1]) * ATOL + l2_rounding(test, bank, dist)
    tol = auroc_tolerance(dist, anomaly, err)
    assert tol < 0.02  # about 5e-3 here; in practice the two agree to 1e-16
    assert abs(results['image_AUROC'] - want) <= tol, (results['image_AUROC'], want, tol)


def test_greedy_coreset_is_farthest_point_selection():
    """From row 0, each next row is the one farthest from all chosen so far (NumPy, float64
    distances); the chosen rows are distinct."""
    from jaxad.methods.feature_knn import greedy_coreset
    x = np.random.default_rng(3).normal(size=(60, 5)).astype(np.float32)
    got = np.asarray(jax.jit(greedy_coreset, static_argnums=1)(x, 12))
    d = cdist(x.astype(np.float64), x.astype(np.float64))
    want, nearest = [0], d[0].copy()
    for _ in range(11):
        want.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, d[want[-1]])
    assert got.tolist() == want and len(set(want)) == 12


def test_patch_maps_are_each_patchs_distance_to_the_nearest_normal_patch(tmp_path):
    """patch_maps: map[n, i, j] = min over the bank's patch features q of ||p_nij - q||
    (scipy), the image score its maximum; with a coreset the bank is the chosen patches."""
    config = knn_config(tmp_path / 'unused.npz', **{
        'feature_knn.patch_maps': True, 'feature_knn.resnet_stage': 2,
        'feature_knn.coreset': 0.25})
    method = get_method(config)
    assert method.headline_score == 'patch_max'
    rng = np.random.default_rng(0)
    train_patches = rng.normal(size=(6, 4, 4, 8)).astype(np.float32)
    test_patches = rng.normal(size=(3, 4, 4, 8)).astype(np.float32)
    feats = lambda p: {'feat': p.mean(axis=(1, 2)), 'patches': p}  # noqa: E731
    scoring = jax.jit(method.fit_scoring)(feats(train_patches))
    bank = train_patches.reshape(-1, 8)
    from jaxad.methods.feature_knn import greedy_coreset
    kept = np.asarray(greedy_coreset(bank, 24))  # ceil(0.25 * 96)
    np.testing.assert_array_equal(scoring['patch_bank'], bank[kept])
    scores = jax.jit(method.score)(scoring, feats(test_patches))
    want = cdist(test_patches.reshape(-1, 8), bank[kept]).min(axis=1).reshape(3, 4, 4)
    np.testing.assert_allclose(scores['map'], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores['patch_max'], want.reshape(3, -1).max(axis=1),
                               rtol=1e-5, atol=1e-5)
    # the ResNet's stage-2 output is the patch feature: 8 px images, cifar stem -> 4 x 4
    variables = method.init_variables(jax.random.key(0), (8, 8, 3))
    images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    out = method.features(variables, images, None, None)
    assert out['patches'].shape == (2, 4, 4, 8) and out['feat'].shape == (2, 32)


def test_patch_maps_give_pixel_metrics_and_overlays_on_a_defect_set(tmp_path):
    """On the synthetic MVTec-style set (pixel masks): pixel AUROC and AUPRO in the results,
    overlay PNGs written, as for ReContrast; no step. Random weights; the saved maps are
    each test patch's scipy distance to the nearest training patch, and the reported
    metrics are sklearn's pixel and image AUROC and the slow literal AUPRO of
    tests/test_pixel_metrics.py on them."""
    from jaxad.data import synthetic
    synthetic.write_mvtec(tmp_path / 'synth', 'weave', size=16, num_train=8, num_good_test=2,
                          num_per_defect=1)
    config = knn_config('', **{
        'data.source': 'mvtec', 'data.path': str(tmp_path / 'synth'), 'data.category': 'weave',
        'data.image_size': 16, 'feature_knn.patch_maps': True, 'feature_knn.resnet_stage': 2,
        'eval.plots': True, 'eval.num_samples': 1, 'eval.batch_size': 8})
    results = train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert results['step'] == 0 and results['headline_score'] == 'patch_max'
    assert list((tmp_path / 'run' / 'plots' / 'overlays').glob('*.png'))

    setup = train.Setup(config, str(tmp_path / 'run'))
    try:
        state, _ = setup.restore_latest()
        train_set, test_set, bank_idx = setup.train_set, setup.test_set, setup.normal_indices
        normal_classes = setup.normal_classes
    finally:
        setup.close()
    # The maps as scored: the run's encoder's stage-2 patch features (its own feature code),
    # each test patch's L2 distance to the nearest training patch by scipy.
    method = get_method(config)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    bank, test = (np.asarray(method.features(variables, images, None, None)['patches'],
                             np.float64) for images in (train_set.images[bank_idx],
                                                        test_set.images))
    bank_rows, test_rows = bank.reshape(-1, bank.shape[-1]), test.reshape(-1, test.shape[-1])
    want = cdist(test_rows, bank_rows).min(axis=1).reshape(test.shape[:3])
    saved = np.load(tmp_path / 'run' / 'anomaly_maps.npz')
    maps = saved['map_map']
    # The run's distances: float32 rounding (`l2_rounding`) of features that the run computed
    # with the same float32 network in another batch layout (only the order of its sums
    # differs, a relative change far below 1e-5).
    feat_err = 1e-5 * np.linalg.norm(np.concatenate([bank_rows, test_rows]), axis=1).max()
    err = (2 * feat_err + l2_rounding(test_rows, bank_rows, want.ravel())).reshape(want.shape)
    assert np.all(np.abs(maps - want) <= err), np.abs(maps - want).max()
    assert np.all(np.abs(saved['score_patch_max'] - want.max(axis=(1, 2)))
                  <= err.max(axis=(1, 2)))
    # The metrics of those same float32 maps and scores: equal up to the float64 sums.
    anomaly = ~np.isin(test_set.labels, normal_classes)
    assert results['image_AUROC'] == pytest.approx(
        roc_auc_score(anomaly, saved['score_patch_max']), abs=1e-12)
    from tests.test_pixel_metrics import slow_aupro
    masks = np.asarray(test_set.masks).astype(bool)
    up = np.asarray(jax.image.resize(maps, (len(maps),) + masks.shape[1:], 'bilinear'))
    assert results['pixel_AUROC'] == pytest.approx(roc_auc_score(masks.ravel(), up.ravel()),
                                                   abs=1e-12)
    assert results['AUPRO'] == pytest.approx(slow_aupro(up, masks), abs=1e-9)


def test_the_shared_density_evaluators_score_the_same_features(tmp_path):
    """eval.density=gde,mahalanobis beside the kNN score: fitted on the same features of the
    bank (the ResNet's 32-wide pooled feature, random weights: fewer dimensions than the
    class's ~90 bank images, so the covariances are full rank) and scored with the others;
    their AUROCs in the results are sklearn's on the scores computed by NumPy / scipy."""
    config = knn_config('', **{'data.source': 'digits', 'data.normal_classes': (8,),
                               'feature_knn.encoder': 'resnet', 'eval.num_samples': 1,
                               'eval.batch_size': 128, 'eval.density': ('gde', 'mahalanobis')})
    results = train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert set(results['scores']) == {'knn', 'gde', 'mahalanobis'}
    # Their AUROCs from the run's encoder (restored from its checkpoint) applied to its bank
    # (the training 8s) and test images, the scores in float64 NumPy / scipy and the AUROC
    # from sklearn.
    setup = train.Setup(config, str(tmp_path / 'run'))
    try:
        state, _ = setup.restore_latest()
        train_set, test_set, bank_idx = setup.train_set, setup.test_set, setup.normal_indices
    finally:
        setup.close()
    model = get_method(config).model
    encode = jax.jit(lambda x: model.apply({'params': state.params,
                                            'batch_stats': state.batch_stats}, x,
                                           train=False)['features'])
    bank, test = (np.asarray(encode(images.astype(np.float32) / 255.0), np.float64)
                  for images in (train_set.images[bank_idx], test_set.images))
    anomaly = test_set.labels != 8
    # The run computed these features with the same float32 network in another batch
    # layout: only the order of its sums differs, a relative change far below 1e-5.
    feat_err = 1e-5 * np.linalg.norm(np.concatenate([bank, test]), axis=1).max()
    # feature_knn's own score: the L2 distance to the nearest bank feature (k = 1).
    dist = cdist(test, bank).min(axis=1)
    knn_err = 2 * feat_err + l2_rounding(test, bank, dist)
    # gde and mahalanobis (one class, tied covariance): both (x - mu)^T C^-1 (x - mu), C the
    # maximum-likelihood covariance (ddof 0) + 1e-6 I. Solving with a float32 Cholesky factor
    # is off by at most about cond(C) D u relative (Higham, Accuracy and Stability, ch. 10),
    # 10x that allowed for the float32 mean and covariance sums; a feature error e moves
    # x - mu by up to 2 e, so the score by at most 2 sqrt(score) 2 e / sqrt(lambda_min(C)).
    cov = np.cov(bank, rowvar=False, bias=True) + 1e-6 * np.eye(bank.shape[1])
    centred = test - bank.mean(axis=0)
    maha = np.einsum('nd,nd->n', centred, np.linalg.solve(cov, centred.T).T)
    eig = np.linalg.eigvalsh(cov)
    maha_err = (10 * eig[-1] / eig[0] * bank.shape[1] * U32 * maha
                + 4 * np.sqrt(maha) * feat_err / np.sqrt(eig[0]))
    for name, scores, err in (('knn', dist, knn_err), ('gde', maha, maha_err),
                              ('mahalanobis', maha, maha_err)):
        want = roc_auc_score(anomaly, scores)
        tol = auroc_tolerance(scores, anomaly, err)
        assert tol < 0.02, (name, tol)  # in practice the two agree to 1e-16
        got = results['scores'][name]['image_AUROC']
        assert abs(got - want) <= tol, (name, got, want, tol)
    assert results['image_AUROC'] == results['scores']['knn']['image_AUROC']


def test_the_config_names_the_weights_to_fetch():
    with pytest.raises(ConfigError, match=r'encoder=resnet50 needs its ImageNet weights: fetch '
                                          r'https://download\.pytorch\.org/models/resnet50-'):
        knn_features.get_config('encoder=resnet50')
    with pytest.raises(ConfigError, match=r'encoder=dinov2_vits14 needs its weights: fetch '
                                          r'https://dl\.fbaipublicfiles\.com/dinov2/'):
        knn_features.get_config('encoder=dinov2_vits14')
    c = knn_features.get_config('encoder=dinov2_vits14,weights=random')
    assert (c.feature_knn.encoder, c.feature_knn.vit, c.feature_knn.patch,
            c.feature_knn.pos_offset, c.feature_knn.image_size) == ('vit', 'vit_small', 14, 0.1,
                                                                   224)
    jc.validate_config(c)
    c = knn_features.get_config('encoder=resnet18,weights=random,normal_class=3')
    assert (c.method, c.model.name, c.model.init_from, c.feature_knn.encoder) == (
        'feature_knn', 'resnet18', '', 'resnet')
    jc.validate_config(c)
    c = knn_features.get_config('encoder=pixels,normal_class=3')
    assert c.feature_knn.encoder == 'pixels' and c.data.normal_classes == (3,)
    for field, value, message in (('feature_knn.encoder', 'swin', 'encoder must be one of'),
                                  ('feature_knn.vit', 'vit_huge', 'vit must be one of'),
                                  ('feature_knn.metric', 'l1', 'metric must be one of'),
                                  ('feature_knn.k', 0, 'k must be >= 1')):
        with pytest.raises(ConfigError, match=message):
            jc.validate_config(set_fields(knn_features.get_config(
                'encoder=dino_vits16,weights=random'), **{field: value}))
