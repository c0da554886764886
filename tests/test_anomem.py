"""AnoMem (docs/methods.md §7, an inferred sketch): memory retrieval, variance term, deviation
maps and scores, classifier BCE against NumPy written from the formulas (not from
jaxad.methods.anomem); oe.max_images; end-to-end one-class and few-anomaly runs."""
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad import config as jc
from jaxad import loop, train
from jaxad.data import sources
from jaxad.errors import ConfigError
from jaxad.methods import anomem, get_method
from jaxad.models import resnet
from tests.helpers import make_npz, make_rotated_npz, tiny_config


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp('data') / 'tiny.npz')


def anomem_config(npz_path, **overrides):
    return tiny_config(npz_path, **{
        'method': 'anomem', 'total_steps': 2, 'anomem.num_prototypes': 8, 'eval.plots': False,
        'checkpoint.every_steps': 100, **overrides})


# ----------------------------------------------------------------------------- NumPy refs

def np_unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_retrieve(q, m, beta):
    """r = softmax(beta cos(q, m_j))_j . M, one query at a time."""
    out = np.zeros(q.shape[:-1] + (m.shape[1],))
    for idx in np.ndindex(q.shape[:-1]):
        cos = np.array([np_unit(q[idx]) @ np_unit(m[j]) for j in range(len(m))])
        w = np.exp(beta * cos - np.max(beta * cos))
        out[idx] = (w / w.sum()) @ m
    return out


def np_variance(m, gamma):
    std = np.sqrt(np.var(m, axis=0, ddof=1) + 1e-4)
    return np.mean(np.maximum(0.0, gamma - std))


def np_bilinear(x, size):
    """Half-pixel-centre bilinear resize of (h, w) with edge clamping (torch
    align_corners=False), written with loops."""
    h, w = x.shape
    out = np.zeros(size)
    for i in range(size[0]):
        for j in range(size[1]):
            y = min(max((i + 0.5) * h / size[0] - 0.5, 0.0), h - 1)
            z = min(max((j + 0.5) * w / size[1] - 0.5, 0.0), w - 1)
            y0, z0 = int(np.floor(y)), int(np.floor(z))
            y1, z1 = min(y0 + 1, h - 1), min(z0 + 1, w - 1)
            a, b = y - y0, z - z0
            out[i, j] = ((1 - a) * (1 - b) * x[y0, z0] + (1 - a) * b * x[y0, z1]
                         + a * (1 - b) * x[y1, z0] + a * b * x[y1, z1])
    return out


# ----------------------------------------------------------------------------- formulas

@pytest.mark.parametrize('beta', [1.0, 16.0])
def test_hopfield_retrieval_matches_numpy(beta):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 3, 3, 5)).astype(np.float32)
    m = rng.normal(size=(7, 5)).astype(np.float32) * 3.0  # norms must not matter in the weights
    got = np.asarray(anomem.hopfield_retrieve(jnp.asarray(q), jnp.asarray(m), beta))
    np.testing.assert_allclose(got, np_retrieve(q.astype(np.float64), m.astype(np.float64),
                                                beta), rtol=1e-4, atol=1e-5)
    # Large beta: the retrieval is the prototype of highest cosine.
    hard = np.asarray(anomem.hopfield_retrieve(jnp.asarray(q), jnp.asarray(m), 1e4))
    nearest = np.argmax(np_unit(q) @ np_unit(m).T, axis=-1)
    np.testing.assert_allclose(hard, m[nearest], rtol=1e-4, atol=1e-4)


