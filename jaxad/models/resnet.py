"""ResNet-18/34 encoders (CIFAR and ImageNet stems) with the CSI heads.

Layout follows the CSI code (methods.md §2.2): inputs in [0, 1] are normalised
inside the network with (x - 0.5) / 0.5, BasicBlocks [2,2,2,2] or [3,4,6,3],
global average pooling to the penultimate features f(x). Heads:
projection 512 -> 512 -> 128 (no BN; hidden = feature width) and the shift classifier 512 -> K.

Convolutions use explicit symmetric padding (torch semantics) so that strided
layers match PyTorch; 'SAME' would pad (0, 1) for stride 2.
Params are always float32; `dtype` is the compute dtype (bfloat16 on
accelerators). Everything the loss sees is cast back to float32.

BatchNorm (config.model.bn_mode / bn_groups, a per-method choice):
'batch' normalises with the statistics of the whole global batch (under jit over a
sharded batch that is SyncBN for free); bn_groups = G > 1 instead takes statistics per
contiguous G-th of the batch, which is what G GPUs without SyncBN do (CSI's published
runs: 4 GPUs x 32 images); 'frozen' keeps the running statistics during training (MSC).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxad.errors import ConfigError

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
BN_MODES = ('batch', 'frozen')


class GroupedBatchNorm(nn.Module):
    """BatchNorm with statistics per contiguous group of the batch (ghost batches).

    Same variables as `nn.BatchNorm` (params scale/bias, batch_stats mean/var), so
    checkpoints and weight import do not care. Biased variance, as flax; the running
    statistics move towards the mean over groups of the group statistics.
    """
    groups: int
    momentum: float
    epsilon: float
    dtype: Any

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
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean.reshape(-1, c), 0)
                ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(var.reshape(-1, c), 0)
        return (y * scale + bias).astype(self.dtype)


def batch_norm(train, momentum, dtype, bn_mode, bn_groups, name):
    """The BatchNorm layer for `bn_mode` / `bn_groups` (module docstring)."""
    use_running_average = not train or bn_mode == 'frozen'
    if bn_groups > 1:
        layer = GroupedBatchNorm(bn_groups, momentum, 1e-5, dtype, name=name)
        return lambda x: layer(x, use_running_average)
    return nn.BatchNorm(use_running_average=use_running_average, momentum=momentum,
                        epsilon=1e-5, dtype=dtype, name=name)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a 1x1-conv+BN shortcut when the shape changes."""
    features: int
    strides: int
    dtype: Any
    bn_momentum: float
    bn_mode: str = 'batch'
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train):
        conv = lambda f, k, s, p, name: nn.Conv(  # noqa: E731
            f, (k, k), (s, s), padding=((p, p), (p, p)), use_bias=False,
            dtype=self.dtype, name=name)
        norm = lambda name: batch_norm(train, self.bn_momentum, self.dtype,  # noqa: E731
                                       self.bn_mode, self.bn_groups, name)
        y = nn.relu(norm('bn1')(conv(self.features, 3, self.strides, 1, 'conv1')(x)))
        y = norm('bn2')(conv(self.features, 3, 1, 1, 'conv2')(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = norm('shortcut_bn')(conv(self.features, 1, self.strides, 0, 'shortcut_conv')(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet encoder returning the pooled penultimate features (float32)."""
    depth: int = 18
    stem: str = 'cifar'  # 'cifar': 3x3 s1, no max-pool; 'imagenet': 7x7 s2 + max-pool
    width: int = 64      # channels of the first stage (64 in the papers)
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9  # = PyTorch momentum 0.1
    bn_mode: str = 'batch'
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train):
        if self.depth not in STAGE_SIZES:
            raise ConfigError(f'ResNet depth {self.depth} is not supported; choose from {sorted(STAGE_SIZES)}')
        x = ((x - 0.5) / 0.5).astype(self.dtype)
        norm = lambda name: batch_norm(train, self.bn_momentum, self.dtype,  # noqa: E731
                                       self.bn_mode, self.bn_groups, name)
        if self.stem == 'cifar':
            x = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                        dtype=self.dtype, name='conv1')(x)
            x = nn.relu(norm('bn1')(x))
        elif self.stem == 'imagenet':
            x = nn.Conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                        dtype=self.dtype, name='conv1')(x)
            x = nn.relu(norm('bn1')(x))
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        else:
            raise ConfigError(f"unknown ResNet stem {self.stem!r}; choose 'cifar' or 'imagenet'")
        for stage, num_blocks in enumerate(STAGE_SIZES[self.depth]):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(self.width * 2 ** stage, strides, self.dtype, self.bn_momentum,
                               self.bn_mode, self.bn_groups,
                               name=f'layer{stage + 1}_{block}')(x, train)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class CSINet(nn.Module):
    """Encoder + projection head + shift-classification head (CSI, §2.2)."""
    depth: int = 18
    stem: str = 'cifar'
    width: int = 64
    proj_dim: int = 128
    num_shifts: int = 4
    dtype: Any = jnp.float32
    bn_mode: str = 'batch'
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train):
        feats = ResNet(self.depth, self.stem, self.width, self.dtype, bn_mode=self.bn_mode,
                       bn_groups=self.bn_groups, name='encoder')(x, train)
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)  # noqa: E731
        # Hidden width = feature width (512 at width 64), as in CSI's simclr_layer.
        h = nn.relu(dense(feats.shape[-1], 'proj_hidden')(feats))
        z = dense(self.proj_dim, 'proj_out')(h)
        shift_logits = dense(self.num_shifts, 'shift_cls')(feats)
        return {'features': feats,
                'proj': z.astype(jnp.float32),
                'shift_logits': shift_logits.astype(jnp.float32)}


def build_model(model_cfg, num_shifts: int) -> nn.Module:
    """CSINet from `config.model` (fields: name, stem, width, proj_dim, dtype)."""
    depths = {'resnet18': 18, 'resnet34': 34}
    if model_cfg.name not in depths:
        raise ConfigError(f'unknown model {model_cfg.name!r}; choose from {sorted(depths)}')
    dtypes = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
    if model_cfg.dtype not in dtypes:
        raise ConfigError(f'unknown model dtype {model_cfg.dtype!r}; choose from {sorted(dtypes)}')
    if model_cfg.bn_mode not in BN_MODES:
        raise ConfigError(f'unknown model.bn_mode {model_cfg.bn_mode!r}; choose from {BN_MODES}')
    if model_cfg.bn_groups < 1:
        raise ConfigError(f'model.bn_groups must be >= 1, got {model_cfg.bn_groups}')
    return CSINet(depth=depths[model_cfg.name], stem=model_cfg.stem, width=model_cfg.width,
                  proj_dim=model_cfg.proj_dim, num_shifts=num_shifts,
                  dtype=dtypes[model_cfg.dtype], bn_mode=model_cfg.bn_mode,
                  bn_groups=model_cfg.bn_groups)


def count_params(params) -> int:
    return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
