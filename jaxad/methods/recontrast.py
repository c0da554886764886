"""ReContrast: contrastive reconstruction (Guo et al., NeurIPS 2023; docs/methods.md §5).

The method object `ReContrast` (bottom of this module) trains E, the OCBE bottleneck and
the decoder with the cross-reconstruction loss and scores every test image with its
anomaly map; the building blocks above it follow the official code.

Official code guojiajeremy/ReContrast @381ef13: `models/recontrast.py` (the forward),
`models/resnet.py` (`BN_layer`, RD4AD's one-class bottleneck "OCBE"), `models/de_resnet.py`
(the mirrored decoder), `utils.py` (`global_cosine_hm`, `cal_anomaly_map`, the evaluation).
Everything is NHWC; the losses and maps see float32.

Architecture (channel counts of the code as functions of the encoder's stage-1 planes
`w` (64 in torchvision) and block expansion `e` (1 BasicBlock, 4 Bottleneck); the code
hard-codes w = 64):

  encoder taps  f1: w*e @ H/4,  f2: 2w*e @ H/8,  f3: 4w*e @ H/16 (ResNet layer1..3)
  OCBE          l1 = ReLU(BN(conv3x3/2(ReLU(BN(conv3x3/2(f1))))))   w*e -> 2w*e -> 4w*e
                l2 = ReLU(BN(conv3x3/2(f2)))                         2w*e -> 4w*e
                cat[l1, l2, f3] (12w*e) -> one encoder-type stage of L4 blocks (planes 8w,
                stride 2, 1x1/2 conv+BN shortcut) -> 8w*e @ H/32, where L4 = the encoder's
                layer4 block count (resnet18: 2, resnet34/50/101/152 and wide: 3, as the code's
                BN_layer(block, layers)). `BN_layer.conv4/bn4` exist in the torch module but are
                never used in its forward; they are not built here (param-count note).
  decoder       three "up" stages (planes 4w, 2w, w; blocks = encoder layer1/2/3 counts, as
                de_resnet's layers[0..2]); the first block of each stage has its stride-2 conv
                replaced by ConvTranspose2d(k=2, s=2, no bias) and a deconv2x2+BN identity path.
                Outputs at the f1/f2/f3 levels, then `output_conv` (=2) sets of 1x1 convs with
                bias (heads), one per level.
  forward       [E(x); E'(x)] concatenated along the batch per level (so every BN of the
                bottleneck and decoder normalises over both halves, as the code does), head 0
                kept for the E half, head 1 for the E' half:
                en = [E'1, E'2, E'3, E1, E2, E3],  de = [D0(E)1, D0(E)2, D0(E)3, D1(E')1, ...].

The frozen encoder E' is the submodule 'frozen_encoder', a copy of the encoder's initial
variables (`with_frozen_copy`) that the optimiser never updates (`ReContrast.frozen_params`)
and that always runs in eval mode; its taps can also be passed in (`frozen_taps`).

The residual blocks (and Deconv2x2) are jaxad.models.resnet's; up=True gives de_resnet's
up-sampling blocks. Initialisation follows the code: convs kaiming-normal(fan_out, relu); ConvTranspose2d
keeps torch's default (kaiming-uniform a=sqrt(5) on the transposed weight, i.e.
U(+-1/sqrt(4*out))); the 1x1 heads' biases torch's default U(+-1/sqrt(fan_in)); BN 1/0.

Not bit-exact with torch (noted): the BN layers here update running_var with the biased
batch variance, flax's (torch: unbiased; these modules do not read config.model.bn_running_var
yet); the code's per-image float64 numpy map is float32 here.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxad.data import augment
from jaxad.errors import ConfigError
from jaxad.methods.base import Method
from jaxad.methods.common import require_budget
from jaxad.models.resnet import (ARCHS, BOTTLENECK_STAGE_SIZES, STAGE_SIZES, BasicBlock,
                                 Bottleneck, Deconv2x2, ResNet, block_layers, block_spec)

# torch's kaiming_normal_(mode='fan_out', nonlinearity='relu') (untruncated)
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

ALPHA_START, ALPHA_END = -3.0, 1.0


def torch_bias_init(fan_in):
    """torch's default conv bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def arch_spec(depth):
    """(stage block counts, block expansion) of a jaxad/torchvision ResNet depth."""
    if depth in STAGE_SIZES:
        return STAGE_SIZES[depth], 1
    if depth in BOTTLENECK_STAGE_SIZES:
        return BOTTLENECK_STAGE_SIZES[depth], 4
    raise ConfigError(f'ResNet depth {depth} is not supported; choose from '
                      f'{sorted(STAGE_SIZES) + sorted(BOTTLENECK_STAGE_SIZES)}')


