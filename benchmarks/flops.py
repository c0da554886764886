"""Analytic FLOP counts of the CSI network from its layer shapes (no JAX, no tracing).

Imported by `benchmarks/step_analysis.py` (as `flops`, the script's directory is on
sys.path) and by `tests/test_flops.py`.

Conventions: a multiply-add is 2 FLOPs. Two counts of a convolution:

  'dense'  every kernel tap at every output position, padding included:
           2 * Ho * Wo * kh * kw * Cin * Cout per image. The usual paper / hardware
           convention (what a GEMM over im2col computes).
  'valid'  only the taps that land on the input, not on its zero padding. XLA's
           HloCostAnalysis counts convolutions this way (a 3x3 conv with padding 1 at
           32x32 has 94 x 94 valid tap-positions per channel pair instead of 96 x 96),
           so this is the count to compare with `compiled.cost_analysis()['flops']`.

Dense layers: 2 * in * out per example, plus `out` for the bias add.

`forward_flops` counts convolutions and dense layers only. `elementwise_flops` estimates
the rest of a train-mode forward on its own line (BatchNorm, ReLU, residual adds, input
normalisation, pooling), with per-element costs spelled out there; it is an estimate of
what an implementation does, not a property of the network.

`largest_stack` turns a measured per-member byte count into the largest one-class table
stack that fits a device (`benchmarks/step_analysis.py` measures the bytes).
"""
import math

# BasicBlock ResNets: blocks per stage.
STAGE_SIZES = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
COUNTS = ('dense', 'valid')


def conv_output_size(size, kernel, stride, pad):
    return (size + 2 * pad - kernel) // stride + 1


def valid_taps(size, kernel, stride, pad):
    """Number of (output position, kernel tap) pairs along one spatial axis whose input
    index lies inside [0, size) (not in the padding)."""
    out = conv_output_size(size, kernel, stride, pad)
    return sum(1 for o in range(out) for t in range(kernel) if 0 <= o * stride - pad + t < size)


def conv2d_flops(height, width, c_in, c_out, kernel, stride=1, pad=0, batch=1,
                 count='dense'):
    """FLOPs of a bias-free 2-D convolution on `batch` images of height x width x c_in."""
    if count not in COUNTS:
        raise ValueError(f'count must be one of {COUNTS}, got {count!r}')
    if count == 'dense':
        positions = (conv_output_size(height, kernel, stride, pad)
                     * conv_output_size(width, kernel, stride, pad) * kernel * kernel)
    else:
        positions = valid_taps(height, kernel, stride, pad) * valid_taps(width, kernel, stride, pad)
    return 2 * batch * positions * c_in * c_out


def dense_flops(n_in, n_out, batch=1, bias=True):
    """FLOPs of a dense layer: 2 * in * out per example (+ out for the bias)."""
    return batch * (2 * n_in * n_out + (n_out if bias else 0))


def resnet_convs(depth=18, width=64, image_size=32, in_channels=3, stem='cifar'):
    """The convolutions of a BasicBlock ResNet, in order: dicts with name, input size
    (h = w), c_in, c_out, kernel, stride, pad. CIFAR stem only (3x3, stride 1, no pool)."""
    if stem != 'cifar':
        raise ValueError('only the CIFAR stem is counted here')
    if depth not in STAGE_SIZES:
        raise ValueError(f'depth must be one of {sorted(STAGE_SIZES)}')
    convs = [dict(name='conv1', size=image_size, c_in=in_channels, c_out=width, kernel=3,
                  stride=1, pad=1)]
    size, c = image_size, width
    for stage, blocks in enumerate(STAGE_SIZES[depth], start=1):
        f = width * 2 ** (stage - 1)
        for b in range(blocks):
            s = 2 if stage > 1 and b == 0 else 1
            name = f'layer{stage}_{b}'
            convs.append(dict(name=f'{name}/conv1', size=size, c_in=c, c_out=f, kernel=3,
                              stride=s, pad=1))
            out = conv_output_size(size, 3, s, 1)
            convs.append(dict(name=f'{name}/conv2', size=out, c_in=f, c_out=f, kernel=3,
                              stride=1, pad=1))
            if s != 1 or c != f:
                convs.append(dict(name=f'{name}/shortcut_conv', size=size, c_in=c, c_out=f,
                                  kernel=1, stride=s, pad=0))
            size, c = out, f
    return convs


def csi_dense_layers(features, proj_dim=128, num_shifts=4, proj_hidden=0):
    """(name, in, out) of the CSI heads: projection f -> f -> proj_dim, shift f -> K."""
    hidden = proj_hidden or features
    return [('proj_hidden', features, hidden), ('proj_out', hidden, proj_dim),
            ('shift_cls', features, num_shifts)]


