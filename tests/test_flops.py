"""benchmarks/flops.py: the analytic FLOP counts, by hand and against XLA's cost analysis."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    'flops', os.path.join(_ROOT, 'benchmarks', 'flops.py'))
flops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flops)


def _xla_flops(fn, *shapes):
    cost = jax.jit(fn).lower(*shapes).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost['flops']


def _conv(stride, pad):
    return lambda x, w: jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((pad, pad), (pad, pad)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def test_conv_by_hand():
    # 3x3 conv 64 -> 64 on 32x32, stride 1, padding 1: every output pixel (32 x 32) takes
    # 3 x 3 x 64 multiply-adds per output channel (64), 2 FLOPs each.
    assert flops.conv2d_flops(32, 32, 64, 64, 3, 1, 1) == 2 * 32 * 32 * 3 * 3 * 64 * 64
    assert flops.conv2d_flops(32, 32, 64, 64, 3, 1, 1, batch=5) == 5 * 2 * 32 * 32 * 9 * 4096
    # Without the padding taps: along one axis 32 outputs x 3 taps, minus the first
    # output's left tap and the last output's right tap = 94.
    assert flops.conv2d_flops(32, 32, 64, 64, 3, 1, 1, count='valid') == 2 * 94 * 94 * 64 * 64
    # Stride 2: 16 outputs x 3 taps, only output 0's first tap is in the padding = 47.
    assert flops.valid_taps(32, 3, 2, 1) == 47
    assert flops.conv2d_flops(32, 32, 64, 128, 3, 2, 1) == 2 * 16 * 16 * 9 * 64 * 128
    # 1x1 stride 2, no padding: both counts agree.
    assert (flops.conv2d_flops(32, 32, 64, 128, 1, 2, 0)
            == flops.conv2d_flops(32, 32, 64, 128, 1, 2, 0, count='valid')
            == 2 * 16 * 16 * 64 * 128)
    with pytest.raises(ValueError):
        flops.conv2d_flops(32, 32, 64, 64, 3, 1, 1, count='bogus')


def test_dense_by_hand():
    assert flops.dense_flops(512, 128, bias=False) == 2 * 512 * 128
    assert flops.dense_flops(512, 128) == 2 * 512 * 128 + 128
    assert flops.dense_flops(512, 4, batch=3) == 3 * (2 * 512 * 4 + 4)


@pytest.mark.parametrize('size,c_in,c_out,kernel,stride,pad', [
    (32, 64, 64, 3, 1, 1), (32, 64, 128, 3, 2, 1), (16, 64, 128, 1, 2, 0), (8, 3, 16, 3, 1, 1)])
def test_conv_matches_xla_cost_analysis(size, c_in, c_out, kernel, stride, pad):
    """XLA's HloCostAnalysis (an outside reference) counts a convolution's valid taps."""
    x = jax.ShapeDtypeStruct((2, size, size, c_in), jnp.float32)
    w = jax.ShapeDtypeStruct((kernel, kernel, c_in, c_out), jnp.float32)
    xla = _xla_flops(_conv(stride, pad), x, w)
    valid = flops.conv2d_flops(size, size, c_in, c_out, kernel, stride, pad, batch=2,
                               count='valid')
    dense = flops.conv2d_flops(size, size, c_in, c_out, kernel, stride, pad, batch=2)
    assert xla == valid
    assert dense >= xla


def test_dense_matches_xla_cost_analysis():
    x = jax.ShapeDtypeStruct((6, 512), jnp.float32)
    w = jax.ShapeDtypeStruct((512, 128), jnp.float32)
    assert _xla_flops(jnp.dot, x, w) == flops.dense_flops(512, 128, batch=6, bias=False)


def test_resnet18_layer_list_against_published_counts():
    # CIFAR ResNet-18 (kuangliu/pytorch-cifar, as CSI uses it) has 11,173,962 parameters
    # with a 10-class linear head: conv kernels + BN scale/bias + fc 512 x 10 + 10.
    convs = flops.resnet_convs(18, 64, 32)
    assert len(convs) == 20  # 17 3x3 convs + 3 1x1 shortcut convs
    params = sum(c['kernel'] ** 2 * c['c_in'] * c['c_out'] + 2 * c['c_out'] for c in convs)
    assert params + 512 * 10 + 10 == 11_173_962
    # Its forward is commonly quoted as 0.56 G multiply-adds per 32x32 image (two digits).
    macs = flops.forward_flops(18, 64, 32)['conv'] / 2
    assert abs(macs - 0.56e9) / 0.56e9 < 0.01


def test_forward_matches_xla_on_a_small_network():
    """The layer list of a whole (small) CSI network against XLA's count of its eval-mode
    forward: XLA adds only the elementwise work (BN, ReLU, adds) to the valid count."""
    from jaxad.models.resnet import build_model
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(name='resnet18', stem='cifar', width=8, proj_dim=16,
                                         dtype='float32', bn_mode='batch', bn_groups=1,
                                         conv_impl='xla', input_norm='csi'))
    model = build_model(cfg, num_shifts=4)
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape),
                                                  train=False))
    xla = _xla_flops(lambda v, x: model.apply(v, x, train=False), variables, x)
    fwd = flops.forward_flops(18, 8, 16, proj_dim=16, num_shifts=4, count='valid')
    elementwise = flops.elementwise_flops(18, 8, 16)['total']
    assert 2 * fwd['total'] <= xla <= 2 * (fwd['total'] + elementwise)


def test_step_count_is_three_forwards():
    step = flops.csi_step_flops(32, num_shifts=4)
    assert step['views'] == 256
    assert step['step_3x_forward'] == 3 * 256 * step['forward_per_view']
    assert step['forward_per_view'] == flops.forward_flops()['total']
    assert step['first_layer_dx'] == 256 * flops.conv2d_flops(32, 32, 3, 64, 3, 1, 1)


def test_largest_stack():
    gib = 2 ** 30
    # 3 GiB per member, 2 GiB fixed, 80 GiB: floor(78 / 3) = 26; at 75%: floor(58 / 3) = 19.
    assert flops.largest_stack(3 * gib, 80 * gib, 2 * gib) == 26
    assert flops.largest_stack(3 * gib, 80 * gib, 2 * gib, usable_fraction=0.75) == 19
    assert flops.largest_stack(4 * gib, 16 * gib) == 4  # exactly full fits
    assert flops.largest_stack(17 * gib, 16 * gib) == 0
    with pytest.raises(ValueError):
        flops.largest_stack(0, 16 * gib)
    with pytest.raises(ValueError):
        flops.largest_stack(gib, 16 * gib, usable_fraction=1.5)
