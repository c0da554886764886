"""CSI losses against NumPy written from docs/methods.md §2.1 in CSI's own layout."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad import losses
from jaxad.methods import csi


def csi_ntxent_reference(z_csi, tau, eps=1e-8):
    """CSI's NT_xent: rows [view1 (K*N); view2 (K*N)], positive i <-> i + M."""
    u = z_csi / np.linalg.norm(z_csi, axis=1, keepdims=True)
    e = np.exp(u @ u.T / tau) * (1 - np.eye(len(u)))
    m = len(u) // 2
    denom = e.sum(1) + eps
    total = 0.0
    for i in range(m):
        total += -np.log(e[i, i + m] / denom[i] + eps) - np.log(e[i + m, i] / denom[i + m] + eps)
    return total / (2 * m)


def to_csi_order(x, n, k):
    """jaxad (B, 2, K) image-major rows -> CSI's (view, rotation, image) rows."""
    return x.reshape(n, 2, k, -1).transpose(1, 2, 0, 3).reshape(2 * k * n, -1)


@pytest.mark.parametrize('n,k,tau', [(3, 4, 0.5), (5, 2, 0.2), (4, 1, 0.07)])
def test_ntxent_matches_csi_reference(n, k, tau):
    rng = np.random.default_rng(n * 10 + k)
    z = rng.normal(size=(n * 2 * k, 16)).astype(np.float32)
    got = losses.nt_xent(jnp.asarray(z), csi.positive_index(n, k), tau, eps=1e-8)
    want = csi_ntxent_reference(to_csi_order(z.astype(np.float64), n, k), tau)
    np.testing.assert_allclose(float(got), want, atol=1e-5, rtol=1e-5)


def test_ntxent_without_eps_is_simclr():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(12, 8))
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    logits = u @ u.T / 0.1
    np.fill_diagonal(logits, -np.inf)
    pos = np.arange(12).reshape(6, 2)[:, ::-1].reshape(-1)
    logsumexp = np.log(np.exp(logits).sum(1))
    want = np.mean(logsumexp - logits[np.arange(12), pos])
    got = losses.nt_xent(jnp.asarray(z, jnp.float32), jnp.asarray(pos), 0.1, eps=0.0)
    np.testing.assert_allclose(float(got), want, atol=1e-5, rtol=1e-5)


def test_positive_pairs_are_the_other_view_same_rotation():
    n, k = 3, 4
    pos = np.asarray(csi.positive_index(n, k))
    for b in range(n):
        for v in range(2):
            for r in range(k):
                assert pos[(b * 2 + v) * k + r] == (b * 2 + 1 - v) * k + r
    assert np.array_equal(pos[pos], np.arange(len(pos)))


def test_shift_cross_entropy_matches_numpy():
    rng = np.random.default_rng(1)
    n, k = 4, 4
    logits = rng.normal(size=(n * 2 * k, k)) * 3
    labels = np.asarray(csi.shift_labels(n, k))
    assert list(labels[:2 * k]) == [0, 1, 2, 3, 0, 1, 2, 3]
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    want = -np.mean(logp[np.arange(len(labels)), labels])
    got = losses.softmax_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
    np.testing.assert_allclose(float(got), want, atol=1e-5, rtol=1e-5)


def test_loss_and_aux_sums_terms():
    rng = np.random.default_rng(2)
    n, k = 2, 4
    out = {'proj': jnp.asarray(rng.normal(size=(n * 2 * k, 8)), jnp.float32),
           'shift_logits': jnp.asarray(rng.normal(size=(n * 2 * k, k)), jnp.float32)}
    loss, aux = csi.loss_and_aux(out, n, k, 0.5, 1.0)
    np.testing.assert_allclose(float(loss), float(aux['loss_con'] + aux['loss_cls']), rtol=1e-6)
    loss2, _ = csi.loss_and_aux(out, n, k, 0.5, 0.0)
    np.testing.assert_allclose(float(loss2), float(aux['loss_con']), rtol=1e-6)
