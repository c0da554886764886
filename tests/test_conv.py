"""The matmul weight-gradient convolution equals XLA's convolution and its autodiff (both of
its weight-gradient formulations: one matmul per kernel tap, and by kernel rows)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad.models import conv as conv_lib
from jaxad.models.conv import conv_fn, conv_matmul_dw

DIMS = ('NHWC', 'HWIO', 'NHWC')


CASES = [(3, 1, 1, 8), (3, 2, 1, 9), (1, 2, 0, 8), (7, 2, 3, 11), (3, 1, 0, 7), (1, 1, 0, 6)]


@pytest.mark.parametrize('rows_min_pixels', [conv_lib.ROWS_MIN_PIXELS, 0],
                         ids=['default', 'rows_everywhere'])
@pytest.mark.parametrize('k,stride,pad,size', CASES)
def test_value_and_gradients_equal_xla(k, stride, pad, size, rows_min_pixels, monkeypatch):
    # rows_min_pixels=0: every stride-1 case takes the weight gradient by kernel rows
    monkeypatch.setattr(conv_lib, 'ROWS_MIN_PIXELS', rows_min_pixels)
    check_against_xla(k, stride, (pad, pad), size, channels=(4, 5), seed=k * 10 + stride)


@pytest.mark.parametrize('k,stride,pads', [(3, 1, (1, 1)), (3, 1, (0, 2)), (5, 1, (2, 2))])
def test_rows_path_at_its_default_size(k, stride, pads):
    """32x32 outputs (the CIFAR stage-1 size) take the rows path with the default threshold;
    asymmetric padding too."""
    size = 32 - sum(pads) + k - 1
    check_against_xla(k, stride, pads, size, channels=(3, 4), seed=k, batch=2)


def check_against_xla(k, stride, pad, size, channels, seed, batch=3):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, size, size, channels[0])), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k) + tuple(channels)), jnp.float32)
    padding = (tuple(pad), tuple(pad))

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