# ----------------------------------------------------------------------------- modules

def _stage(mod, x, planes, num_blocks, up, train, prefix):
    """One ResNet stage of `mod`'s block type (jaxad.models.resnet's blocks, torch's
    kaiming-normal fan_out init), stride 2 (up-sampling when `up`) in its first block;
    blocks named prefix + index."""
    _, block_cls, extra = block_spec(mod.depth, mod.width_per_group)
    for b in range(num_blocks):
        x = block_cls(planes, 2 if b == 0 else 1, mod.dtype, mod.bn_momentum, mod.bn_mode,
                      mod.bn_groups, conv_impl=mod.conv_impl, up=up,
                      kernel_init=KAIMING_FAN_OUT, name=f'{prefix}{b}', **extra)(x, train)
    return x


class _ResNetPart(nn.Module):
    """The fields OCBE and the decoder share with the encoder; torch's conv init."""
    depth: int = 50
    width: int = 64
    width_per_group: int = 64
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_mode: str = 'batch'
    bn_groups: int = 1
    conv_impl: str = 'auto'

    @property
    def kernel_init(self):
        return KAIMING_FAN_OUT


class OCBE(_ResNetPart):
    """RD4AD's `BN_layer` (one-class bottleneck embedding), scaled by the encoder width.

    taps: (f1, f2, f3) = encoder layer1..layer3 outputs. Returns (N, H3/2, W3/2, 8*w*e) f32.
    Param names: conv1/bn1, conv2/bn2 (the f1 path), conv3/bn3 (the f2 path),
    bn_layer_{b} (the code's `bn_layer.{b}`).
    """

    @nn.compact
    def __call__(self, taps, train):
        stage_sizes, e = arch_spec(self.depth)
        w = self.width
        f1, f2, f3 = taps
        want = (w * e, 2 * w * e, 4 * w * e)
        if (f1.shape[-1], f2.shape[-1], f3.shape[-1]) != want:
            raise ConfigError(f'OCBE(depth={self.depth}, width={w}) expects tap channels {want}, '
                              f'got {(f1.shape[-1], f2.shape[-1], f3.shape[-1])}')
        conv, norm, _ = block_layers(self, train)
        l1 = nn.relu(norm('bn1')(conv(2 * w * e, 3, 2, 1, 'conv1')(f1.astype(self.dtype))))
        l1 = nn.relu(norm('bn2')(conv(4 * w * e, 3, 2, 1, 'conv2')(l1)))
        l2 = nn.relu(norm('bn3')(conv(4 * w * e, 3, 2, 1, 'conv3')(f2.astype(self.dtype))))
        x = jnp.concatenate([l1, l2, f3.astype(self.dtype)], axis=-1)
        x = _stage(self, x, 8 * w, stage_sizes[3], False, train, 'bn_layer_')
        return x.astype(jnp.float32)


