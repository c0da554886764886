"""Contrastive losses shared by the methods (methods.md §1.1).

All losses take float32 inputs and return float32 scalars. They are written
on the global batch: under `jax.jit` with a data-sharded batch XLA gathers
the keys, and all views of an image stay on one device by construction of
the view layout (see `jaxad.methods.csi.view_layout`).
"""
import jax
import jax.numpy as jnp


def l2_normalize(x, axis=-1, eps=1e-12):
    """x / max(||x||, eps), as torch.nn.functional.normalize."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def nt_xent(z, positive_index, temperature, eps=0.0):
    """NT-Xent over rows of `z` (N, D), each row's positive given by index.

    loss = mean_i -log( E_ip / (sum_{k != i} E_ik + eps) + eps ),
    E_ik = exp(<u_i, u_k> / temperature), u = z / ||z||.

    eps = 1e-8 is CSI's implementation (§1.1); eps = 0 is plain SimCLR.
    Every row other than i and its positive is a negative, so in CSI's layout
    the other rotations of the same image are negatives.
    """
    u = l2_normalize(z.astype(jnp.float32))
    n = u.shape[0]
    logits = u @ u.T / temperature
    # Cosines are <= 1, so exp(logits - 1/T) <= 1: no overflow for small T.
    # Multiply eps by the same factor so the value is unchanged.
    shift = 1.0 / temperature
    not_self = 1.0 - jnp.eye(n, dtype=logits.dtype)
    e = jnp.exp(logits - shift) * not_self
    denom = jnp.sum(e, axis=1) + eps * jnp.exp(-shift)
    pos_logit = jnp.take_along_axis(logits, positive_index[:, None], axis=1)[:, 0]
    if eps == 0.0:
        # log-space form: exact and stable for any temperature.
        return jnp.mean(jnp.log(denom) - (pos_logit - shift))
    pos = jnp.exp(pos_logit - shift)
    return jnp.mean(-jnp.log(pos / denom + eps))


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of integer labels (torch F.cross_entropy)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
