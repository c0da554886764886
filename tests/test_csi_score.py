"""The CSI score (docs/methods.md §2.5) against a per-sample NumPy loop like ood_pre.py."""
import jax.numpy as jnp
import numpy as np

from jaxad.methods import csi


def reference_scores(train_z, train_l, test_z, test_l):
    """train_z (M, K, D) TTA-mean projections; returns higher = more NORMAL."""
    k = train_z.shape[1]
    axis = [train_z[:, s] / np.linalg.norm(train_z[:, s], axis=1, keepdims=True) for s in range(k)]
    w_sim = [1 / np.mean(np.linalg.norm(train_z[:, s], axis=1)) for s in range(k)]
    w_shi = [1 / np.mean(train_l[:, s, s]) for s in range(k)]
    out = []
    for z, logit in zip(test_z, test_l):
        score = 0.0
        for s in range(k):
            score += (axis[s] @ z[s]).max() * w_sim[s]
            score += logit[s, s] * w_shi[s]
        out.append(score / k)
    return np.array(out)


def test_csi_score_matches_reference():
    rng = np.random.default_rng(0)
    m, n, k, d = 20, 7, 4, 6
    train_z = rng.normal(size=(m, k, d))
    train_l = rng.normal(size=(m, k, k)) + 3 * np.eye(k)  # own-rotation logit positive
    test_z = rng.normal(size=(n, k, d))
    test_l = rng.normal(size=(n, k, k))
    state = csi.fit_scoring(jnp.asarray(train_z, jnp.float32), jnp.asarray(train_l, jnp.float32))
    got = csi.scores(state, jnp.asarray(test_z, jnp.float32), jnp.asarray(test_l, jnp.float32))
    want = reference_scores(train_z, train_l, test_z, test_l)
    np.testing.assert_allclose(np.asarray(got['csi']), -want, rtol=1e-4, atol=1e-5)


def test_knn_cosine_score():
    rng = np.random.default_rng(1)
    train_z = rng.normal(size=(15, 4, 5))
    test_z = rng.normal(size=(6, 4, 5))
    logits = np.ones((15, 4, 4))
    state = csi.fit_scoring(jnp.asarray(train_z, jnp.float32), jnp.asarray(logits, jnp.float32))
    got = csi.scores(state, jnp.asarray(test_z, jnp.float32),
                     jnp.asarray(np.ones((6, 4, 4)), jnp.float32), knn_k=3)
    a = train_z[:, 0] / np.linalg.norm(train_z[:, 0], axis=1, keepdims=True)
    q = test_z[:, 0] / np.linalg.norm(test_z[:, 0], axis=1, keepdims=True)
    want = 1 - np.sort(q @ a.T, axis=1)[:, -3:].mean(1)
    np.testing.assert_allclose(np.asarray(got['knn_cosine']), want, rtol=1e-5, atol=1e-5)


def test_training_image_scores_as_normal():
    """A training feature itself gets the highest similarity term."""
    rng = np.random.default_rng(2)
    train_z = rng.normal(size=(30, 4, 8))
    logits = np.ones((30, 4, 4))
    state = csi.fit_scoring(jnp.asarray(train_z, jnp.float32), jnp.asarray(logits, jnp.float32))
    test_z = np.concatenate([train_z[:5], -train_z[:5]])
    got = csi.scores(state, jnp.asarray(test_z, jnp.float32),
                     jnp.asarray(np.ones((10, 4, 4)), jnp.float32))
    assert np.all(np.asarray(got['csi_sim'])[:5] < np.asarray(got['csi_sim'])[5:].min())
