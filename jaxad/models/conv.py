"""A convolution whose weight gradient is a sum of matmuls (fast on XLA:CPU).

Profiling the CSI step on the 2-core CPU (BENCHMARKS.md) showed 59% of forward+backward
time in the kernel gradient: XLA:CPU lowers it as a convolution over transposed
activations (copies into a batch-minor layout, then a conv with a 32x32 window), about 3x
the forward convolution. Written directly,
    dW[i, j] = sum_{n, h, w} x_pad[n, i + s*h, j + s*w, :]^T g[n, h, w, :],
it is kh*kw matmuls over strided views of the NHWC input with no layout change; on that
CPU the whole forward+backward ran 1.5x faster with identical gradients (to float32
rounding). Stride-1 layers with 32x32 outputs or more (CIFAR stage 1) instead take it by
kernel rows (`_dw_by_rows`: kw shifted copies of x side by side, kh row-shifted copies of g,
kh matmuls in the form XLA:CPU hands to its fast GEMM), which copies less than one window per
tap; see BENCHMARKS.md. The input gradient stays XLA's. GPUs and TPUs keep XLA's convolution
(cuDNN/TPU kernels do the weight gradient well): `model.conv_impl='auto'` picks this only
when the program is lowered for the CPU. It is decided per *lowering* platform
(`jax.lax.platform_dependent`), not by the machine that traces: a step traced here and
lowered or exported for cuda/tpu gets XLA's convolution; for one platform XLA drops the
other branch at compile time.
"""
import functools

import jax
import jax.numpy as jnp

CONV_IMPLS = ('auto', 'xla', 'matmul_dw')
_DIMS = ('NHWC', 'HWIO', 'NHWC')


def _conv(x, w, strides, padding):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_matmul_dw(x, w, strides, padding):
    """NHWC x HWIO convolution (explicit padding) with the matmul weight gradient."""
    return _conv(x, w, strides, padding)


def _forward(x, w, strides, padding):
    return _conv(x, w, strides, padding), (x, w)


# Stride-1 layers with at least this many output pixels take the weight gradient by kernel rows
# (`_dw_by_rows`); smaller ones (deeper stages, where a tap's copy is cheap next to its matmul
# and the row padding of g costs relatively more) keep one matmul per tap (`_dw_by_taps`).
ROWS_MIN_PIXELS = 1024


def _dw_by_rows(x_pad, g, kh, kw):
    """Stride-1 dW in kh matmuls: x3[n, h', w, (j, c)] = x_pad[n, h', w + j, c] (one copy of x,
    kw times as wide), and for kernel row i, g shifted down by i rows (zero rows padded in);
    dW[i] = g_i^T x3, a (f, kw*c) matmul in the (M, K) x (K, N) form XLA:CPU hands to its
    fast GEMM. kw copies of x and kh of g instead of kh*kw window copies of x."""
    n, hp, _, c = x_pad.shape
    ho, wo, f = g.shape[1], g.shape[2], g.shape[3]
    x3 = jnp.concatenate([x_pad[:, :, j:j + wo, :] for j in range(kw)], axis=-1)
    x3 = x3.reshape(-1, kw * c)
    rows = []
    for i in range(kh):
        g_i = jnp.pad(g, ((0, 0), (i, hp - ho - i), (0, 0), (0, 0))).reshape(-1, f)
        rows.append(jnp.dot(g_i.T, x3, preferred_element_type=jnp.float32))
    return jnp.stack(rows).reshape(kh, f, kw, c).transpose(0, 2, 3, 1)


def _dw_by_taps(x_pad, g, kh, kw, strides):
    """dW in kh*kw matmuls, one per kernel tap over its strided window of x_pad."""
    n, _, _, c = x_pad.shape
    ho, wo, f = g.shape[1], g.shape[2], g.shape[3]
    sh, sw = strides
    g_rows = g.reshape(-1, f)
    taps = []
    for i in range(kh):
        for j in range(kw):
            window = jax.lax.slice(x_pad, (0, i, j, 0),
                                   (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                                   (1, sh, sw, 1))
            taps.append(jax.lax.dot_general(window.reshape(-1, c), g_rows,
                                            (((0,), (0,)), ((), ())),
                                            preferred_element_type=jnp.float32))
    return jnp.stack(taps).reshape(kh, kw, c, f)


def _backward(strides, padding, residuals, g):
    x, w = residuals
    dx = jax.vjp(lambda x: _conv(x, w, strides, padding), x)[1](g)[0]
    kh, kw = w.shape[:2]
    x_pad = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    if tuple(strides) == (1, 1) and kh * kw > 1 and g.shape[1] * g.shape[2] >= ROWS_MIN_PIXELS:
        dw = _dw_by_rows(x_pad, g, kh, kw)
    else:
        dw = _dw_by_taps(x_pad, g, kh, kw, strides)
    return dx, dw.astype(w.dtype)


conv_matmul_dw.defvjp(_forward, _backward)


def _flax_adapter(only_on_cpu):
    """A `flax.linen.Conv(conv_general_dilated=...)` function; anything unusual (groups,
    dilation, string padding) goes to XLA, and with `only_on_cpu` so does every lowering
    platform other than the CPU."""
    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
        def xla(lhs, rhs):
            return jax.lax.conv_general_dilated(
                lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                dimension_numbers, feature_group_count, precision=precision, **kwargs)

        plain = (feature_group_count == 1 and not kwargs and not isinstance(padding, str)
                 and dimension_numbers in (None, _DIMS, jax.lax.ConvDimensionNumbers(
                     (0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)))
                 and all(d is None or all(v == 1 for v in d) for d in (lhs_dilation, rhs_dilation)))
        if not plain:
            return xla(lhs, rhs)
        strides = tuple(window_strides)
        pads = tuple(tuple(int(v) for v in p) for p in padding)

        def matmul_dw(lhs, rhs):
            return conv_matmul_dw(lhs, rhs, strides, pads)
        if not only_on_cpu:
            return matmul_dw(lhs, rhs)
        return jax.lax.platform_dependent(lhs, rhs, cpu=matmul_dw, default=xla)
    return conv


def conv_fn(impl):
    """The `conv_general_dilated` for flax's Conv under `model.conv_impl`:
    'xla' always XLA's, 'matmul_dw' always ours, 'auto' ours when lowering for the CPU only."""
    if impl not in CONV_IMPLS:
        raise ValueError(f'unknown model.conv_impl {impl!r}; choose one of {CONV_IMPLS}')
    if impl == 'xla':
        return jax.lax.conv_general_dilated
    return _flax_adapter(only_on_cpu=impl == 'auto')
