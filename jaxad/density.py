"""Shared density evaluators on feature banks: kNN, GDE, KDE, class-wise Mahalanobis.

One place for the formulas (issue 4). Every score is float32, jittable with static
block sizes, and oriented **higher = more anomalous** (jaxad's metric convention).

Notation: test features x (N, D), train bank b_1..b_M (M, D), x_hat = x / max(||x||, 1e-12).

- kNN (`knn_scores`): the k smallest distances d_(1) <= ... <= d_(k) from x to the bank,
  reduced by 'mean' (1/k sum), 'sum' or 'kth' (d_(k)). Metrics:
    'cosine': d = 1 - <x_hat, b_hat>
    'l2':     d = ||x - b||
    'sql2':   d = ||x - b||^2 = ||x||^2 + ||b||^2 - 2<x, b>  (clamped at 0)
  ('l2'/'sql2' use the features as given, or x_hat/b_hat with normalize=True.)
  On unit vectors ||a - b||^2 = 2 - 2 cos(a, b), so MSC's score (docs/methods.md §3.3,
  faiss IndexFlatL2 on normalised phi, k = 2, summed) is
  knn_scores(phi, bank, k=2, metric='sql2', reduce='sum', normalize=True)
  = 2 * knn_scores(phi, bank, k=2, metric='cosine', reduce='sum'), equal up to float rounding.
  CSI's `knn_cosine` is metric='cosine', reduce='mean'.
- GDE (`fit_gde`/`gde_scores`): mu = mean_m b_m, S = 1/(M - ddof) sum_m (b_m - mu)(b_m - mu)^T
  (ddof = 0: the maximum-likelihood covariance of sklearn EmpiricalCovariance/GaussianMixture),
  C = S + ridge * I = L L^T (Cholesky). score(x) = (x - mu)^T C^-1 (x - mu) = ||L^-1 (x - mu)||^2,
  the squared Mahalanobis distance, by a triangular solve (no inverse). kind='nll' gives
  -log N(x; mu, C) = score / 2 + log|C| / 2 + D/2 log(2 pi) instead (same ranking).
- KDE (`kde_scores`): score(x) = -log sum_m exp(<x_hat, b_hat_m> / tau), an online log-sum-exp
  over bank blocks. DROC's `-logsumexp(2 gamma sim) / gamma` is 2 tau times this with
  tau = 1 / (2 gamma): the same ranking.
- Class-wise Mahalanobis (`fit_class_mahalanobis`/`class_mahalanobis_scores`): per-class
  means mu_c; covariance tied, S = 1/(M - ddof C) sum_c sum_{m in c} (b_m - mu_c)(b_m - mu_c)^T,
  or per class, S_c = 1/(n_c - ddof) sum_{m in c} (...)(...)^T; + ridge * I; score(x) =
  min_c (x - mu_c)^T C_c^-1 (x - mu_c) over classes with at least one bank row. MCL's SEI
  (docs/methods.md §4.4) uses the square root, ddof = 1, ridge 1e-9 and labels class + C * rotation;
  sqrt is monotone, so min_c of either gives the same ranking.

Blocking: the bank is padded to a multiple of `bank_block` and test rows to a multiple of
`test_block` (each clamped to the array's size). Padded bank rows are masked to distance
+inf (similarity -inf), so they are never among the top k and add exp(-inf) = 0 to the KDE;
k <= M guarantees k real candidates. Only one (test_block, bank_block) tile exists at a time:
`lax.map` over test blocks, `lax.scan` over bank blocks carrying the running top k
(merged as top_k([running, top_k(tile)])) and the running log-sum-exp.

`fit(names, bank, cfg)` / `score(names, state, test, cfg)` select several evaluators by name
(`DENSITY_SCORERS`) and score them together in one jitted pass over the test blocks that
scans the bank once (kNN and KDE share the cosine tile). `jaxad.methods.base.with_density`
attaches them to a method so its scoring state (checkpointed) and score dict include them.
"""
import collections
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

KNN_METRICS = ('cosine', 'l2', 'sql2')
KNN_REDUCES = ('mean', 'sum', 'kth')
GDE_KINDS = ('mahalanobis', 'nll')

