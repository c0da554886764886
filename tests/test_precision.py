"""Mixed precision: bf16 compute, float32 params, optimizer state, logits, normalisation, loss.

Stated tolerance (measured on this CPU, width 8-32 ResNet-18, 16 images x 8 views, 9 draws):
the bf16 CSI loss is within 2e-3 relative of float32 on the same batch, params and key
(max seen 5.5e-4); the gradient keeps cosine > 0.9 with float32's (0.96 seen: bf16 keeps 8
mantissa bits, so a deep net's gradient moves by a few tens of percent in norm at random init,
with BN computed in float32 or not).
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxad import loop, optim
from jaxad.config import csi_base
from jaxad.methods import get_method

LOSS_RTOL = 2e-3
GRAD_MIN_COSINE = 0.9


def methods():
    c = csi_base()
    c.model.width = 8
    c.data.image_size = 16
    f32 = get_method(c)
    c.model.dtype = 'bfloat16'
    return c, f32, get_method(c)


def test_bf16_loss_within_tolerance_of_float32():
    _, f32, bf16 = methods()
    variables = f32.init_variables(jax.random.key(0), (16, 16, 3))
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    params, stats = variables['params'], variables['batch_stats']
    grad32 = jax.jit(jax.value_and_grad(f32.loss, has_aux=True))
    grad16 = jax.jit(jax.value_and_grad(bf16.loss, has_aux=True))
    for seed in range(3):
        key = jax.random.key(seed)
        (l32, (m32, _)), g32 = grad32(params, stats, {}, {"image": images}, key)
        (l16, (m16, s16)), g16 = grad16(params, stats, {}, {"image": images}, key)
        assert l16.dtype == jnp.float32
        assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves((g16, s16, m16)))
        # bf16 really ran (a silently ignored dtype would give float32's value exactly) ...
        assert float(l16) != float(l32)
        # ... and stays close to float32.
        np.testing.assert_allclose(float(l16), float(l32), rtol=LOSS_RTOL)
        a, b = ravel_pytree(g32)[0], ravel_pytree(g16)[0]
        cosine = float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
        assert cosine > GRAD_MIN_COSINE, cosine


def test_bf16_forward_casts_heads_to_float32_and_convolves_in_bf16():
    c, _, bf16 = methods()
    variables = bf16.init_variables(jax.random.key(0), (16, 16, 3))
    x = jnp.zeros((2, 16, 16, 3))
    out = bf16.model.apply(variables, x, train=False)
    assert {k: v.dtype for k, v in out.items()} == {
        'features': jnp.float32, 'proj': jnp.float32, 'shift_logits': jnp.float32}
    hlo = jax.jit(lambda v, x: bf16.model.apply(v, x, train=False)).lower(variables, x).as_text()
    assert 'bf16' in hlo and 'convolution' in hlo


def test_bf16_train_step_keeps_float32_params_and_optimizer_state():
    """Traced, not compiled (the numerics are the first test's): every float the step
    returns is float32, however much of its work ran in bf16."""
    c, _, bf16 = methods()
    tx, schedule = optim.make_optimizer(c.optim, steps_per_epoch=10, total_steps=100)
    state = jax.eval_shape(loop.make_init_fn(bf16, tx, (16, 16, 3)), jax.random.key(0))
    images = jax.ShapeDtypeStruct((4, 16, 16, 3), jnp.uint8)
    new, metrics = jax.eval_shape(loop.make_train_step(bf16, tx, schedule), state,
                                  {'image': images}, jax.random.key(2))
    leaves = jax.tree_util.tree_leaves((new.params, new.batch_stats, new.opt_state, metrics))
    floats = [x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    assert len(floats) > 50 and set(floats) == {jnp.dtype(jnp.float32)}
    jaxpr = str(jax.make_jaxpr(loop.make_train_step(bf16, tx, schedule))(
        state, {'image': images}, jax.random.key(2)))
    assert 'bf16' in jaxpr