class Decoder(_ResNetPart):
    """de_resnet's ResNet (`de_wide_resnet50_2(output_conv=2)` etc.), scaled by width.

    Returns a list over heads of [level1, level2, level3] float32 maps, level l at the
    resolution and channel count of encoder tap f_l (the code's out = [out1[i](f1),
    out2[i](f2), out3[i](f3) for i in heads]). output_conv=0: one 'head', the trunk.
    Param names: layer{s}_{b} (s = 1..3 from the bottleneck side), out{l}_{i}.
    """
    output_conv: int = 2

    @nn.compact
    def __call__(self, z, train):
        stage_sizes, _ = arch_spec(self.depth)
        w = self.width
        x = z.astype(self.dtype)
        feats = []
        for s, planes in enumerate((4 * w, 2 * w, w)):
            x = _stage(self, x, planes, stage_sizes[s], True, train, f'layer{s + 1}_')
            feats.append(x)
        levels = feats[::-1]  # [w*e @ f1 res, 2w*e @ f2 res, 4w*e @ f3 res]
        if not self.output_conv:
            return [[f.astype(jnp.float32) for f in levels]]
        heads = []
        for i in range(self.output_conv):
            outs = []
            for lvl, f in enumerate(levels):
                c = f.shape[-1]
                y = nn.Conv(c, (1, 1), use_bias=True, dtype=self.dtype,
                            kernel_init=KAIMING_FAN_OUT, bias_init=torch_bias_init(c),
                            name=f'out{lvl + 1}_{i}')(f)
                outs.append(y.astype(jnp.float32))
            heads.append(outs)
        return heads


def encoder_def(depth, width, width_per_group, stem='imagenet', dtype=jnp.float32,
                bn_momentum=0.9, encoder_bn_train=True, bn_groups=1, input_norm='imagenet',
                conv_impl='auto', name=None):
    """The encoder: a jaxad ResNet truncated after layer3 (the code's `layer4 = fc = None`),
    returning its stage taps. encoder_bn_train=False is the code's eval-mode encoder BN
    (running statistics, affine trained): bn_mode='frozen'."""
    return ResNet(depth=depth, stem=stem, width=width, dtype=dtype, bn_momentum=bn_momentum,
                  bn_mode='batch' if encoder_bn_train else 'frozen', bn_groups=bn_groups,
                  width_per_group=width_per_group, input_norm=input_norm, return_stages=True,
                  conv_impl=conv_impl, num_stages=3, name=name)


def taps_of(stages):
    """(f1, f2, f3) from ResNet(return_stages=True)'s dict."""
    return (stages['layer1'], stages['layer2'], stages['layer3'])


class ReContrastNet(nn.Module):
    """Trainable encoder E + OCBE + decoder, and the frozen encoder E'.

    __call__(x, frozen=None, train=False) -> (en, de), two lists of 6 float32 maps (module
    docstring). E' is the submodule 'frozen_encoder' (the encoder's architecture, always
    in eval mode, its output gradient-stopped; the method copies the encoder's initial
    variables into it and the optimiser never updates it), unless its taps (f1, f2, f3)
    are passed as `frozen`, in which case that submodule is not built.
    Submodules: 'encoder', 'frozen_encoder', 'bottleneck' (OCBE), 'decoder'.
    """
    depth: int = 50
    width: int = 64
    width_per_group: int = 128
    stem: str = 'imagenet'
    input_norm: str = 'imagenet'
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    encoder_bn_train: bool = True
    bn_groups: int = 1
    conv_impl: str = 'auto'
    output_conv: int = 2

    @nn.compact
    def __call__(self, x, frozen=None, train=False):
        if self.output_conv != 2:
            raise ConfigError('ReContrast needs output_conv=2 (one head per encoder)')
        n = x.shape[0]
        en_t = list(taps_of(net_encoder(self, name='encoder')(x, train)))
        if frozen is None:
            frozen = taps_of(net_encoder(self, name='frozen_encoder')(x, False))
        en_f = [jax.lax.stop_gradient(f.astype(jnp.float32)) for f in frozen]
        both = [jnp.concatenate([a, b], axis=0) for a, b in zip(en_t, en_f)]
        common = dict(depth=self.depth, width=self.width, width_per_group=self.width_per_group,
                      dtype=self.dtype, bn_momentum=self.bn_momentum, bn_groups=self.bn_groups,
                      conv_impl=self.conv_impl)
        z = OCBE(**common, name='bottleneck')(both, train)
        heads = Decoder(**common, output_conv=self.output_conv, name='decoder')(z, train)
        de = [h[:n] for h in heads[0]] + [h[n:] for h in heads[1]]
        return en_f + en_t, de