def test_variance_term_matches_numpy_and_detects_collapse():
    rng = np.random.default_rng(1)
    for scale in (0.05, 0.3, 2.0):
        m = (scale * rng.normal(size=(16, 6))).astype(np.float32)
        np.testing.assert_allclose(float(anomem.variance_term(jnp.asarray(m), 0.5)),
                                   np_variance(m.astype(np.float64), 0.5), rtol=1e-5, atol=1e-7)
    spread = rng.normal(size=(64, 6)) * 3.0  # every channel std ~3 > gamma
    assert float(anomem.variance_term(jnp.asarray(spread, jnp.float32), 1.0)) == 0.0
    collapsed = np.tile(rng.normal(size=(1, 6)), (64, 1))  # all prototypes equal
    got = float(anomem.variance_term(jnp.asarray(collapsed, jnp.float32), 1.0))
    np.testing.assert_allclose(got, 1.0 - np.sqrt(1e-4), rtol=1e-5)
    # Unbiased variance: two prototypes +-a give std sqrt(2 a^2 + 1e-4), not a.
    two = np.array([[0.1], [-0.1]], np.float32)
    np.testing.assert_allclose(float(anomem.variance_term(jnp.asarray(two), 1.0)),
                               1.0 - np.sqrt(0.02 + 1e-4), rtol=1e-5)


