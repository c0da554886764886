"""ResNet encoders (CIFAR and ImageNet stems) with the CSI heads.

Depths 18/34 (BasicBlock) and 50/101/152 (torchvision's v1.5 Bottleneck: the
stride sits on the 3x3 conv; 1x1-conv+BN shortcut; expansion 4), and
`width_per_group` 128 for wide_resnet50_2 / wide_resnet101_2. With stem='imagenet'
and input_norm='imagenet' the layout and arithmetic are torchvision's, so weights
imported by `jaxad.models.convert` give torchvision's features.

Layout follows the CSI code (docs/methods.md §2.2): inputs in [0, 1] are normalised
inside the network with (x - 0.5) / 0.5, BasicBlocks [2,2,2,2] or [3,4,6,3],
global average pooling to the penultimate features f(x). Heads:
projection 512 -> 512 -> 128 (no BN; hidden = feature width) and the shift classifier 512 -> K.

Convolutions use explicit symmetric padding (torch semantics) so that strided
layers match PyTorch; 'SAME' would pad (0, 1) for stride 2. The ImageNet stem's
3x3/2 max-pool pads 1 with -inf (flax's `max_pool` pads with its -inf init value),
as torch does.

Input normalisation (config.model.input_norm): 'csi' = (x - 0.5) / 0.5 (CSI, the
default); 'imagenet' = (x - mean) / std with torchvision's ImageNet statistics, which
pretrained torchvision weights expect. Inputs are in [0, 1] either way.

Parameter names (the converter's mapping, `convert.py`): stem `conv1`, `bn1`; block
b (0-based) of stage s (1..4) is `layer{s}_{b}` with `conv1`, `bn1`, `conv2`, `bn2`
(+ `conv3`, `bn3` in a Bottleneck) and `shortcut_conv`, `shortcut_bn` for
torchvision's `downsample.0`, `downsample.1`.

Params are always float32; `dtype` is the compute dtype (bfloat16 on
accelerators). Everything the loss sees is cast back to float32.

BatchNorm (config.model.bn_mode / bn_groups / bn_running_var, a per-method choice):
'batch' normalises with the statistics of the whole global batch (under jit over a
sharded batch that is SyncBN for free, as CSI's 4-GPU runs (apex convert_syncbn_model) and
OECL (nn.SyncBatchNorm) have it: the faithful default, bn_groups = 1); bn_groups = G > 1
instead takes statistics per contiguous G-th of the batch, which is what G GPUs without
SyncBN do; 'frozen' keeps the running statistics during training (MSC). Training normalises
with the biased batch variance; the running variance moves towards the unbiased one,
n/(n-1) times it (n = values per channel: batch x H x W, per group when grouped), with
bn_running_var='unbiased', as torch's BatchNorm keeps it, or towards the biased one
('biased', flax's nn.BatchNorm).

Initialisation (config.model.init; the modules' `param_init`): 'torch' is PyTorch's default
Conv2d / Linear init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)) kernels (variance
1/(3 fan_in); fan_in = kh*kw*in of an HWIO kernel, in*kh*kw in torch) and U(+-1/sqrt(fan_in))
Linear biases: the CIFAR ResNets and heads of CSI and OECL. 'torchvision' is torchvision's
ResNet init, convs kaiming_normal(fan_out, relu) (MCL's ResNet); a CIFAR 3x3 stem keeps torch's
default there (MCL replaces torchvision's conv1 after construction) and the heads are torch's.
'flax' is Flax's lecun-normal (truncated normal, variance 1/fan_in) kernels and zero biases.
BN starts at scale 1, bias 0 in all three. The module defaults are Flax's ('flax', 'biased'),
the configs choose (jaxad.config); `build_model` passes them on.
"""
from typing import Any

import flax.linen as nn
from flax.linen.linear import default_kernel_init
import jax
import jax.numpy as jnp

from jaxad.errors import ConfigError
from jaxad.models.conv import CONV_IMPLS, conv_fn