# Traces of each jitted entry point (a Python side effect, run only while tracing):
# a repeated call with the same shapes and static arguments must not add to it.
TRACE_COUNTS = collections.Counter()

_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 on GPUs: distances exact to f32 rounding


def l2_normalize(x, eps=1e-12):
    """x / max(||x||, eps) along the last axis (zero rows stay zero)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def _check_2d(name, x):
    if x.ndim != 2:
        raise ValueError(f'{name} must be 2-D (rows, features), got shape {x.shape}')


def _check_pair(test, bank):
    _check_2d('test', test)
    _check_2d('bank', bank)
    if test.shape[1] != bank.shape[1]:
        raise ValueError(f'test and bank feature sizes differ: {test.shape[1]} vs {bank.shape[1]}')
    if bank.shape[0] < 1:
        raise ValueError('the bank is empty')


def _check_block(name, value):
    if int(value) < 1:
        raise ValueError(f'{name} must be >= 1, got {value}')


def _pad_rows(x, multiple):
    pad = (-x.shape[0]) % multiple
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x


# ---------------------------------------------------------------------------------------------
# The blockwise bank pass shared by kNN and KDE.

class _BankSpec(NamedTuple):
    """Static description of what one pass over the bank computes."""
    k: int = 0             # 0: no kNN
    metric: str = 'cosine'
    normalize: bool = False
    tau: float = 0.0       # 0: no KDE


def _prepare_bank(bank, spec, bank_block):
    """Bank blocks (nb, bb, ...) and their validity mask; padding is masked out."""
    m = bank.shape[0]
    bb = min(bank_block, m)
    valid = _pad_rows(jnp.ones((m,), bool), bb).reshape(-1, bb)
    blocks = {}
    if spec.tau or (spec.k and spec.metric == 'cosine') or (spec.k and spec.normalize):
        blocks['unit'] = _pad_rows(l2_normalize(bank), bb).reshape(-1, bb, bank.shape[1])
    if spec.k and spec.metric != 'cosine':
        raw = blocks['unit'] if spec.normalize else _pad_rows(bank, bb).reshape(
            -1, bb, bank.shape[1])
        blocks['raw'] = raw
        blocks['sq'] = jnp.sum(jnp.square(raw), axis=-1)
    return blocks, valid


def _bank_pass(q, blocks, valid, spec):
    """One scan over the bank blocks for a test block q (tb, D).

    Returns {'knn': (tb, k) ascending distances, 'lse': (tb,) log sum exp(cos / tau)}
    for the parts `spec` asks for.
    """
    tb = q.shape[0]
    bb = valid.shape[1]
    qs = {}
    if 'unit' in blocks:
        qs['unit'] = l2_normalize(q)
    if 'raw' in blocks:
        qs['raw'] = qs['unit'] if spec.normalize else q
        qs['sq'] = jnp.sum(jnp.square(qs['raw']), axis=-1)
    carry = {}
    if spec.k:
        carry['knn'] = jnp.full((tb, spec.k), -jnp.inf, jnp.float32)  # negated distances
    if spec.tau:
        carry['lse'] = jnp.full((tb,), -jnp.inf, jnp.float32)

    def body(carry, xs):
        blk, ok = xs
        out = {}
        cos = None
        if 'unit' in blk and (spec.tau or spec.metric == 'cosine'):
            cos = jnp.dot(qs['unit'], blk['unit'].T, precision=_HIGHEST)
        if spec.k:
            if spec.metric == 'cosine':
                dist = 1.0 - cos
            else:
                cross = jnp.dot(qs['raw'], blk['raw'].T, precision=_HIGHEST)
                dist = jnp.maximum(qs['sq'][:, None] + blk['sq'][None, :] - 2.0 * cross, 0.0)
                if spec.metric == 'l2':
                    dist = jnp.sqrt(dist)
            neg = jnp.where(ok[None, :], -dist, -jnp.inf)
            tile_top = jax.lax.top_k(neg, min(spec.k, bb))[0]
            merged = jnp.concatenate([carry['knn'], tile_top], axis=1)
            out['knn'] = jax.lax.top_k(merged, spec.k)[0]
        if spec.tau:
            logits = jnp.where(ok[None, :], cos / spec.tau, -jnp.inf)
            out['lse'] = jnp.logaddexp(carry['lse'], jax.nn.logsumexp(logits, axis=1))
        return out, None

    carry, _ = jax.lax.scan(body, carry, (blocks, valid))
    result = {}
    if spec.k:
        result['knn'] = -carry['knn']
    if spec.tau:
        result['lse'] = carry['lse']
    return result


def _map_test_blocks(fn, test, test_block):
    """fn(block (tb, D)) -> pytree of (tb, ...) for every test block; rows concatenated."""
    n = test.shape[0]
    tb = max(min(test_block, n), 1)
    blocks = _pad_rows(test.astype(jnp.float32), tb).reshape(-1, tb, test.shape[1])
    out = jax.lax.map(fn, blocks)
    return jax.tree_util.tree_map(lambda y: y.reshape((-1,) + y.shape[2:])[:n], out)


def _reduce_knn(dist, reduce):
    if reduce == 'mean':
        return jnp.mean(dist, axis=1)
    if reduce == 'sum':
        return jnp.sum(dist, axis=1)
    return dist[:, -1]


def _check_knn(test, bank, k, metric, reduce, test_block, bank_block):
    _check_pair(test, bank)
    if metric not in KNN_METRICS:
        raise ValueError(f'unknown kNN metric {metric!r}; choose one of {KNN_METRICS}')
    if reduce not in KNN_REDUCES:
        raise ValueError(f'unknown kNN reduce {reduce!r}; choose one of {KNN_REDUCES}')
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f'knn k={k} must be in [1, bank size {bank.shape[0]}]')
    _check_block('test_block', test_block)
    _check_block('bank_block', bank_block)


# ---------------------------------------------------------------------------------------------
# kNN

@functools.partial(jax.jit, static_argnames=('k', 'metric', 'test_block', 'bank_block',
                                             'normalize'))
def knn_distances(test, bank, k=1, metric='cosine', *, test_block=1024, bank_block=4096,
                  normalize=False):
    """(N, k) distances to the k nearest bank rows, ascending (formulas: module docstring).

    Exact: a running top-k over bank blocks, never more than one (test_block, bank_block)
    tile of the test x bank matrix at a time.
    """
    TRACE_COUNTS['knn_distances'] += 1
    _check_knn(test, bank, k, metric, 'mean', test_block, bank_block)
    spec = _BankSpec(k=k, metric=metric, normalize=normalize)
    blocks, valid = _prepare_bank(bank.astype(jnp.float32), spec, bank_block)
    return _map_test_blocks(lambda q: _bank_pass(q, blocks, valid, spec)['knn'], test,
                            test_block)


@functools.partial(jax.jit, static_argnames=('k', 'metric', 'reduce', 'test_block',
                                             'bank_block', 'normalize'))
def knn_scores(test, bank, k=1, metric='cosine', reduce='mean', *, test_block=1024,
               bank_block=4096, normalize=False):
    """kNN anomaly score (N,): the k smallest distances reduced by mean | sum | kth.

    metric 'cosine': 1 - cos; 'l2': ||x - b||; 'sql2': ||x - b||^2 (on raw features, or on
    l2-normalised ones with normalize=True). Higher = farther from the bank = more anomalous.
    MSC (k=2, summed squared L2 on normalised features): k=2, metric='sql2', reduce='sum',
    normalize=True, which equals 2x the metric='cosine', reduce='sum' score.
    """
    TRACE_COUNTS['knn_scores'] += 1
    _check_knn(test, bank, k, metric, reduce, test_block, bank_block)
    spec = _BankSpec(k=k, metric=metric, normalize=normalize)
    blocks, valid = _prepare_bank(bank.astype(jnp.float32), spec, bank_block)
    return _map_test_blocks(
        lambda q: _reduce_knn(_bank_pass(q, blocks, valid, spec)['knn'], reduce), test,
        test_block)


# ---------------------------------------------------------------------------------------------
# KDE

@functools.partial(jax.jit, static_argnames=('temperature', 'test_block', 'bank_block'))
def kde_scores(test, bank, temperature=0.1, *, test_block=1024, bank_block=4096):
    """-log sum_m exp(<x_hat, b_hat_m> / temperature), an online log-sum-exp over bank blocks.

    Cosine similarity on l2-normalised features; higher = less bank mass nearby = more
    anomalous. (DROC's -logsumexp(2 gamma sim) / gamma ranks the same with tau = 1/(2 gamma).)
    """
    TRACE_COUNTS['kde_scores'] += 1
    _check_pair(test, bank)
    if not temperature > 0:
        raise ValueError(f'kde temperature must be > 0, got {temperature}')
    _check_block('test_block', test_block)
    _check_block('bank_block', bank_block)
    spec = _BankSpec(tau=float(temperature))
    blocks, valid = _prepare_bank(bank.astype(jnp.float32), spec, bank_block)
    return _map_test_blocks(lambda q: -_bank_pass(q, blocks, valid, spec)['lse'], test,
                            test_block)


# ---------------------------------------------------------------------------------------------
# Gaussian density (GDE)

class GDEState(NamedTuple):
    """A Gaussian fitted on the bank: C = cov + ridge I = chol chol^T."""
    mean: jax.Array    # (D,)
    chol: jax.Array    # (D, D) lower-triangular
    logdet: jax.Array  # () log |C|


def _as(cls, state):
    """A state NamedTuple from itself, its `_asdict()` or a plain tuple."""
    return cls(**state) if isinstance(state, dict) else cls(*state)


def _chol_logdet(chol):
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)


@functools.partial(jax.jit, static_argnames=('ddof',))
def fit_gde(bank, ridge=1e-6, ddof=0):
    """mean and Cholesky factor of cov + ridge I, cov = 1/(M - ddof) sum (b - mu)(b - mu)^T."""
    TRACE_COUNTS['fit_gde'] += 1
    _check_2d('bank', bank)
    if bank.shape[0] - ddof < 1:
        raise ValueError(f'GDE needs more than ddof={ddof} bank rows, got {bank.shape[0]}')
    bank = bank.astype(jnp.float32)
    mean = jnp.mean(bank, axis=0)
    centred = bank - mean
    cov = jnp.dot(centred.T, centred, precision=_HIGHEST) / (bank.shape[0] - ddof)
    chol = jnp.linalg.cholesky(cov + ridge * jnp.eye(bank.shape[1], dtype=jnp.float32))
    return GDEState(mean=mean, chol=chol, logdet=_chol_logdet(chol))


def _sq_mahalanobis(chol, centred):
    """||L^-1 c||^2 for rows c of `centred` (R, D) and one lower factor L (D, D)."""
    z = solve_triangular(chol, centred.T, lower=True)
    return jnp.sum(jnp.square(z), axis=0)


@functools.partial(jax.jit, static_argnames=('kind',))
def gde_scores(state, test, kind='mahalanobis'):
    """(x - mu)^T C^-1 (x - mu) (kind='mahalanobis', the default) or -log N(x; mu, C) ('nll').

    Both are higher = more anomalous and rank identically.
    """
    TRACE_COUNTS['gde_scores'] += 1
    if kind not in GDE_KINDS:
        raise ValueError(f'unknown GDE kind {kind!r}; choose one of {GDE_KINDS}')
    state = _as(GDEState, state)
    _check_2d('test', test)
    m2 = _sq_mahalanobis(state.chol, test.astype(jnp.float32) - state.mean)
    if kind == 'mahalanobis':
        return m2
    d = test.shape[1]
    return 0.5 * m2 + 0.5 * state.logdet + 0.5 * d * math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------
# Class-wise Mahalanobis

class ClassGaussians(NamedTuple):
    """Per-class means and Cholesky factors (one shared, or one per class)."""
    means: jax.Array    # (C, D)
    chol: jax.Array     # (D, D) tied, or (C, D, D) per class
    present: jax.Array  # (C,) bool: class has bank rows (absent classes are ignored)


@functools.partial(jax.jit, static_argnames=('num_classes', 'shared_cov', 'ddof'))
def fit_class_mahalanobis(bank, labels, num_classes, ridge=1e-6, shared_cov=True, ddof=0):
    """Per-class means; tied covariance (pooled within-class scatter / (M - ddof C)) or
    per-class covariances (scatter_c / (n_c - ddof)); each + ridge I, Cholesky-factored.

    labels: int (M,) in [0, num_classes). A class without rows is marked absent; with
    shared_cov=False a class needs more than ddof rows (or ridge > 0 for a usable factor).
    """
    TRACE_COUNTS['fit_class_mahalanobis'] += 1
    _check_2d('bank', bank)
    if labels.shape != (bank.shape[0],):
        raise ValueError(f'labels must have shape ({bank.shape[0]},), got {labels.shape}')
    bank = bank.astype(jnp.float32)
    d = bank.shape[1]
    labels = labels.astype(jnp.int32)
    counts = jax.ops.segment_sum(jnp.ones_like(labels, jnp.float32), labels, num_classes)
    sums = jax.ops.segment_sum(bank, labels, num_classes)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    centred = bank - means[labels]
    eye = jnp.eye(d, dtype=jnp.float32)
    if shared_cov:
        cov = jnp.dot(centred.T, centred, precision=_HIGHEST) / (bank.shape[0] - ddof * num_classes)
        chol = jnp.linalg.cholesky(cov + ridge * eye)
    else:
        onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # (M, C)
        scatter = jnp.einsum('mc,md,me->cde', onehot, centred, centred, precision=_HIGHEST)
        cov = scatter / jnp.maximum(counts - ddof, 1.0)[:, None, None]
        chol = jnp.linalg.cholesky(cov + ridge * eye)
    return ClassGaussians(means=means, chol=chol, present=counts > 0)


@jax.jit
def class_mahalanobis_scores(state, test):
    """min over present classes c of (x - mu_c)^T C_c^-1 (x - mu_c); higher = more anomalous."""
    TRACE_COUNTS['class_mahalanobis_scores'] += 1
    state = _as(ClassGaussians, state)
    _check_2d('test', test)
    test = test.astype(jnp.float32)
    diff = test[:, None, :] - state.means[None]  # (N, C, D)
    n, c, d = diff.shape
    if state.chol.ndim == 2:
        m2 = _sq_mahalanobis(state.chol, diff.reshape(n * c, d)).reshape(n, c)
    else:
        m2 = jax.vmap(_sq_mahalanobis, in_axes=(0, 1), out_axes=1)(state.chol, diff)
    return jnp.min(jnp.where(state.present[None, :], m2, jnp.inf), axis=1)


# ---------------------------------------------------------------------------------------------
# Registry and one-pass dispatcher

class DensityConfig(NamedTuple):
    """Static (hashable) settings of the density evaluators."""
    knn_k: int = 1
    knn_metric: str = 'cosine'
    knn_reduce: str = 'mean'
    knn_normalize: bool = False
    gde_ridge: float = 1e-6
    gde_kind: str = 'mahalanobis'
    kde_temperature: float = 0.1
    maha_ridge: float = 1e-6
    maha_shared_cov: bool = True
    maha_num_classes: int = 1
    ddof: int = 0
    test_block: int = 1024
    bank_block: int = 4096

    @classmethod
    def from_config(cls, eval_cfg):
        """From `config.eval`; fields it lacks keep their defaults."""
        kwargs = {}
        for name in cls._fields:
            key = {'test_block': 'density_test_block', 'bank_block': 'density_bank_block',
                   'ddof': 'density_ddof'}.get(name, name)
            if key in eval_cfg:
                kwargs[name] = type(cls._field_defaults[name])(eval_cfg[key])
        return cls(**kwargs)


class DensityScorer(NamedTuple):
    """fit(bank, labels, cfg) -> dict of arrays (the saved state); uses_bank: needs the raw bank."""
    fit: object
    uses_bank: bool


def _fit_gde_state(bank, labels, cfg):
    del labels
    return fit_gde(bank, cfg.gde_ridge, ddof=cfg.ddof)._asdict()


def _fit_maha_state(bank, labels, cfg):
    if labels is None:
        labels = jnp.zeros((bank.shape[0],), jnp.int32)
    return fit_class_mahalanobis(bank, labels, cfg.maha_num_classes, cfg.maha_ridge,
                                 shared_cov=cfg.maha_shared_cov, ddof=cfg.ddof)._asdict()


DENSITY_SCORERS = {
    'knn': DensityScorer(fit=None, uses_bank=True),
    'kde': DensityScorer(fit=None, uses_bank=True),
    'gde': DensityScorer(fit=_fit_gde_state, uses_bank=False),
    'mahalanobis': DensityScorer(fit=_fit_maha_state, uses_bank=False),
}


def config_names(eval_cfg):
    """The evaluator names of `eval.density`, however given: ('knn', 'gde'), 'knn,gde', or
    ('knn,gde',), which is what `--config.eval.density=knn,gde` parses to."""
    names = eval_cfg.get('density', ()) or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(part.strip() for n in names for part in n.split(',') if part.strip())


def check_names(names):
    """`names` as a tuple of known, distinct evaluator names (ValueError otherwise)."""
    return _names(names)


def _names(names):
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in DENSITY_SCORERS]
    if unknown:
        raise ValueError(f'unknown density evaluator(s) {unknown}; choose from '
                         f'{", ".join(DENSITY_SCORERS)}')
    if len(set(names)) != len(names):
        raise ValueError(f'density evaluators named twice: {names}')
    return names


def _cfg(cfg):
    if cfg is None:
        return DensityConfig()
    return cfg if isinstance(cfg, DensityConfig) else DensityConfig.from_config(cfg)


@functools.partial(jax.jit, static_argnames=('names', 'cfg'))
def _fit(names, bank, labels, cfg):
    TRACE_COUNTS['fit'] += 1
    _check_2d('bank', bank)
    state = {}
    if any(DENSITY_SCORERS[n].uses_bank for n in names):
        state['bank'] = bank.astype(jnp.float32)
    for n in names:
        if DENSITY_SCORERS[n].fit is not None:
            state[n] = DENSITY_SCORERS[n].fit(bank, labels, cfg)
    return state


def fit(names, bank, cfg=None, labels=None):
    """The state of the evaluators `names` (a dict of arrays, checkpointable) from the bank.

    labels (M,) ints: classes for 'mahalanobis' (None: one class, which is the tied GDE).
    """
    return _fit(_names(names), bank, labels, _cfg(cfg))


@functools.partial(jax.jit, static_argnames=('names', 'cfg'))
def _score(names, state, test, cfg):
    TRACE_COUNTS['score'] += 1
    _check_2d('test', test)
    spec = _BankSpec(k=cfg.knn_k if 'knn' in names else 0, metric=cfg.knn_metric,
                     normalize=cfg.knn_normalize,
                     tau=float(cfg.kde_temperature) if 'kde' in names else 0.0)
    _check_block('test_block', cfg.test_block)
    _check_block('bank_block', cfg.bank_block)
    if 'kde' in names and not cfg.kde_temperature > 0:
        raise ValueError(f'kde_temperature must be > 0, got {cfg.kde_temperature}')
    if 'knn' in names or 'kde' in names:
        bank = state['bank']
        _check_pair(test, bank)
        if 'knn' in names:
            _check_knn(test, bank, cfg.knn_k, cfg.knn_metric, cfg.knn_reduce, cfg.test_block,
                       cfg.bank_block)
        blocks, valid = _prepare_bank(bank, spec, cfg.bank_block)

    def one_block(q):
        out = {}
        if spec.k or spec.tau:
            passed = _bank_pass(q, blocks, valid, spec)
            if spec.k:
                out['knn'] = _reduce_knn(passed['knn'], cfg.knn_reduce)
            if spec.tau:
                out['kde'] = -passed['lse']
        if 'gde' in names:
            out['gde'] = gde_scores(state['gde'], q, kind=cfg.gde_kind)
        if 'mahalanobis' in names:
            out['mahalanobis'] = class_mahalanobis_scores(state['mahalanobis'], q)
        return out

    return _map_test_blocks(one_block, test, cfg.test_block)


def score(names, state, test, cfg=None):
    """{name: (N,) scores} of the evaluators `names`, all in one jitted pass over test blocks.

    Same values as the individual functions with the same settings; higher = more anomalous.
    """
    names = _names(names)
    out = _score(names, state, test, _cfg(cfg))
    return {n: out[n] for n in names}  # jit returns dicts with sorted keys