def test_deviation_maps_match_numpy():
    rng = np.random.default_rng(2)
    q, r = rng.normal(size=(2, 4, 4, 6)), rng.normal(size=(2, 4, 4, 6))
    l2 = np.asarray(anomem.deviation(jnp.asarray(q, jnp.float32), jnp.asarray(r, jnp.float32)))
    np.testing.assert_allclose(l2, ((q - r) ** 2).sum(-1), rtol=1e-5)
    cos = np.asarray(anomem.deviation(jnp.asarray(q, jnp.float32), jnp.asarray(r, jnp.float32),
                                      'cos'))
    np.testing.assert_allclose(cos, 1 - (np_unit(q) * np_unit(r)).sum(-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match='deviation'):
        anomem.deviation(jnp.ones((1, 2)), jnp.ones((1, 2)), 'l1')


def test_normalised_scores_and_map_match_numpy():
    rng = np.random.default_rng(3)
    scales = ('layer2', 'layer3')
    shapes = {'layer2': (4, 4), 'layer3': (2, 2)}
    train_maps = {s: rng.gamma(2.0, size=(20,) + shapes[s]) * (i + 1)
                  for i, s in enumerate(scales)}
    test_maps = {s: rng.gamma(2.0, size=(5,) + shapes[s]) * (i + 1)
                 for i, s in enumerate(scales)}
    scoring = anomem.fit_scoring({s: jnp.asarray(v, jnp.float32) for s, v in train_maps.items()},
                                 scales)
    mu = [train_maps[s].mean(axis=(1, 2)).mean() for s in scales]
    sigma = [train_maps[s].mean(axis=(1, 2)).std() for s in scales]  # population std
    np.testing.assert_allclose(np.asarray(scoring['mu']), mu, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(scoring['sigma']), sigma, rtol=1e-4)

    out = anomem.scores(scoring, {s: jnp.asarray(v, jnp.float32) for s, v in test_maps.items()},
                        scales, (8, 8))
    want = sum((test_maps[s].mean(axis=(1, 2)) - mu[i]) / sigma[i] for i, s in enumerate(scales))
    np.testing.assert_allclose(np.asarray(out['anomem']), want, rtol=1e-4, atol=1e-5)
    for s in scales:
        np.testing.assert_allclose(np.asarray(out[f'dev_{s}']), test_maps[s].mean(axis=(1, 2)),
                                   rtol=1e-5)
    want_map = sum((np.stack([np_bilinear(d, (8, 8)) for d in test_maps[s]]) - mu[i]) / sigma[i]
                   for i, s in enumerate(scales))
    assert out['anomem_map'].shape == (5, 8, 8)
    np.testing.assert_allclose(np.asarray(out['anomem_map']), want_map, rtol=1e-4, atol=1e-4)
    # Train images score around 0 on average (inverse-std normalisation on normal data).
    train_out = anomem.scores(scoring, {s: jnp.asarray(v, jnp.float32)
                                        for s, v in train_maps.items()}, scales, (8, 8))
    assert abs(float(jnp.mean(train_out['anomem']))) < 1e-4


def test_classifier_bce_matches_numpy():
    rng = np.random.default_rng(4)
    ln, la = rng.normal(size=7) * 3, rng.normal(size=3) * 3
    p = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    want = 0.5 * (np.mean(-np.log(1 - p(ln))) + np.mean(-np.log(p(la))))
    got = float(anomem.classifier_bce(jnp.asarray(ln, jnp.float32), jnp.asarray(la, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ----------------------------------------------------------------------------- oe.max_images

def test_oe_max_images_is_a_seeded_subset(npz):
    config = anomem_config(npz, **{'oe.source': 'other_classes'})
    train_set = sources.load_split(config.data, 'train')
    normal = np.flatnonzero(train_set.labels == 0)
    _, everything = loop.outlier_source(config, train_set, normal, (0,))
    assert len(everything) == 32  # 0 = all of classes 1 and 2

    config.oe.max_images = 3
    _, idx = loop.outlier_source(config, train_set, normal, (0,))
    subset = np.unique(idx)
    assert len(subset) == 3 and set(train_set.labels[subset]) <= {1, 2}
    # Repeated to a whole batch (8), every outlier equally often.
    assert len(idx) >= config.batch_size
    assert set(np.bincount(idx)[subset]) == {len(idx) // 3}
    np.testing.assert_array_equal(loop.outlier_source(config, train_set, normal, (0,))[1], idx)
    config.seed = 1
    others = [np.unique(loop.outlier_source(config, train_set, normal, (0,))[1])]
    for seed in (2, 3, 4):
        config.seed = seed
        others.append(np.unique(loop.outlier_source(config, train_set, normal, (0,))[1]))
    assert any(not np.array_equal(o, subset) for o in others)  # the seed picks the subset
    config.oe.max_images = 100  # more than there are: all of them
    np.testing.assert_array_equal(loop.outlier_source(config, train_set, normal, (0,))[1],
                                  everything)
    config.oe.max_images = -1
    with pytest.raises(ConfigError, match='oe.max_images'):
        loop.outlier_source(config, train_set, normal, (0,))
    with pytest.raises(ConfigError, match='oe.max_images'):
        jc.validate_config(config)


# ----------------------------------------------------------------------------- model

def test_encoder_keeps_resnet_parameter_names_and_config_checks(npz):
    config = anomem_config(npz)
    method = get_method(config)
    shapes = jax.eval_shape(lambda k: method.init_variables(k, (8, 8, 3)), jax.random.key(0))
    ref = resnet.build_model(config.model, num_shifts=0)
    ref_shapes = jax.eval_shape(lambda k: ref.init(k, jnp.zeros((2, 8, 8, 3)), train=False),
                                jax.random.key(0))
    for col in ('params', 'batch_stats'):
        got = flax.traverse_util.flatten_dict(shapes[col]['encoder'], sep='/')
        want = flax.traverse_util.flatten_dict(ref_shapes[col]['encoder'], sep='/')
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    assert shapes['params']['memory_layer3']['prototypes'].shape == (8, 4 * 4)
    assert 'memory_layer1' not in shapes['params'] and 'classifier' not in shapes['params']
    assert method.headline_score == 'anomem' and method.paper_one_class(['a']) is None
    for key, value, match in (('anomem.scales', ('layer5',), 'scales'),
                              ('anomem.scales', ('layer3', 'layer2'), 'stage order'),
                              ('anomem.memory_mix', 'add', 'memory_mix'),
                              ('anomem.var_gamma', -1.0, 'var_gamma'),
                              ('anomem.few_anomalies', True, 'oe.source')):
        with pytest.raises(ConfigError, match=match):
            jc.validate_config(anomem_config(npz, **{key: value}))


def test_gradients_reach_the_memory_as_documented(npz):
    """NT-Xent (through the projection) trains the memory (replace mode); the classifier's
    logit sends nothing back into the encoder or the memories (stop-gradient maps); the
    stop-gradient pull moves the memory, not the features."""
    config = anomem_config(npz, **{'anomem.few_anomalies': True, 'oe.source': 'other_classes'})
    method = get_method(config)
    v = jax.jit(lambda k: method.init_variables(k, (8, 8, 3)))(jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 8, 8, 3)), jnp.float32)

    def outputs(params):
        out = method.model.apply({'params': params, 'batch_stats': v['batch_stats']}, x,
                                 train=False)
        return jnp.stack([jnp.sum(jnp.sin(out['proj'])), jnp.sum(out['cls_logit'])])
    jac = jax.jit(jax.jacrev(outputs))(v['params'])  # one batched backward pass, one compile
    g_proj, g_cls = (jax.tree_util.tree_map(lambda a, i=i: a[i], jac) for i in range(2))
    norm = lambda tree: float(sum(jnp.sum(jnp.abs(a)) for a in jax.tree_util.tree_leaves(tree)))  # noqa: E731
    for s in ('layer2', 'layer3', 'layer4'):
        assert norm(g_proj[f'memory_{s}']) > 0
        assert norm(g_cls[f'memory_{s}']) == 0.0
    assert norm(g_proj['classifier']) == 0.0 and norm(g_proj['encoder']) > 0
    assert norm(g_cls['encoder']) == 0.0 and norm(g_cls['classifier']) > 0

    # The pull / hinge deviation: gradient to the prototypes only (pull_stop_grad).
    q = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 3, 4 * 4)), jnp.float32)
    params = {'memory_layer3': {'prototypes': v['params']['memory_layer3']['prototypes']}}
    pull = lambda p, q: jnp.mean(method._memory_deviation(p, 'layer3', q))  # noqa: E731
    g_mem, g_q = jax.grad(pull, argnums=(0, 1))(params, q)
    assert norm(g_mem) > 0 and norm(g_q) == 0.0
    # Its value: ||q - r||^2 / C with r the retrieval (NumPy reference above).
    m = np.asarray(params['memory_layer3']['prototypes'], np.float64)
    r = np_retrieve(np.asarray(q, np.float64), m, config.anomem.beta)
    np.testing.assert_allclose(float(pull(params, q)),
                               np.mean(((np.asarray(q) - r) ** 2).sum(-1)) / 16, rtol=1e-4)