def forward_flops(depth=18, width=64, image_size=32, in_channels=3, proj_dim=128,
                  num_shifts=4, count='dense'):
    """Convolution and dense FLOPs of one train-mode forward of one view (dict:
    'conv', 'dense', 'total', 'layers': per-layer FLOPs)."""
    layers = {}
    for c in resnet_convs(depth, width, image_size, in_channels):
        layers[c['name']] = conv2d_flops(c['size'], c['size'], c['c_in'], c['c_out'],
                                         c['kernel'], c['stride'], c['pad'], count=count)
    conv = sum(layers.values())
    features = width * 8
    dense = 0
    for name, n_in, n_out in csi_dense_layers(features, proj_dim, num_shifts):
        layers[name] = dense_flops(n_in, n_out)
        dense += layers[name]
    return {'conv': conv, 'dense': dense, 'total': conv + dense, 'layers': layers}


# Per-element FLOPs assumed by `elementwise_flops` (train-mode BatchNorm: the mean (1 add),
# the centred square for the variance (2), its sum (1), normalise (2: subtract, multiply by
# the rsqrt), scale and shift (2); the rsqrt per channel is negligible).
BN_TRAIN_PER_ELEMENT = 8
RELU_PER_ELEMENT = 1
ADD_PER_ELEMENT = 1


def elementwise_flops(depth=18, width=64, image_size=32, in_channels=3):
    """Estimated non-matmul FLOPs of one train-mode forward of one view: BatchNorm after
    every conv, ReLUs, residual adds, input normalisation (2 per input element) and the
    global average pool (1 per element of the last stage)."""
    total = 2 * image_size * image_size * in_channels  # (x - 0.5) / 0.5
    relu_add = 0
    bn = 0
    last = None
    for c in resnet_convs(depth, width, image_size, in_channels):
        out = conv_output_size(c['size'], c['kernel'], c['stride'], c['pad'])
        elements = out * out * c['c_out']
        bn += BN_TRAIN_PER_ELEMENT * elements
        if c['name'] == 'conv1' or c['name'].endswith('/conv1'):
            relu_add += RELU_PER_ELEMENT * elements  # ReLU after bn1
        elif c['name'].endswith('/conv2'):
            relu_add += (ADD_PER_ELEMENT + RELU_PER_ELEMENT) * elements  # + shortcut, ReLU
        last = elements
    pool = last
    relu_head = RELU_PER_ELEMENT * width * 8  # ReLU between the projection layers
    return {'batchnorm': bn, 'relu_and_residual': relu_add + relu_head,
            'input_norm_and_pool': total + pool,
            'total': bn + relu_add + relu_head + total + pool}


def csi_step_flops(batch_size, num_shifts=4, depth=18, width=64, image_size=32,
                   in_channels=3, proj_dim=128, count='dense'):
    """Analytic FLOPs of one CSI train step: 3 x the forward (forward, input gradient,
    weight gradient) over B x 2 views x K shifts, convolutions and dense layers only.

    The 3x rule slightly over-counts: the first convolution needs no input gradient
    (`first_layer_dx` is that share, reported so a caller can subtract it).
    """
    views = batch_size * 2 * num_shifts
    fwd = forward_flops(depth, width, image_size, in_channels, proj_dim, num_shifts, count)
    first = fwd['layers']['conv1']
    return {'views': views, 'forward_per_view': fwd['total'],
            'forward': views * fwd['total'], 'step_3x_forward': 3 * views * fwd['total'],
            'first_layer_dx': views * first,
            'elementwise_forward_estimate': views * elementwise_flops(
                depth, width, image_size, in_channels)['total']}



def largest_stack(per_member_bytes, budget_bytes, fixed_bytes=0, usable_fraction=1.0):
    """The largest K with fixed_bytes + K * per_member_bytes <= usable_fraction * budget.

    per_member_bytes: one stacked member's device memory (the slope of the stacked step's
    measured total bytes against K; a single run's step total at the same batch is a
    close, slightly larger stand-in); fixed_bytes: what does not grow with K (the
    intercept). usable_fraction: 0.75 for JAX's default GPU preallocation
    (XLA_PYTHON_CLIENT_MEM_FRACTION). 0 when not even one member fits.
    """
    if per_member_bytes <= 0:
        raise ValueError(f'per_member_bytes must be > 0, got {per_member_bytes}')
    if not 0 < usable_fraction <= 1:
        raise ValueError(f'usable_fraction must be in (0, 1], got {usable_fraction}')
    room = usable_fraction * budget_bytes - fixed_bytes
    return max(0, math.floor(room / per_member_bytes))
