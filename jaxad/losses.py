"""Contrastive losses shared by the methods (docs/methods.md §1.1).

All losses take float32 inputs and return float32 scalars. They are written
on the global batch: under `jax.jit` with a data-sharded batch XLA gathers
the keys, and all views of an image stay on one device by construction of
the view layout (see `jaxad.methods.csi.view_layout`).
"""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

NT_XENT_IMPLS = ('dense', 'chunked')


def l2_normalize(x, axis=-1, eps=1e-12):
    """x / max(||x||, eps), as torch.nn.functional.normalize.

    Written with rsqrt of the clamped squared norm so that an all-zero row (a projection
    head whose ReLUs are all dead) has a finite gradient, as in torch; differentiating
    sqrt at 0 would give NaN.
    """
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


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


def nt_xent_chunked(z, positive_index, temperature, eps=0.0, *, block_size=2048,
                    axis_name='data'):
    """`nt_xent`'s value and gradient without ever forming the (N, N) logits.

    Each device keeps its own rows of `z` as queries and all-gathers the normalised keys
    (N x D, small); the denominators are an online log-sum-exp over key blocks of
    `block_size` (a running max and sum in a `lax.scan` whose body is rematerialised, so
    the backward pass holds one (rows x block) tile, not (rows x N)). Memory per device is
    O(N/d x block + N x D) instead of O(N/d x N): a global batch of 32k embeddings fits.

    Runs under `shard_map` over `axis_name` when the ambient mesh (`jax.set_mesh`, which
    the trainer sets) has that axis with more than one device; otherwise on one device with
    the same maths. The positive may live anywhere (it is read from the gathered keys);
    CSI's layout keeps it local anyway. In log space throughout, so any temperature works:
    loss_i = -log(exp(pos_i - lse_i) + eps), lse_i = log(sum_{k != i} exp(l_ik) + eps)
    (eps = 0: lse_i - pos_i).
    """
    mesh = jax.sharding.get_abstract_mesh()
    per_row = _chunked_rows_fn(temperature, eps, block_size)
    if mesh.empty or axis_name not in mesh.axis_names or mesh.shape[axis_name] == 1:
        u = l2_normalize(z.astype(jnp.float32))
        return jnp.mean(per_row(u, jnp.arange(u.shape[0]), positive_index, u))

    def local(z_local, pos_local):
        u = l2_normalize(z_local.astype(jnp.float32))
        keys = jax.lax.all_gather(u, axis_name, tiled=True)  # transpose: psum_scatter
        rows = jax.lax.axis_index(axis_name) * u.shape[0] + jnp.arange(u.shape[0])
        # Equal row counts per device, so the mean of the means is the global mean.
        return jax.lax.pmean(jnp.mean(per_row(u, rows, pos_local, keys)), axis_name)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis_name), P(axis_name)),
                         out_specs=P())(z, positive_index)


def _chunked_rows_fn(temperature, eps, block_size):
    """(queries u (b, D), their global row ids, positive ids, keys (N, D)) -> loss per row."""
    def per_row(u, rows, positives, keys):
        n = keys.shape[0]
        block = min(block_size, n)
        num_blocks = -(-n // block)
        padded = jnp.pad(keys, ((0, num_blocks * block - n), (0, 0)))
        blocks = padded.reshape(num_blocks, block, keys.shape[1])

        @jax.checkpoint
        def body(carry, inputs):
            running_max, running_sum = carry
            index, key_block = inputs
            cols = index * block + jnp.arange(block)
            logits = u @ key_block.T / temperature
            keep = (cols[None, :] != rows[:, None]) & (cols[None, :] < n)
            logits = jnp.where(keep, logits, -jnp.inf)
            new_max = jax.lax.stop_gradient(jnp.maximum(running_max, jnp.max(logits, axis=1)))
            running_sum = (running_sum * jnp.exp(running_max - new_max)
                           + jnp.sum(jnp.exp(logits - new_max[:, None]), axis=1))
            return (new_max, running_sum), None

        # A finite start (not -inf) keeps exp(old - new) defined when a block is all masked;
        # built from u so that under shard_map it varies over the axis as the body's output does.
        start = (jnp.full_like(u[:, 0], -1e30), jnp.zeros_like(u[:, 0]))
        (row_max, row_sum), _ = jax.lax.scan(body, start, (jnp.arange(num_blocks), blocks))
        lse = row_max + jnp.log(row_sum)
        pos = jnp.sum(u * keys[positives], axis=1) / temperature
        if eps == 0.0:
            return lse - pos
        lse = jnp.logaddexp(lse, jnp.log(eps))
        return -jnp.log(jnp.exp(pos - lse) + eps)
    return per_row


def nt_xent_by_name(impl, z, positive_index, temperature, eps=0.0, block_size=2048):
    """`impl` 'dense' (`nt_xent`) or 'chunked' (`nt_xent_chunked`): one switch for methods."""
    if impl == 'dense':
        return nt_xent(z, positive_index, temperature, eps)
    return nt_xent_chunked(z, positive_index, temperature, eps, block_size=block_size)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of integer labels (torch F.cross_entropy)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