def net_encoder(net, name=None):
    """The encoder definition of a ReContrastNet (bound or not)."""
    return encoder_def(net.depth, net.width, net.width_per_group, net.stem, net.dtype,
                       net.bn_momentum, net.encoder_bn_train, net.bn_groups, net.input_norm,
                       net.conv_impl, name=name)


def frozen_taps(net, frozen_variables, x):
    """E'(x): the encoder definition of `net` applied in eval mode to frozen variables
    ({'params', 'batch_stats'} of an encoder subtree); no gradient."""
    stages = net_encoder(net).apply(jax.lax.stop_gradient(frozen_variables), x, train=False)
    return tuple(jax.lax.stop_gradient(t) for t in taps_of(stages))


def with_frozen_copy(variables):
    """`variables` whose 'frozen_encoder' params and statistics are the encoder's: E' =
    copy.deepcopy(E) at initialisation (after any weight import)."""
    return {col: dict(tree, frozen_encoder=tree['encoder']) for col, tree in variables.items()}


# ----------------------------------------------------------------------------- losses

def _safe_norm(x, axis, eps):
    # max(||x||, eps) with a zero gradient (not NaN) at x = 0, as torch's clamp
    return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis), eps * eps))


def cosine_similarity(a, b, axis=-1, eps=1e-8):
    """torch.nn.functional.cosine_similarity: <a, b> / (max(|a|, eps) max(|b|, eps))."""
    return jnp.sum(a * b, axis=axis) / (_safe_norm(a, axis, eps) * _safe_norm(b, axis, eps))


@jax.custom_vjp
def scale_grad(x, scale):
    """Identity in the forward pass; the backward pass multiplies the cotangent by `scale`
    (broadcast to x). The code's `b.register_hook(modify_grad)`."""
    return x


def _scale_grad_fwd(x, scale):
    return x, scale


def _scale_grad_bwd(scale, g):
    return (g * scale).astype(g.dtype), jnp.zeros_like(scale)


scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def global_cosine(a_list, b_list, weights=None):
    """sum_l w_l mean_n [1 - cos(flatten(sg(a_n)), flatten(b_n))] (utils.global_cosine)."""
    weights = [1.0] * len(a_list) if weights is None else weights
    loss = 0.0
    for a, b, wt in zip(a_list, b_list, weights):
        a = jax.lax.stop_gradient(a)
        n = a.shape[0]
        loss = loss + wt * jnp.mean(1.0 - cosine_similarity(a.reshape(n, -1), b.reshape(n, -1)))
    return loss


def hard_point_mask(a, b, alpha, factor=0.0):
    """Per-point gradient scale (N, H, W, 1): `factor` where d < mean(d) + alpha*std(d),
    1 elsewhere; d = 1 - cos over channels, std unbiased (torch .std()), all no-grad."""
    a, b = jax.lax.stop_gradient(a), jax.lax.stop_gradient(b)
    d = 1.0 - cosine_similarity(a, b)
    thresh = jnp.mean(d) + alpha * jnp.std(d, ddof=1)
    return jnp.where(d < thresh, factor, 1.0).astype(b.dtype)[..., None]


def global_cosine_hm(a_list, b_list, alpha, factor=0.0, weights=None):
    """utils.global_cosine_hm: the global cosine loss (forward value unchanged) whose
    gradient w.r.t. each b is multiplied by `factor` at the easy points (hard_point_mask)."""
    b_list = [scale_grad(b, hard_point_mask(a, b, alpha, factor)) for a, b in zip(a_list, b_list)]
    return global_cosine(a_list, b_list, weights)


def recontrast_loss(en, de, alpha, factor=0.0):
    """The training loss: hm(en[:3], de[:3]) / 2 + hm(en[3:], de[3:]) / 2."""
    return (global_cosine_hm(en[:3], de[:3], alpha, factor) / 2
            + global_cosine_hm(en[3:], de[3:], alpha, factor) / 2)