# ----------------------------------------------------------------------------- end to end

def test_one_class_end_to_end(npz, tmp_path):
    """The one-class plumbing (scores, metrics). No AUROC floor: at this scale the one-class
    `anomem` score does not separate trained from untrained runs over seeds (measured in
    test_few_anomaly_end_to_end's docstring); that test's classifier floor covers AnoMem."""
    results = train.train_and_evaluate(anomem_config(npz), str(tmp_path))
    saved = json.loads((tmp_path / 'results.json').read_text())
    assert saved['headline_score'] == 'anomem'
    assert set(saved['scores']) == {'anomem', 'dev_layer2', 'dev_layer3', 'dev_layer4'}
    assert all(np.isfinite(s['image_AUROC']) for s in saved['scores'].values())
    assert results['image_AUROC'] == saved['scores']['anomem']['image_AUROC']
    with open(tmp_path / 'metrics.jsonl') as f:
        lines = [json.loads(line) for line in f]
    assert all(np.isfinite(m['loss']) and 'loss_var' in m and 'loss_pull' in m for m in lines)


def test_one_class_table_with_anomaly_maps(npz, tmp_path):
    """normal_class=0,1 (the one-class table): the (N, H, W) `anomem_map` stays out of the
    image metrics, which every member gets for its image scores."""
    config = anomem_config(npz)
    jc.set_normal_classes(config, '0,1')
    config.table.stack_mode = 'vmap'  # one model's compile for both (unroll: 2x)
    results = train.train_and_evaluate(config, str(tmp_path))
    assert [r['name'] for r in results['classes']] == ['0', '1']
    for r in results['classes']:
        assert set(r['scores']) == {'anomem', 'dev_layer2', 'dev_layer3', 'dev_layer4'}
        assert np.isfinite(r['image_AUROC']) and 'pixel' not in r
    assert np.isfinite(results['mean']['image_AUROC'])


def few_anomaly_config(tmp_path):
    """test_few_anomaly_end_to_end's config, its data written under `tmp_path` (also what
    benchmarks/e2e_floors.py measures)."""
    npz = make_rotated_npz(tmp_path / 'rotated.npz', tint=None)
    return anomem_config(npz, **{'anomem.few_anomalies': True, 'anomem.hinge_weight': 1.0,
                                 'oe.source': 'other_classes', 'oe.max_images': 16,
                                 'total_steps': 400, 'optim.epochs': 100, 'log_every': 100,
                                 'num_devices': 1})