# BasicBlock; ResNet-10 (one block per stage) is the small encoder of quick experiments/tests.
STAGE_SIZES = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
BOTTLENECK_STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
BN_MODES = ('batch', 'frozen')
INITS = ('torch', 'torchvision', 'flax')  # config.model.init (module docstring)
BN_RUNNING_VARS = ('unbiased', 'biased')  # config.model.bn_running_var
# Module defaults: Flax's behaviour. Modules that share the helpers below without these fields
# (AnoMem's StagedResNet, ReContrast's OCBE and decoder) keep them.
MODULE_DEFAULTS = {'param_init': 'flax', 'bn_running_var': 'biased'}
# torch's default Conv2d / Linear weight init: bound sqrt(6 / ((1 + a^2) fan_in)) with a = sqrt(5)
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
# torchvision's ResNet convs: kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# config.model.name -> (depth, width_per_group), torchvision's names.
ARCHS = {'resnet10': (10, 64), 'resnet18': (18, 64), 'resnet34': (34, 64), 'resnet50': (50, 64),
         'resnet101': (101, 64), 'resnet152': (152, 64),
         'wide_resnet50_2': (50, 128), 'wide_resnet101_2': (101, 128)}
# (mean, std) per channel of inputs in [0, 1]; 'csi' works for any number of channels.
INPUT_NORMS = {'csi': ((0.5,), (0.5,)),
               'none': ((0.0,), (1.0,)),  # MCL: ToTensor only
               'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
               # OECL's CIFAR / Tiny80M normalisation
               'cifar': ((125.3 / 255, 123.0 / 255, 113.9 / 255),
                         (63.0 / 255, 62.1 / 255, 66.7 / 255))}


def module_option(mod, name):
    """`mod.param_init` / `mod.bn_running_var`, or the Flax default where `mod` has no such
    field (MODULE_DEFAULTS)."""
    return getattr(mod, name, MODULE_DEFAULTS[name])


def conv_init(param_init, cifar_stem=False):
    """The conv kernel init of `param_init` (module docstring); cifar_stem: the 3x3 stem conv."""
    if param_init not in INITS:
        raise ConfigError(f'unknown model.init {param_init!r}; choose from {INITS}')
    if param_init == 'flax':
        return default_kernel_init
    if param_init == 'torchvision' and not cifar_stem:
        return KAIMING_FAN_OUT
    return TORCH_KERNEL_INIT


def torch_bias_init(fan_in):
    """torch's default Linear / Conv2d bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def dense(x, features, param_init, dtype, name):
    """nn.Dense(features) applied to `x` inside a compact call: Flax's init for 'flax', else
    torch's Linear init (kernel and bias U(+-1/sqrt(in)))."""
    if param_init not in INITS:
        raise ConfigError(f'unknown model.init {param_init!r}; choose from {INITS}')
    if param_init == 'flax':
        return nn.Dense(features, dtype=dtype, name=name)(x)
    return nn.Dense(features, dtype=dtype, kernel_init=TORCH_KERNEL_INIT,
                    bias_init=torch_bias_init(x.shape[-1]), name=name)(x)


def arch_name(depth, width_per_group=64):
    """The config.model.name of (depth, width_per_group), e.g. 'wide_resnet50_2'."""
    for name, arch in ARCHS.items():
        if arch == (depth, width_per_group):
            return name
    return f'resnet{depth}_w{width_per_group}'