def alpha_schedule(step, total_steps, warmup_frac=0.1, start=ALPHA_START, end=ALPHA_END):
    """alpha = min(start + (end - start) * step / (warmup_frac * total_steps), end); `step`
    counts from 0 (the code's `it` before its increment). Stable scripts: warmup_frac 0.2."""
    return jnp.minimum(start + (end - start) * jnp.asarray(step, jnp.float32)
                       / (warmup_frac * total_steps), end)


# ----------------------------------------------------------------------------- maps

@functools.lru_cache(maxsize=64)
def _align_corners_matrix(n_in, n_out):
    """(n_out, n_in) linear-interpolation weights of torch's align_corners=True."""
    scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0.0)
    src = np.arange(n_out, dtype=np.float32) * scale
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - lam)
    np.add.at(m, (rows, i1), lam)
    return m


def resize_bilinear_align_corners(x, out_size):
    """F.interpolate(x, size=out_size, mode='bilinear', align_corners=True) on the last two
    axes (H, W) of x."""
    oh, ow = (out_size, out_size) if np.isscalar(out_size) else tuple(out_size)
    mh = jnp.asarray(_align_corners_matrix(x.shape[-2], oh))
    mw = jnp.asarray(_align_corners_matrix(x.shape[-1], ow))
    return jnp.einsum('oh,...hw,pw->...op', mh, x, mw, precision=jax.lax.Precision.HIGHEST)