def test_few_anomaly_end_to_end(tmp_path):
    """Few-anomaly AnoMem, 400 steps on make_rotated_npz without tint (normal: a bar along
    the top edge; anomalies and the 16 labelled outliers: the images turned 90 and 180
    degrees), classifier image_AUROC >= 0.75; the test runs seed 0.

    Measured by `python benchmarks/e2e_floors.py --tests=anomem_few` (2026-12-07; the
    suite's XLA flags: 8 emulated CPU devices, of which this config uses 1,
    --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false; this config;
    trained re-measured after the per-epoch NumPy data order (issue 27) by `python
    benchmarks/e2e_floors.py --tests=mcl,msc,oecl,self_oecl,csi,anomem_few,recontrast
    --modes=trained,lr0 --jobs=2`, 2026-12-07), `classifier` image_AUROC, seeds 0-5: trained
    400 steps with 16 outliers 1.000 0.938 0.984 1.000 1.000 0.977 (the previous data order,
    Grain's per-element index shuffle: 1.000 0.977 0.742 0.977 0.484 0.914, seed 4 rerun:
    0.484 again); untrained (0 steps: Run.train replaced by the identity, the initial state
    scored) 0.117 0.664 0.398 0.531 0.289 0.203.
    Under --xla_backend_optimization_level=0 alone the trained values were 0.922 0.977 1.000
    1.000 1.000 0.844, and with the config on all 8 emulated devices 0.977 1.000 0.875 1.000
    1.000 0.852, at 2.3x the wall time (109 s against 48 s): one device here. The floor was
    set between the highest untrained and the lowest trained value of those runs; under
    today's flags every seed now trains above it, but in the previous data order seeds 2 and
    4 trained below it, so it is meant for the seed the test runs (1.000 trained against
    0.117 untrained at seed 0), not for every seed. The earlier set-up (200
    steps, 8 outliers) gave 1.000 0.891 0.992 0.852 1.000 0.688 here and 0.789 at seed 0 on
    the CI machine (its 90-degree class at 0.578): too close to chance at that budget. The
    one-class `anomem` score of the one-class run has no such floor at this budget
    (trained 200 steps, seeds 0-4: 0.891 0.820 0.555 0.719 0.508; untrained, seeds 0-5:
    0.484 0.109 0.672 0.617 0.773 0.516; RESULTS.md: 56 % on Fashion-MNIST class 0).
    """
    config = few_anomaly_config(tmp_path)
    assert config.seed == 0
    train.train_and_evaluate(config, str(tmp_path))
    saved = json.loads((tmp_path / 'results.json').read_text())
    assert saved['headline_score'] == 'classifier'
    assert {'classifier', 'anomem'} <= set(saved['scores'])
    assert all(np.isfinite(s['image_AUROC']) for s in saved['scores'].values())
    assert saved['image_AUROC'] >= 0.75, saved['image_AUROC']
    with open(tmp_path / 'metrics.jsonl') as f:
        lines = [json.loads(line) for line in f]
    assert all(np.isfinite(m['loss_cls']) and np.isfinite(m['loss_hinge']) for m in lines)


def test_config_files():
    import configs.anomem_cifar
    import configs.anomem_cifar_fewshot
    import configs.anomem_fmnist
    one = configs.anomem_cifar.get_config('normal_class=3,dataset=cifar100')
    assert (one.method, one.data.source, one.data.tfds_name) == ('anomem', 'tfds', 'cifar100')
    assert one.data.normal_classes == (3,) and not one.anomem.few_anomalies
    few = configs.anomem_cifar_fewshot.get_config('num_anomalies=5,seed=2')
    assert (few.data.source, few.data.tfds_name, few.seed) == ('tfds', 'cifar10', 2)
    assert (few.anomem.few_anomalies, few.oe.source, few.oe.max_images) == (
        True, 'other_classes', 5)
    jc.validate_config(few)
    with pytest.raises(ConfigError, match='num_anomalies'):
        configs.anomem_cifar_fewshot.get_config('num_anomalies=0')
    fm = configs.anomem_fmnist.get_config('normal_class=1,width=16')
    assert (fm.data.source, fm.model.width, fm.data.image_size) == ('fashion_mnist', 16, 28)
