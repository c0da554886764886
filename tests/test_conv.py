"""The matmul weight-gradient convolution equals XLA's convolution and its autodiff."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad.models.conv import conv_fn, conv_matmul_dw

DIMS = ('NHWC', 'HWIO', 'NHWC')


@pytest.mark.parametrize('k,stride,pad,size', [(3, 1, 1, 8), (3, 2, 1, 9), (1, 2, 0, 8),
                                               (7, 2, 3, 11), (3, 1, 0, 7)])
def test_value_and_gradients_equal_xla(k, stride, pad, size):
    rng = np.random.default_rng(k * 10 + stride)
    x = jnp.asarray(rng.normal(size=(3, size, size, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, 4, 5)), jnp.float32)
    padding = ((pad, pad), (pad, pad))

    def xla(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=DIMS)

    def ours(x, w):
        return conv_matmul_dw(x, w, (stride, stride), padding)

    y = xla(x, w)
    np.testing.assert_allclose(ours(x, w), y, rtol=1e-5, atol=1e-5)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    want = jax.vjp(xla, x, w)[1](g)
    got = jax.jit(lambda x, w, g: jax.vjp(ours, x, w)[1](g))(x, w, g)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_flax_conv_with_each_impl_and_bf16():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
    grads = {}
    for impl in ('xla', 'matmul_dw', 'auto'):
        layer = nn.Conv(4, (3, 3), (2, 2), padding=((1, 1), (1, 1)), use_bias=False,
                        conv_general_dilated=conv_fn(impl))
        params = layer.init(jax.random.key(0), x)
        grads[impl] = jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(params)
    for impl in ('matmul_dw', 'auto'):
        np.testing.assert_allclose(grads[impl]['params']['kernel'],
                                   grads['xla']['params']['kernel'], rtol=1e-5, atol=1e-5)
    layer = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), dtype=jnp.bfloat16,
                    conv_general_dilated=conv_fn('matmul_dw'))
    params = layer.init(jax.random.key(0), x)
    g = jax.grad(lambda p: jnp.sum(layer.apply(p, x).astype(jnp.float32)))(params)
    assert g['params']['kernel'].dtype == jnp.float32  # params (and their grads) stay float32
    with pytest.raises(ValueError, match='conv_impl'):
        conv_fn('cudnn')