def gaussian_weights(sigma, radius):
    """scipy.ndimage's 1-D Gaussian (order 0), normalised to sum 1."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (sigma * sigma) * x ** 2)
    return phi / phi.sum()


def _boundary_index(j, n, mode):
    """Source index of the (possibly out-of-range) indices j under scipy.ndimage's modes;
    -1 where the value is the constant 0."""
    if mode == 'reflect':      # d c b a | a b c d | d c b a
        j = np.mod(j, 2 * n)
        return np.where(j >= n, 2 * n - 1 - j, j)
    if mode == 'mirror':       # d c b | a b c d | c b a
        if n == 1:
            return np.zeros_like(j)
        j = np.mod(j, 2 * n - 2)
        return np.where(j >= n, 2 * n - 2 - j, j)
    if mode == 'nearest':
        return np.clip(j, 0, n - 1)
    if mode == 'wrap':
        return np.mod(j, n)
    if mode == 'constant':
        return np.where((j < 0) | (j >= n), -1, j)
    raise ConfigError(f'unknown Gaussian filter mode {mode!r}')


@functools.lru_cache(maxsize=64)
def _filter_matrix(n, sigma, radius, mode):
    wts = gaussian_weights(sigma, radius)
    i = np.arange(n)[:, None]
    k = np.arange(-radius, radius + 1)[None, :]
    src = _boundary_index(i + k, n, mode)
    m = np.zeros((n, n + 1), np.float64)  # column n collects the constant-0 taps
    np.add.at(m, (np.broadcast_to(i, src.shape), np.where(src < 0, n, src)),
              np.broadcast_to(wts, src.shape))
    return m[:, :n].astype(np.float32)


def gaussian_filter(x, sigma=4.0, truncate=4.0, mode='reflect', radius=None):
    """scipy.ndimage.gaussian_filter over the last two axes (H, W) of x: radius
    int(truncate*sigma + 0.5) (16 for sigma 4), boundary `mode` (scipy's default 'reflect',
    the code's). radius=2, mode='constant' is the multi-class script's 5x5 GPU kernel
    (utils.get_gaussian_kernel(5, 4), zero padding)."""
    radius = int(truncate * sigma + 0.5) if radius is None else int(radius)
    gh = jnp.asarray(_filter_matrix(x.shape[-2], float(sigma), radius, mode))
    gw = jnp.asarray(_filter_matrix(x.shape[-1], float(sigma), radius, mode))
    return jnp.einsum('oh,...hw,pw->...op', gh, x, gw, precision=jax.lax.Precision.HIGHEST)


def anomaly_map(en_list, de_list, out_size, sigma=4.0, reduce='sum', mode='reflect',
                radius=None):
    """(N, H, W) map: reduce over the pairs of up_{bilinear, align_corners}(1 - cos_channel),
    then the Gaussian filter (sigma=0: none). reduce='sum' is cal_anomaly_map(amap_mode='a'),
    'mean' the multi-class cal_anomaly_maps."""
    maps = [resize_bilinear_align_corners(1.0 - cosine_similarity(e.astype(jnp.float32),
                                                                  d.astype(jnp.float32)),
                                          out_size)
            for e, d in zip(en_list, de_list)]
    m = sum(maps[1:], maps[0])
    if reduce == 'mean':
        m = m / len(maps)
    elif reduce != 'sum':
        raise ConfigError(f"unknown anomaly-map reduce {reduce!r}; choose 'sum' or 'mean'")
    return gaussian_filter(m, sigma, mode=mode, radius=radius) if sigma else m


def image_score(amap, max_ratio=0.0):
    """(N,) image scores: max of the map (max_ratio=0) or the mean of its top
    int(H*W*max_ratio) pixels (at least 1), as `evaluation(max_ratio=...)`."""
    flat = amap.reshape(amap.shape[0], -1)
    if max_ratio <= 0:
        return jnp.max(flat, axis=1)
    k = max(int(flat.shape[1] * max_ratio), 1)
    return jnp.mean(jax.lax.top_k(flat, k)[0], axis=1)


def param_count(tree):
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(tree)))


def arch_of(name):
    """(depth, width_per_group) of a config.model.name, e.g. 'wide_resnet50_2'."""
    if name not in ARCHS:
        raise ConfigError(f'unknown model {name!r}; choose from {sorted(ARCHS)}')
    return ARCHS[name]


# ----------------------------------------------------------------------------- method

class ReContrast(Method):
    """The ReContrast method object for the shared trainer and evaluator.

    Training (one step = the code's iteration): x in [0, 1] (ImageNet-normalised inside the
    encoder), (en, de) = net(x) with the bottleneck/decoder BN in train mode over [E; E'],
    L = recontrast_loss(en, de, alpha(step), recontrast.factor). The encoder's BN follows
    model.bn_mode ('batch' = the code's train mode, 'frozen' = its eval mode); E' is always
    in eval mode and never updated. Optimiser (recontrast_base in configs/recipes.py): AdamW
    2e-3 on the bottleneck and decoder, AdamW 1e-5 on the encoder (optim.group_lr).

    Scores (all modules in eval mode): 'map' (N, H, W), the Gaussian-smoothed sum of the six
    1 - cos maps at image resolution; 'max' its maximum; 'top_mean' the mean of its top
    recontrast.max_ratio (default 1%) pixels. The headline is 'max' when max_ratio = 0 (the
    class-separated scripts), 'top_mean' otherwise (the multi-class script). No train
    bank is needed.
    """
    config_section = 'recontrast'
    needs_step = True   # alpha(step) inside the loss
    needs_bank = False  # the scores use no training features
    # Change the scores, not the model (jaxad.fingerprint: rescored, not refused).
    scoring_fields = ('recontrast.sigma', 'recontrast.map_reduce', 'recontrast.max_ratio')
    frozen_params = ('^frozen_encoder/',)

    @classmethod
    def default_config(cls):
        c = ml_collections.ConfigDict()
        c.factor = 0.0  # gradient scale at the easy points (every official script: 0)
        c.alpha_warmup_fraction = 0.1  # alpha -3 -> 1 over this share of the steps
        c.sigma = 4.0  # Gaussian smoothing of the anomaly map (0: none)
        c.map_reduce = 'sum'  # sum (class-separated) | mean (multi-class) of the 6 maps
        c.max_ratio = 0.0  # 0: image score = max of the map; > 0: mean of the top share
        return c

    @classmethod
    def validate(cls, config):
        cfg = config.recontrast
        if not 0 < cfg.alpha_warmup_fraction <= 1:
            raise ConfigError(f'recontrast.alpha_warmup_fraction must be in (0, 1], got '
                              f'{cfg.alpha_warmup_fraction}')
        if not 0 <= cfg.max_ratio < 1:
            raise ConfigError(f'recontrast.max_ratio must be in [0, 1), got {cfg.max_ratio}')
        if cfg.sigma < 0:
            raise ConfigError(f'recontrast.sigma must be >= 0, got {cfg.sigma}')
        if cfg.map_reduce not in ('sum', 'mean'):
            raise ConfigError(f"recontrast.map_reduce must be 'sum' or 'mean', got "
                              f'{cfg.map_reduce!r}')

    def __init__(self, config, budget=None):
        super().__init__(config, budget)
        cfg = config.recontrast
        model = config.model
        depth, width_per_group = arch_of(model.name)
        dtypes = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
        if model.dtype not in dtypes:
            raise ConfigError(f'unknown model dtype {model.dtype!r}; choose from {sorted(dtypes)}')
        self.model = ReContrastNet(
            depth=depth, width=model.width, width_per_group=width_per_group, stem=model.stem,
            input_norm=model.input_norm, dtype=dtypes[model.dtype],
            encoder_bn_train=model.bn_mode == 'batch', bn_groups=model.bn_groups,
            conv_impl=model.get('conv_impl', 'auto'))
        self.cfg, self.init_from = cfg, model.get('init_from', '')
        # alpha's schedule length: the run's total steps (None without a budget: no loss).
        self.total_steps = None if budget is None else budget.total_steps
        self.headline_score = 'max' if cfg.max_ratio == 0 else 'top_mean'

    def paper_one_class(self, class_names):
        """None: MVTec's classes are defect types, not one-class tables; the published
        per-category numbers (docs/methods.md §5.6) need ImageNet weights."""
        del class_names
        return None

    def density_features(self, features):
        """The trainable encoder's pooled layer3 features."""
        return features['pooled']

    def init_variables(self, key, image_shape):
        from jaxad.models.convert import init_variables
        # A converted torchvision file also holds layer4, which this encoder does not build.
        return with_frozen_copy(init_variables(self.model, key, image_shape, self.init_from,
                                               skip=('layer4_',)))

    def loss(self, params, batch_stats, consts, batch, key):
        del consts, key  # no augmentation: Resize -> ToTensor -> normalise
        if self.total_steps is None:
            require_budget(self, "the length of alpha's schedule (the run's total steps)")
        x = augment.to_float(batch['image'])
        (en, de), mutated = self.model.apply({'params': params, 'batch_stats': batch_stats},
                                             x, None, True, mutable=['batch_stats'])
        alpha = alpha_schedule(batch['step'], self.total_steps, self.cfg.alpha_warmup_fraction)
        loss = recontrast_loss(en, de, alpha, self.cfg.factor)
        return loss, ({'loss': loss, 'alpha': alpha}, mutated['batch_stats'])

    def features(self, variables, images, indices, key):
        """The anomaly map (N, H, W) and the encoder's pooled layer3 (for eval.density)."""
        del indices, key
        en, de = self.model.apply(variables, augment.to_float(images), None, False)
        amap = anomaly_map(en, de, images.shape[1:3], self.cfg.sigma, self.cfg.map_reduce)
        return {'map': amap, 'pooled': jnp.mean(en[5], axis=(1, 2))}

    def fit_scoring(self, train_features):
        # Nothing is fitted: keep the bank size (a non-empty tree for the checkpoint).
        return {'num_bank': jnp.asarray(train_features['map'].shape[0], jnp.int32)}

    def score(self, scoring, test_features):
        del scoring
        amap = test_features['map']
        return {'max': image_score(amap, 0.0),
                'top_mean': image_score(amap, self.cfg.max_ratio or 0.01),
                'map': amap}


__all__ = ['Deconv2x2', 'BasicBlock', 'Bottleneck', 'OCBE', 'Decoder', 'ReContrastNet',
           'encoder_def', 'net_encoder', 'frozen_taps', 'taps_of', 'with_frozen_copy',
           'cosine_similarity', 'ReContrast',
           'scale_grad', 'global_cosine', 'hard_point_mask', 'global_cosine_hm',
           'recontrast_loss', 'alpha_schedule', 'resize_bilinear_align_corners',
           'gaussian_weights', 'gaussian_filter', 'anomaly_map', 'image_score', 'param_count',
           'arch_of']