class GroupedBatchNorm(nn.Module):
    """BatchNorm with statistics per contiguous group of the batch (ghost batches).

    Same variables as `nn.BatchNorm` (params scale/bias, batch_stats mean/var), so
    checkpoints and weight import do not care. Normalises with the biased variance; the
    running statistics move towards the mean over groups of the group statistics, the
    variance as torch keeps it (n/(n-1) x biased, n = values per channel of a group) when
    `unbiased`, else biased as flax. groups = 1 is whole-batch BN (SyncBN under jit).
    """
    groups: int
    momentum: float
    epsilon: float
    dtype: Any
    unbiased: bool = False

    @nn.compact
    def __call__(self, x, use_running_average):
        c = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        if use_running_average:
            y = (xf - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
        else:
            if x.shape[0] % self.groups:
                raise ConfigError(f'model.bn_groups={self.groups} does not divide the '
                                  f'{x.shape[0]} rows of the batch')
            g = xf.reshape((self.groups, -1) + x.shape[1:])
            axes = tuple(range(1, g.ndim - 1))
            mean = jnp.mean(g, axis=axes, keepdims=True)
            var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
            y = ((g - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
            if not self.is_initializing():
                if self.unbiased:
                    n = g[0].size // c  # values per channel of one group
                    if n < 2:  # torch refuses too ("more than 1 value per channel")
                        raise ConfigError(f'BatchNorm {self.name}: one value per channel in a '
                                          'training batch (group); the unbiased running '
                                          'variance needs at least 2')
                    var = var * (n / (n - 1))
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean.reshape(-1, c), 0)
                ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(var.reshape(-1, c), 0)
        return (y * scale + bias).astype(self.dtype)


class UnbiasedRunningVarBatchNorm(nn.BatchNorm):
    """flax's nn.BatchNorm (its variables and normalisation, with the two-pass batch
    variance) whose running variance moves towards the unbiased batch variance, n/(n-1) x
    the biased one (n = values per channel), as torch's BatchNorm keeps it.

    flax updates var <- m var + (1 - m) v; torch's update is m var + (1 - m) v n/(n-1),
    which is flax's result plus (flax's result - m var) / (n - 1). Correcting the update
    after the fact keeps flax's training arithmetic (the scale folded into one per-channel
    multiplier, no regrouping reshape): GroupedBatchNorm with one group made the CSI step
    about 10% slower on the CPU (issue 29, item 5; BENCHMARKS.md).
    """
    use_fast_variance: bool = False  # mean((x - mean)^2), as GroupedBatchNorm and torch

    @nn.compact
    def __call__(self, x, use_running_average=None):
        n = x.size // x.shape[-1]
        updates = not (self.is_initializing() or nn.merge_param(
            'use_running_average', self.use_running_average, use_running_average))
        if updates and n < 2:  # torch refuses too ("more than 1 value per channel")
            raise ConfigError(f'BatchNorm {self.name}: one value per channel in a training '
                              'batch; the unbiased running variance needs at least 2')
        old = self.get_variable('batch_stats', 'var') if updates else None
        y = super().__call__(x, use_running_average)
        if updates:
            new = self.get_variable('batch_stats', 'var')
            self.put_variable('batch_stats', 'var',
                              new + (new - self.momentum * old) / (n - 1))
        return y


def batch_norm(train, momentum, dtype, bn_mode, bn_groups, name, running_var='biased'):
    """The BatchNorm layer for `bn_mode` / `bn_groups` / `running_var` (module docstring):
    flax's nn.BatchNorm, GroupedBatchNorm when the statistics are grouped, flax's with
    torch's running-variance update when kept unbiased."""
    if running_var not in BN_RUNNING_VARS:
        raise ConfigError(f'unknown model.bn_running_var {running_var!r}; choose from '
                          f'{BN_RUNNING_VARS}')
    use_running_average = not train or bn_mode == 'frozen'
    unbiased = running_var == 'unbiased'
    # Without an update the running variance's kind does not matter: eval and 'frozen'
    # keep nn.BatchNorm (same variables either way).
    if bn_groups > 1:
        layer = GroupedBatchNorm(bn_groups, momentum, 1e-5, dtype, unbiased, name=name)
        return lambda x: layer(x, use_running_average)
    if unbiased and not use_running_average:
        return UnbiasedRunningVarBatchNorm(use_running_average=False, momentum=momentum,
                                           epsilon=1e-5, dtype=dtype, name=name)
    return nn.BatchNorm(use_running_average=use_running_average, momentum=momentum,
                        epsilon=1e-5, dtype=dtype, name=name)


# torch's default ConvTranspose2d init: bound 1/sqrt(weight.size(1) * k * k) = 1/sqrt(4*out),
# which is the fan_out of the (2, 2, in, out) kernel
TORCH_DECONV_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_out', 'uniform')


class Deconv2x2(nn.Module):
    """torch ConvTranspose2d(in, out, kernel_size=2, stride=2, bias=False) on NHWC.

    Kernel (2, 2, in, out) with kernel[a, b] = torch_weight[:, :, a, b]: input pixel (i, j)
    writes x[i, j] @ kernel[a, b] to output pixel (2i + a, 2j + b) (no overlap for k = s).
    """
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param('kernel', TORCH_DECONV_INIT,
                            (2, 2, x.shape[-1], self.features), jnp.float32)
        n, h, w, _ = x.shape
        y = jnp.einsum('nhwc,abco->nhawbo', x.astype(self.dtype), kernel.astype(self.dtype))
        return y.reshape(n, 2 * h, 2 * w, self.features)


def block_layers(block, train):
    """(conv(features, kernel, stride, pad, name), norm(name), deconv(features, name))
    makers for a residual block: bias-free convs with torch's symmetric padding and the
    block's kernel_init, the configured BatchNorm, and the 2x2 up-sampling deconv."""
    def conv(f, k, s, p, name):
        return nn.Conv(f, (k, k), (s, s), padding=((p, p), (p, p)), use_bias=False,
                       dtype=block.dtype, kernel_init=block.kernel_init,
                       conv_general_dilated=conv_fn(block.conv_impl), name=name)

    def norm(name):
        return batch_norm(train, block.bn_momentum, block.dtype, block.bn_mode,
                          block.bn_groups, name, module_option(block, 'bn_running_var'))

    def deconv(f, name):
        return Deconv2x2(f, block.dtype, name=name)
    return conv, norm, deconv


def _strided(block, conv, deconv, features, name):
    """The block's strided 3x3 conv, or with up=True and stride 2 the deconv2x2 of RD4AD's
    mirrored decoder (de_resnet)."""
    if block.up and block.strides == 2:
        return deconv(features, name)
    return conv(features, 3, block.strides, 1, name)


def _shortcut(block, conv, norm, deconv, x, out):
    """Identity, or 1x1-conv+BN when the shape changes (deconv2x2+BN for up=True)."""
    if block.strides == 1 and x.shape[-1] == out:
        return x
    if block.up:
        if block.strides != 2:
            # de_resnet would use deconv2x2 with stride 1 (output H+1); never built there
            raise ConfigError('an up-sampling block with a channel change needs stride 2')
        return norm('shortcut_bn')(deconv(out, 'shortcut_conv')(x))
    return norm('shortcut_bn')(conv(out, 1, block.strides, 0, 'shortcut_conv')(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a 1x1-conv+BN shortcut when the shape changes. up=True is
    de_resnet's block: a stride-2 block's conv1 and shortcut conv are deconv2x2."""
    features: int
    strides: int
    dtype: Any
    bn_momentum: float
    bn_mode: str = 'batch'
    bn_groups: int = 1
    conv_impl: str = 'auto'
    up: bool = False
    kernel_init: Any = default_kernel_init  # flax's Conv default
    bn_running_var: str = 'biased'

    @nn.compact
    def __call__(self, x, train):
        conv, norm, deconv = block_layers(self, train)
        y = nn.relu(norm('bn1')(_strided(self, conv, deconv, self.features, 'conv1')(x)))
        y = norm('bn2')(conv(self.features, 3, 1, 1, 'conv2')(y))
        return nn.relu(_shortcut(self, conv, norm, deconv, x, self.features) + y)


class Bottleneck(nn.Module):
    """torchvision's v1.5 Bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (x4), 1x1-conv+BN shortcut.

    `features` is torchvision's `planes`; the block outputs 4 * features channels and
    its inner width is int(features * width_per_group / 64) (128: wide ResNets). up=True is
    de_resnet's block: a stride-2 block's 3x3 conv2 and shortcut conv are deconv2x2.
    """
    features: int
    strides: int
    dtype: Any
    bn_momentum: float
    bn_mode: str = 'batch'
    bn_groups: int = 1
    width_per_group: int = 64
    conv_impl: str = 'auto'
    up: bool = False
    kernel_init: Any = default_kernel_init  # flax's Conv default
    bn_running_var: str = 'biased'

    @nn.compact
    def __call__(self, x, train):
        conv, norm, deconv = block_layers(self, train)
        inner = int(self.features * (self.width_per_group / 64.0))
        out = self.features * 4
        y = nn.relu(norm('bn1')(conv(inner, 1, 1, 0, 'conv1')(x)))
        y = nn.relu(norm('bn2')(_strided(self, conv, deconv, inner, 'conv2')(y)))
        y = norm('bn3')(conv(out, 1, 1, 0, 'conv3')(y))
        return nn.relu(_shortcut(self, conv, norm, deconv, x, out) + y)


def normalize_input(x, input_norm):
    """Inputs in [0, 1] -> the network's input scale (`INPUT_NORMS`)."""
    if input_norm == 'csi':
        return (x - 0.5) / 0.5
    if input_norm == 'none':
        return x
    if input_norm not in INPUT_NORMS:
        raise ConfigError(f'unknown model.input_norm {input_norm!r}; choose from {sorted(INPUT_NORMS)}')
    mean, std = (jnp.asarray(v, jnp.float32) for v in INPUT_NORMS[input_norm])
    if x.shape[-1] != mean.shape[0]:
        raise ConfigError(f'model.input_norm={input_norm!r} needs {mean.shape[0]} input '
                          f'channels, got {x.shape[-1]}')
    return (x - mean) / std


class ResNet(nn.Module):
    """ResNet encoder returning the pooled penultimate features (float32).

    return_stages=True returns {'layer1'..'layer4': stage outputs (B, H, W, C),
    'pooled': the pooled features}, all float32 (multi-scale taps, e.g. ReContrast).
    num_stages < 4 builds only the first stages (ReContrast's encoder stops after layer3,
    as the code's `layer4 = None`); 'pooled' then pools the last one built.
    """
    depth: int = 18
    stem: str = 'cifar'  # 'cifar': 3x3 s1, no max-pool; 'imagenet': 7x7 s2 + max-pool
    width: int = 64      # channels of the stem and of torchvision's `planes` in stage 1
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9  # = PyTorch momentum 0.1
    bn_mode: str = 'batch'
    bn_groups: int = 1
    width_per_group: int = 64  # Bottleneck inner width per 64 planes (128: wide ResNets)
    input_norm: str = 'csi'    # 'csi' | 'imagenet' (module docstring)
    return_stages: bool = False
    conv_impl: str = 'auto'    # jaxad.models.conv: matmul weight gradients on CPU
    num_stages: int = 4
    param_init: str = 'flax'   # 'torch' | 'torchvision' | 'flax' (module docstring)
    bn_running_var: str = 'biased'  # 'unbiased' (torch) | 'biased' (flax)

    @nn.compact
    def __call__(self, x, train):
        if not 1 <= self.num_stages <= 4:
            raise ConfigError(f'num_stages must be 1..4, got {self.num_stages}')
        x = resnet_stem(self, x, train)
        stages = {}
        for stage in range(1, self.num_stages + 1):
            x = resnet_stage(self, x, stage, train)
            if self.return_stages:
                stages[f'layer{stage}'] = x.astype(jnp.float32)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.return_stages:
            return dict(stages, pooled=pooled)
        return pooled


def block_spec(depth, width_per_group):
    """(stage block counts, block class, extra block kwargs) of a ResNet depth."""
    if depth in STAGE_SIZES:
        if width_per_group != 64:
            raise ConfigError(f'width_per_group={width_per_group} needs a Bottleneck '
                              f'ResNet (depth 50/101/152), not depth {depth}')
        return STAGE_SIZES[depth], BasicBlock, {}
    if depth in BOTTLENECK_STAGE_SIZES:
        return BOTTLENECK_STAGE_SIZES[depth], Bottleneck, {'width_per_group': width_per_group}
    raise ConfigError(f'ResNet depth {depth} is not supported; choose from '
                      f'{sorted(STAGE_SIZES) + sorted(BOTTLENECK_STAGE_SIZES)}')


def resnet_stem(mod, x, train):
    """Input normalisation and the stem (conv1, bn1, ReLU[, max-pool]) inside `mod`'s compact
    call; `mod` has ResNet's fields. Shared by ResNet and encoders run stage by stage."""
    block_spec(mod.depth, mod.width_per_group)  # an unsupported depth fails before any layer
    x = normalize_input(x, mod.input_norm).astype(mod.dtype)
    if mod.stem not in ('cifar', 'imagenet'):
        raise ConfigError(f"unknown ResNet stem {mod.stem!r}; choose 'cifar' or 'imagenet'")
    k, s, p = (3, 1, 1) if mod.stem == 'cifar' else (7, 2, 3)
    kernel_init = conv_init(module_option(mod, 'param_init'), cifar_stem=mod.stem == 'cifar')
    x = nn.Conv(mod.width, (k, k), (s, s), padding=((p, p), (p, p)), use_bias=False,
                dtype=mod.dtype, kernel_init=kernel_init,
                conv_general_dilated=conv_fn(mod.conv_impl), name='conv1')(x)
    x = nn.relu(batch_norm(train, mod.bn_momentum, mod.dtype, mod.bn_mode, mod.bn_groups,
                           'bn1', module_option(mod, 'bn_running_var'))(x))
    if mod.stem == 'imagenet':
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    return x


def resnet_stage(mod, x, stage, train):
    """The blocks of layer `stage` (1..4), named layer{stage}_{b}, inside `mod`'s compact
    call; the first block of stages 2..4 has stride 2."""
    stage_sizes, block_cls, extra = block_spec(mod.depth, mod.width_per_group)
    kernel_init = conv_init(module_option(mod, 'param_init'))
    for block in range(stage_sizes[stage - 1]):
        strides = 2 if stage > 1 and block == 0 else 1
        x = block_cls(mod.width * 2 ** (stage - 1), strides, mod.dtype, mod.bn_momentum,
                      mod.bn_mode, mod.bn_groups, conv_impl=mod.conv_impl, **extra,
                      kernel_init=kernel_init,
                      bn_running_var=module_option(mod, 'bn_running_var'),
                      name=f'layer{stage}_{block}')(x, train)
    return x


class CSINet(nn.Module):
    """Encoder + optional projection head + optional shift-classification head.

    CSI (§2.2): hidden width = feature width, no BN, a K-way shift head. The other
    contrastive methods reuse it: MCL's head is Linear(f, 2048)-ReLU-Linear(2048, 128)
    (proj_hidden=2048), OECL's has BatchNorm after the hidden layer (proj_bn=True),
    MSC has no head at all (proj_dim=0: 'proj' is absent). num_shifts=0: no shift head.
    """
    depth: int = 18
    stem: str = 'cifar'
    width: int = 64
    proj_dim: int = 128
    num_shifts: int = 4
    dtype: Any = jnp.float32
    bn_mode: str = 'batch'
    bn_groups: int = 1
    width_per_group: int = 64
    input_norm: str = 'csi'
    conv_impl: str = 'auto'
    proj_hidden: int = 0   # 0 = the feature width (CSI's simclr_layer)
    proj_bn: bool = False  # BatchNorm1d after the hidden layer (OECL's head)
    param_init: str = 'flax'  # 'torch' | 'torchvision' | 'flax' (module docstring)
    bn_running_var: str = 'biased'  # 'unbiased' (torch) | 'biased' (flax)

    @nn.compact
    def __call__(self, x, train):
        feats = ResNet(self.depth, self.stem, self.width, self.dtype, bn_mode=self.bn_mode,
                       bn_groups=self.bn_groups, width_per_group=self.width_per_group,
                       input_norm=self.input_norm, conv_impl=self.conv_impl,
                       param_init=self.param_init, bn_running_var=self.bn_running_var,
                       name='encoder')(x, train)
        out = {'features': feats}
        if self.proj_dim:
            h = dense(feats, self.proj_hidden or feats.shape[-1], self.param_init, self.dtype,
                      'proj_hidden')
            if self.proj_bn:
                h = batch_norm(train, 0.9, self.dtype, self.bn_mode, self.bn_groups,
                               'proj_bn', self.bn_running_var)(h)
            z = dense(nn.relu(h), self.proj_dim, self.param_init, self.dtype, 'proj_out')
            out['proj'] = z.astype(jnp.float32)
        if self.num_shifts:
            out['shift_logits'] = dense(feats, self.num_shifts, self.param_init, self.dtype,
                                        'shift_cls').astype(jnp.float32)
        return out


STEMS = ('cifar', 'imagenet')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def check_model_config(model_cfg):
    """ConfigError for a `config.model` field no model can be built with (name, stem, dtype,
    bn_mode, bn_groups, input_norm, conv_impl, init, bn_running_var). Called by
    `jaxad.config.validate_config` before any data is read, and by `build_model`."""
    if model_cfg.name not in ARCHS:
        raise ConfigError(f'unknown model {model_cfg.name!r}; choose from {sorted(ARCHS)}')
    if model_cfg.stem not in STEMS:
        raise ConfigError(f"unknown model.stem {model_cfg.stem!r}; choose 'cifar' or 'imagenet'")
    input_norm = model_cfg.get('input_norm', 'csi')
    if input_norm not in INPUT_NORMS:
        raise ConfigError(f'unknown model.input_norm {input_norm!r}; choose from {sorted(INPUT_NORMS)}')
    if model_cfg.dtype not in DTYPES:
        raise ConfigError(f'unknown model dtype {model_cfg.dtype!r}; choose from {sorted(DTYPES)}')
    if model_cfg.bn_mode not in BN_MODES:
        raise ConfigError(f'unknown model.bn_mode {model_cfg.bn_mode!r}; choose from {BN_MODES}')
    if model_cfg.bn_groups < 1:
        raise ConfigError(f'model.bn_groups must be >= 1, got {model_cfg.bn_groups}')
    conv_impl = model_cfg.get('conv_impl', 'auto')
    if conv_impl not in CONV_IMPLS:
        raise ConfigError(f'unknown model.conv_impl {conv_impl!r}; choose from {CONV_IMPLS}')
    param_init = model_cfg.get('init', MODULE_DEFAULTS['param_init'])
    if param_init not in INITS:
        raise ConfigError(f'unknown model.init {param_init!r}; choose from {INITS}')
    bn_running_var = model_cfg.get('bn_running_var', MODULE_DEFAULTS['bn_running_var'])
    if bn_running_var not in BN_RUNNING_VARS:
        raise ConfigError(f'unknown model.bn_running_var {bn_running_var!r}; choose from '
                          f'{BN_RUNNING_VARS}')


def build_model(model_cfg, num_shifts: int, proj_dim=None) -> nn.Module:
    """CSINet from `config.model` (fields: name, stem, width, proj_dim, proj_hidden, proj_bn,
    dtype, bn_mode, bn_groups, bn_running_var, input_norm, conv_impl, init; `init_from` is
    applied by the method's init and overrides `init` there). `proj_dim` overrides
    model.proj_dim (0: no projection head). A model config without init / bn_running_var
    predates them: Flax's behaviour, as jaxad had then."""
    check_model_config(model_cfg)
    depth, width_per_group = ARCHS[model_cfg.name]
    input_norm = model_cfg.get('input_norm', 'csi')
    conv_impl = model_cfg.get('conv_impl', 'auto')
    param_init = model_cfg.get('init', MODULE_DEFAULTS['param_init'])
    bn_running_var = model_cfg.get('bn_running_var', MODULE_DEFAULTS['bn_running_var'])
    dtypes = DTYPES
    return CSINet(depth=depth, stem=model_cfg.stem, width=model_cfg.width,
                  proj_dim=model_cfg.proj_dim if proj_dim is None else proj_dim,
                  num_shifts=num_shifts, dtype=dtypes[model_cfg.dtype],
                  bn_mode=model_cfg.bn_mode, bn_groups=model_cfg.bn_groups,
                  width_per_group=width_per_group, input_norm=input_norm, conv_impl=conv_impl,
                  proj_hidden=model_cfg.get('proj_hidden', 0),
                  proj_bn=model_cfg.get('proj_bn', False), param_init=param_init,
                  bn_running_var=bn_running_var)


def count_params(params) -> int:
    return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
