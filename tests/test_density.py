"""Density evaluators (jaxad/density.py) against independent NumPy/SciPy/sklearn references.

Sizes are deliberately not multiples of the blocks (37 test x 53 bank x 16 dims, blocks of
8 and 16), so the test-row and bank padding is exercised everywhere.
"""
import numpy as np
import pytest
import scipy.special
import scipy.stats
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

from jaxad import density
from jaxad.methods.base import with_density

N, M, D = 37, 53, 16
BLOCKS = dict(test_block=8, bank_block=16)


@pytest.fixture(scope='module')
def data():
    rng = np.random.default_rng(0)
    test = rng.normal(size=(N, D)).astype(np.float32)
    bank = (rng.normal(size=(M, D)) * np.linspace(0.5, 2.0, D) + 0.3).astype(np.float32)
    return test, bank


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_distances(test, bank, metric, normalize=False):
    """Full (N, M) distance matrix in float64."""
    t, b = np.asarray(test, np.float64), np.asarray(bank, np.float64)
    if metric == 'cosine':
        return 1.0 - unit(t) @ unit(b).T
    if normalize:
        t, b = unit(t), unit(b)
    sq = ((t[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return sq if metric == 'sql2' else np.sqrt(sq)


def reduce_ref(dist, reduce):
    return {'mean': dist.mean(1), 'sum': dist.sum(1), 'kth': dist[:, -1]}[reduce]


# ---------------------------------------------------------------------------------------------
# kNN

@pytest.mark.parametrize('metric', ['cosine', 'l2', 'sql2'])
@pytest.mark.parametrize('k', [1, 2, 5])
def test_knn_distances_match_sklearn(data, k, metric):
    test, bank = data
    nn = NearestNeighbors(n_neighbors=k, metric='cosine' if metric == 'cosine' else 'euclidean',
                          algorithm='brute').fit(bank.astype(np.float64))
    want, _ = nn.kneighbors(test.astype(np.float64))
    if metric == 'sql2':
        want = want ** 2
    got = np.asarray(density.knn_distances(test, bank, k, metric, **BLOCKS))
    assert got.shape == (N, k)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('reduce', ['mean', 'sum', 'kth'])
def test_knn_scores_each_reduce_match_sklearn(data, reduce):
    """Each reduce for k = 1, 2, 5 (one metric each; all metrics x k: the test above)."""
    test, bank = data
    for k, metric in ((1, 'cosine'), (2, 'l2'), (5, 'cosine')):
        nn = NearestNeighbors(n_neighbors=k, algorithm='brute',
                              metric='cosine' if metric == 'cosine' else 'euclidean')
        dist = nn.fit(bank.astype(np.float64)).kneighbors(test.astype(np.float64))[0]
        got = np.asarray(density.knn_scores(test, bank, k, metric, reduce, **BLOCKS))
        np.testing.assert_allclose(got, reduce_ref(dist, reduce), rtol=2e-5, atol=2e-5,
                                   err_msg=f'k={k} {metric}')


@pytest.mark.parametrize('test_block,bank_block,k', [
    (8, 16, 5),     # neither divides 37 / 53
    (5, 3, 5),      # bank block smaller than k
    (1, 52, 2),     # one row at a time; one padded bank row
    (64, 128, 3),   # blocks larger than the arrays (clamped)
    (37, 53, 53),   # one exact tile, k = the whole bank
])
def test_blockwise_knn_matches_brute_force(data, test_block, bank_block, k):
    test, bank = data
    dist = brute_distances(test, bank, 'sql2')
    want = np.sort(dist, axis=1)[:, :k]
    got = np.asarray(density.knn_distances(test, bank, k, 'sql2', test_block=test_block,
                                           bank_block=bank_block))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-4)


def test_msc_score_is_twice_summed_cosine_distance(data):
    """MSC: k=2 summed squared L2 on normalised features = 2 * sum of (1 - cos)."""
    test, bank = data
    want = np.sort(brute_distances(test, bank, 'sql2', normalize=True), axis=1)[:, :2].sum(1)
    msc = np.asarray(density.knn_scores(test, bank, 2, 'sql2', 'sum', normalize=True, **BLOCKS))
    cos = np.asarray(density.knn_scores(test, bank, 2, 'cosine', 'sum', **BLOCKS))
    np.testing.assert_allclose(msc, want, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(msc, 2 * cos, rtol=1e-5, atol=2e-5)


def test_knn_rejects_bad_arguments(data):
    test, bank = data
    with pytest.raises(ValueError, match='k=54'):
        density.knn_scores(test, bank, 54)
    with pytest.raises(ValueError, match='metric'):
        density.knn_scores(test, bank, 1, 'manhattan')
    with pytest.raises(ValueError, match='reduce'):
        density.knn_scores(test, bank, 1, 'cosine', 'median')
    with pytest.raises(ValueError, match='feature sizes'):
        density.knn_scores(test[:, :4], bank, 1)


# ---------------------------------------------------------------------------------------------
# KDE

@pytest.mark.parametrize('temperature', [0.05, 1.0])
def test_kde_matches_scipy_logsumexp(data, temperature):
    test, bank = data
    sims = unit(test) @ unit(bank).T
    want = -scipy.special.logsumexp(sims / temperature, axis=1)
    got = np.asarray(density.kde_scores(test, bank, temperature, **BLOCKS))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# GDE

@pytest.mark.parametrize('ridge', [0.0, 0.3])
def test_gde_matches_numpy_inverse(data, ridge):
    test, bank = data
    b = bank.astype(np.float64)
    mu = b.mean(0)
    cov = np.cov(b.T, bias=True) + ridge * np.eye(D)
    prec = np.linalg.inv(cov)
    diff = test - mu
    want = np.einsum('nd,de,ne->n', diff, prec, diff)
    state = density.fit_gde(bank, ridge)
    got = np.asarray(density.gde_scores(state, test))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # scipy's Mahalanobis (sqrt of the quadratic form) on a few rows.
    for i in range(3):
        np.testing.assert_allclose(got[i], scipy_mahalanobis(test[i], mu, prec) ** 2,
                                   rtol=1e-4)
    if ridge == 0.0:
        sk = EmpiricalCovariance().fit(b).mahalanobis(test.astype(np.float64))
        np.testing.assert_allclose(got, sk, rtol=1e-4, atol=1e-4)
    nll = np.asarray(density.gde_scores(state, test, kind='nll'))
    want_nll = -scipy.stats.multivariate_normal(mu, cov).logpdf(test.astype(np.float64))
    np.testing.assert_allclose(nll, want_nll, rtol=1e-4, atol=1e-3)


def test_gde_unbiased_ddof(data):
    test, bank = data
    b = bank.astype(np.float64)
    prec = np.linalg.inv(np.cov(b.T) + 1e-3 * np.eye(D))
    diff = test - b.mean(0)
    want = np.einsum('nd,de,ne->n', diff, prec, diff)
    got = np.asarray(density.gde_scores(density.fit_gde(bank, 1e-3, ddof=1), test))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Class-wise Mahalanobis

def class_maha_ref(test, bank, labels, num_classes, ridge, shared):
    b = bank.astype(np.float64)
    t = test.astype(np.float64)
    present = [c for c in range(num_classes) if np.any(labels == c)]
    means = {c: b[labels == c].mean(0) for c in present}
    if shared:
        pooled = sum(((b[labels == c] - means[c]).T @ (b[labels == c] - means[c]))
                     for c in present) / len(b)
        precs = {c: np.linalg.inv(pooled + ridge * np.eye(D)) for c in present}
    else:
        precs = {c: np.linalg.inv(np.cov(b[labels == c].T, bias=True) + ridge * np.eye(D))
                 for c in present}
    per_class = np.stack([np.einsum('nd,de,ne->n', t - means[c], precs[c], t - means[c])
                          for c in present], axis=1)
    return per_class.min(1)


@pytest.mark.parametrize('shared', [True, False])
def test_class_mahalanobis_matches_numpy(data, shared):
    test, bank = data
    labels = np.arange(M) % 3
    ridge = 0.5
    want = class_maha_ref(test, bank, labels, 3, ridge, shared)
    state = density.fit_class_mahalanobis(bank, labels, 3, ridge, shared_cov=shared)
    got = np.asarray(density.class_mahalanobis_scores(state, test))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # An extra class with no bank rows is ignored.
    state4 = density.fit_class_mahalanobis(bank, labels, 4, ridge, shared_cov=shared)
    assert not bool(np.asarray(state4.present)[3])
    got4 = np.asarray(density.class_mahalanobis_scores(state4, test))
    np.testing.assert_allclose(got4, want, rtol=1e-4, atol=1e-4)


def test_one_class_mahalanobis_is_gde(data):
    test, bank = data
    state = density.fit_class_mahalanobis(bank, np.zeros(M, np.int32), 1, 0.1)
    got = np.asarray(density.class_mahalanobis_scores(state, test))
    want = np.asarray(density.gde_scores(density.fit_gde(bank, 0.1), test))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Compilation and the dispatcher

def test_jit_traces_once_per_shape(data):
    test, bank = data
    kw = dict(k=3, metric='l2', reduce='kth', test_block=7, bank_block=11)
    before = density.TRACE_COUNTS['knn_scores']
    first = density.knn_scores(test, bank, **kw)
    for _ in range(3):  # new arrays, same shapes: cache hits
        again = density.knn_scores(test + 0, bank * 1, **kw)
    assert density.TRACE_COUNTS['knn_scores'] == before + 1
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    density.knn_scores(test[:20], bank, **kw)  # a new shape traces again
    assert density.TRACE_COUNTS['knn_scores'] == before + 2


def test_dispatcher_matches_individual_functions(data):
    test, bank = data
    labels = np.arange(M) % 2
    cfg = density.DensityConfig(knn_k=2, knn_metric='sql2', knn_reduce='sum',
                                knn_normalize=True, gde_ridge=0.2, kde_temperature=0.1,
                                maha_ridge=0.3, maha_shared_cov=False, maha_num_classes=2,
                                test_block=8, bank_block=16)
    names = ('knn', 'gde', 'kde', 'mahalanobis')
    state = density.fit(names, bank, cfg, labels=labels)
    traces = density.TRACE_COUNTS['score']
    out = density.score(names, state, test, cfg)
    out2 = density.score(list(names), state, test + 0, cfg)
    assert density.TRACE_COUNTS['score'] == traces + 1  # one pass, compiled once
    assert list(out) == list(names)
    single = {
        'knn': density.knn_scores(test, bank, 2, 'sql2', 'sum', normalize=True, **BLOCKS),
        'gde': density.gde_scores(density.fit_gde(bank, 0.2), test),
        'kde': density.kde_scores(test, bank, 0.1, **BLOCKS),
        'mahalanobis': density.class_mahalanobis_scores(
            density.fit_class_mahalanobis(bank, labels, 2, 0.3, shared_cov=False), test),
    }
    for name in names:
        assert out[name].shape == (N,)
        np.testing.assert_allclose(np.asarray(out[name]), np.asarray(single[name]),
                                   rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(out2[name]))
    # A subset returns only what was asked, and the state of a bank-free subset has no bank.
    sub = density.score(('gde',), density.fit('gde', bank, cfg), test, cfg)
    assert list(sub) == ['gde'] and 'bank' not in density.fit('gde', bank, cfg)
    np.testing.assert_allclose(np.asarray(sub['gde']), np.asarray(single['gde']), rtol=1e-6,
                               atol=1e-6)
    with pytest.raises(ValueError, match='unknown density'):
        density.fit(('knn', 'ocsvm'), bank, cfg)


def test_config_and_method_wrapper(data):
    """with_density: the method's scoring state and scores gain the named evaluators."""
    import ml_collections
    test, bank = data
    eval_cfg = ml_collections.ConfigDict(dict(
        knn_k=2, density=('knn', 'kde'), knn_metric='cosine', kde_temperature=0.5,
        density_test_block=8, density_bank_block=16))
    cfg = density.DensityConfig.from_config(eval_cfg)
    assert (cfg.knn_k, cfg.kde_temperature, cfg.test_block, cfg.gde_ridge) == (2, 0.5, 8, 1e-6)

    class Toy:
        headline_score = 'toy'

        def fit_scoring(self, feats):
            return {'mean': feats['x'].mean(0)}

        def score(self, scoring, feats):
            return {'toy': ((feats['x'] - scoring['mean']) ** 2).sum(1)}

    toy = Toy()
    assert with_density(toy, ml_collections.ConfigDict({'density': ()}),
                                lambda f: f['x']) is toy
    method = with_density(toy, eval_cfg, lambda f: f['x'])
    assert method.headline_score == 'toy'
    scoring = method.fit_scoring({'x': bank})
    scores = method.score(scoring, {'x': test})
    assert sorted(scores) == ['kde', 'knn', 'toy']
    np.testing.assert_allclose(np.asarray(scores['knn']),
                               np.asarray(density.knn_scores(test, bank, 2, **BLOCKS)),
                               rtol=1e-6, atol=1e-6)


def test_config_names_accept_the_cli_forms():
    import ml_collections
    for value, want in [((), ()), (('knn', 'gde'), ('knn', 'gde')),
                        (('knn,gde',), ('knn', 'gde')), ('kde, mahalanobis', ('kde', 'mahalanobis'))]:
        assert density.config_names(ml_collections.ConfigDict({'density': value})) == want
