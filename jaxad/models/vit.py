"""Vision Transformers in Flax (ViT-S/B/L, patch 8/14/16) and their weights from timm or DINOv2.

The network is timm's `VisionTransformer` / DINOv2's `DinoVisionTransformer` (docs/methods.md
§8.1), pre-norm blocks:

  tokens = [cls + pos_0, registers..., patch_j + pos_j]      (registers: DINOv2-reg, no pos)
  x      = x + ls1 * Attn(LN1(x));   x = x + ls2 * MLP(LN2(x))  (ls: LayerScale, DINOv2)
  Attn   = softmax(q k^T / sqrt(d_head)) v over `heads` heads, q, k, v from one fused Linear
  MLP    = Linear(4 dim) -> GELU (erf) -> Linear(dim);  LN eps 1e-6;  a final LN
  output = {'cls': the class token, 'patches': the patch tokens as a (h, w, dim) grid}

For an image whose patch grid is not the pretrained one, the patch position embeddings are
resized bicubically (`bicubic_resize`: PyTorch's `F.interpolate(mode='bicubic',
align_corners=False)`, a = -0.75, no antialias), by size as timm does or by DINOv2's scale
factor (grid + 0.1) / pretrained grid (`pos_offset=0.1`).

`load_vit_weights(path)` reads a timm or DINOv2 state dict (.pth, .safetensors or .npz of
torch names; `jaxad.models.convert.load_state_dict`) into this module's variables; a file
that does not fit is refused naming the first missing or unexpected key and its shape.
"""
import dataclasses
import functools
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxad.errors import ConfigError
from jaxad.models.convert import ConversionError, load_state_dict

# name -> (width, depth, heads); patch size and registers come with the weights
VIT_ARCHS = {'vit_small': (384, 12, 6), 'vit_base': (768, 12, 12), 'vit_large': (1024, 24, 16)}
HEAD_DIM = 64  # every ViT above: heads = width / 64
# ImageNet normalisation of timm's and DINO's ViTs (on [0, 1] pixels)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LN_EPS = 1e-6


def vit_input(x):
    """Float images (N, H, W, C) in [0, 1], already at the ViT's input size, as the ViT
    weights expect them: grey images (C = 1) repeated to three channels, then
    ImageNet-normalised. The resize or crop is the caller's (it differs between methods)."""
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def _cubic_weights(t, a=-0.75):
    """PyTorch's cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return jnp.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_axis(x, axis, out, scale):
    """Bicubic resize of `x` along `axis` to `out` samples; source coordinate of output i is
    (i + 0.5) / scale - 0.5 (align_corners=False), taps clamped to the border."""
    n = x.shape[axis]
    src = (jnp.arange(out, dtype=jnp.float32) + 0.5) / scale - 0.5
    i0 = jnp.floor(src)
    w = _cubic_weights(src - i0)                                   # (out, 4)
    taps = jnp.clip(i0.astype(jnp.int32)[:, None] + jnp.arange(-1, 3), 0, n - 1)  # (out, 4)
    x = jnp.moveaxis(x, axis, 0)
    y = jnp.einsum('ok,ok...->o...', w.astype(x.dtype), x[taps])
    return jnp.moveaxis(y, 0, axis)


def bicubic_resize(x, size, scale=None):
    """(H, W, ...) -> (size[0], size[1], ...) as `F.interpolate(mode='bicubic',
    align_corners=False)` on the leading two axes: by `size`, or with `scale` (sy, sx) the
    coordinates mapped by that scale factor (PyTorch's scale_factor= without
    recompute_scale_factor)."""
    sy, sx = scale if scale is not None else (size[0] / x.shape[0], size[1] / x.shape[1])
    return _resize_axis(_resize_axis(x, 0, size[0], sy), 1, size[1], sx)


class Block(nn.Module):
    dim: int
    heads: int
    layerscale: bool
    dtype: jnp.dtype = jnp.float32
    gelu_tanh: bool = False

    @nn.compact
    def __call__(self, x):
        b, n, _ = x.shape
        hd = self.dim // self.heads
        y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name='norm1')(x)
        qkv = nn.Dense(3 * self.dim, dtype=self.dtype, name='attn_qkv')(y)
        q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.heads, hd), 2, 0)
        logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(hd)
        y = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits.astype(jnp.float32), -1)
                       .astype(self.dtype), v).reshape(b, n, self.dim)
        y = nn.Dense(self.dim, dtype=self.dtype, name='attn_proj')(y)
        if self.layerscale:
            y = y * self.param('ls1', nn.initializers.constant(1e-5), (self.dim,))
        x = x + y
        y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name='norm2')(x)
        y = nn.Dense(4 * self.dim, dtype=self.dtype, name='mlp_fc1')(y)
        y = nn.Dense(self.dim, dtype=self.dtype, name='mlp_fc2')(
            nn.gelu(y, approximate=self.gelu_tanh))
        if self.layerscale:
            y = y * self.param('ls2', nn.initializers.constant(1e-5), (self.dim,))
        return x + y


class ViT(nn.Module):
    """A ViT on float images (B, H, W, C) already normalised; H and W multiples of `patch`."""
    dim: int = 384
    depth: int = 12
    heads: int = 6
    patch: int = 16
    pos_grid: int = 14  # side of the pretrained patch grid (224 / 16)
    num_registers: int = 0
    layerscale: bool = False
    pos_offset: float = 0.0  # DINOv2: 0.1 (its interpolate_offset)
    dtype: jnp.dtype = jnp.float32
    gelu_tanh: bool = False  # big_vision's ViTs use flax's tanh-approximate GELU

    @nn.compact
    def __call__(self, x, train=False):
        del train  # no dropout, no BatchNorm
        b, height, width, _ = x.shape
        if height % self.patch or width % self.patch:
            raise ConfigError(f'ViT with patch {self.patch}: image {height}x{width} is not a '
                              f'multiple of it')
        t = nn.Conv(self.dim, (self.patch,) * 2, strides=(self.patch,) * 2, padding='VALID',
                    dtype=self.dtype, name='patch_embed')(x)
        h, w = t.shape[1:3]
        init = nn.initializers.normal(0.02)
        cls = self.param('cls_token', init, (1, 1, self.dim))
        pos = self.param('pos_embed', init, (1, 1 + self.pos_grid ** 2, self.dim))
        grid = pos[0, 1:].reshape(self.pos_grid, self.pos_grid, self.dim)
        if (h, w) != (self.pos_grid, self.pos_grid):
            scale = None
            if self.pos_offset:
                scale = ((h + self.pos_offset) / self.pos_grid,
                         (w + self.pos_offset) / self.pos_grid)
            grid = bicubic_resize(grid, (h, w), scale)
        tokens = [jnp.broadcast_to(cls + pos[:, :1], (b, 1, self.dim))]
        if self.num_registers:
            reg = self.param('register_tokens', init, (1, self.num_registers, self.dim))
            tokens.append(jnp.broadcast_to(reg, (b, self.num_registers, self.dim)))
        tokens.append((t + grid[None]).reshape(b, h * w, self.dim))
        x = jnp.concatenate(tokens, axis=1).astype(self.dtype)
        for i in range(self.depth):
            x = Block(self.dim, self.heads, self.layerscale, self.dtype, self.gelu_tanh,
                      name=f'blocks_{i}')(x)
        x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name='norm')(x)
        start = 1 + self.num_registers
        return {'cls': x[:, 0].astype(jnp.float32),
                'patches': x[:, start:].reshape(b, h, w, self.dim).astype(jnp.float32)}


# ------------------------------------------------------------------ weights

@dataclasses.dataclass(frozen=True)
class ViTSpec:
    """What a state dict says of its ViT."""
    dim: int
    depth: int
    patch: int
    pos_grid: int
    num_registers: int
    layerscale: bool
    num_heads: int = 0  # 0: width / 64 (timm, DINO, DINOv2)
    gelu_tanh: bool = False  # big_vision

    @property
    def heads(self):
        return self.num_heads or self.dim // HEAD_DIM

    def module(self, pos_offset=0.0, dtype=jnp.float32):
        return ViT(self.dim, self.depth, self.heads, self.patch, self.pos_grid,
                   self.num_registers, self.layerscale, pos_offset, dtype, self.gelu_tanh)


# Keys of a timm / DINOv2 checkpoint that no feature uses.
IGNORED = re.compile(r'^(head\.|head_dist\.|fc_norm\.|mask_token$)')
REGISTER_KEYS = ('register_tokens', 'reg_token')  # DINOv2, timm


def _strip(sd):
    """Without DataParallel's 'module.' prefix, and DINOv2's chunked blocks (block_chunks > 0:
    'blocks.C.N.' holds block N) as plain 'blocks.N.'."""
    out = {}
    for k, v in sd.items():
        k = k[len('module.'):] if k.startswith('module.') else k
        out[re.sub(r'^blocks\.\d+\.(\d+)\.', r'blocks.\1.', k)] = v
    return out


def vit_spec(sd, path='weights'):
    """The `ViTSpec` of a timm / DINOv2 state dict (its shapes)."""
    for key in ('patch_embed.proj.weight', 'pos_embed', 'cls_token'):
        if key not in sd:
            raise ConversionError(f'{path}: not a ViT state dict: no {key!r} (first keys: '
                                  f'{sorted(sd)[:3]})')
    dim, _, patch, _ = sd['patch_embed.proj.weight'].shape
    grid = int(round(math.sqrt(sd['pos_embed'].shape[1] - 1)))
    if grid * grid + 1 != sd['pos_embed'].shape[1]:
        raise ConversionError(f'{path}: pos_embed {tuple(sd["pos_embed"].shape)} is not one class '
                              'token plus a square grid')
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r'blocks\.(\d+)\.', k))}
    registers = next((sd[k].shape[1] for k in REGISTER_KEYS if k in sd), 0)
    return ViTSpec(int(dim), len(blocks), int(patch), grid, int(registers),
                   'blocks.0.ls1.gamma' in sd)


def _torch_key(path):
    """Flax param path -> (torch key, layout): 'dense' (transpose), 'conv' (OIHW), 'as is'."""
    name = '/'.join(path)
    if name in ('cls_token', 'pos_embed'):
        return name, 'as is'
    if name == 'register_tokens':
        return name, 'as is'
    if name.startswith('patch_embed/'):
        return 'patch_embed.proj.' + ('weight' if path[-1] == 'kernel' else 'bias'), (
            'conv' if path[-1] == 'kernel' else 'as is')
    m = re.match(r'blocks_(\d+)/(.+)', name)
    prefix = f'blocks.{m.group(1)}.' if m else ''
    rest = m.group(2) if m else name
    if rest in ('ls1', 'ls2'):
        return f'{prefix}{rest}.gamma', 'as is'
    module, leaf = rest.rsplit('/', 1)
    module = {'attn_qkv': 'attn.qkv', 'attn_proj': 'attn.proj', 'mlp_fc1': 'mlp.fc1',
              'mlp_fc2': 'mlp.fc2'}.get(module, module)
    torch_leaf = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[leaf]
    return f'{prefix}{module}.{torch_leaf}', 'dense' if leaf == 'kernel' else 'as is'


def state_dict_to_params(sd, spec, path='weights'):
    """{'params': ...} of `spec.module()` from a timm / DINOv2 state dict; ConversionError
    naming the first missing or unexpected key (with its shape) or shape mismatch."""
    sd = _strip(sd)
    if 'reg_token' in sd:  # timm's name for DINOv2's register tokens
        sd = dict(sd, register_tokens=sd.pop('reg_token'))
    module = spec.module()
    shapes = jax.eval_shape(lambda: module.init(
        jax.random.key(0), jnp.zeros((1, spec.patch * spec.pos_grid,
                                      spec.patch * spec.pos_grid, 3))))['params']
    flat = {tuple(k.key for k in p): s for p, s in
            jax.tree_util.tree_flatten_with_path(shapes)[0]}
    out, used = {}, set()
    for p, s in flat.items():
        key, layout = _torch_key(p)
        if key not in sd:
            want = s.shape[::-1] if layout == 'dense' else (
                (s.shape[3], s.shape[2], s.shape[0], s.shape[1]) if layout == 'conv' else s.shape)
            raise ConversionError(f'{path}: missing key {key!r} (shape {tuple(want)}) for a '
                                  f'ViT of width {spec.dim}, {spec.depth} blocks')
        a = np.asarray(sd[key], np.float32)
        a = a.T if layout == 'dense' else a.transpose(2, 3, 1, 0) if layout == 'conv' else a
        if a.shape != s.shape:
            raise ConversionError(f'{path}: {key!r} has shape {tuple(sd[key].shape)}, the ViT '
                                  f'expects {tuple(s.shape[::-1] if layout == "dense" else s.shape)}')
        out[p] = a
        used.add(key)
    extra = sorted(k for k in sd if k not in used and not IGNORED.match(k))
    if extra:
        raise ConversionError(f'{path}: unexpected key {extra[0]!r} (shape '
                              f'{tuple(np.shape(sd[extra[0]]))}) in a ViT state dict'
                              + (f', and {len(extra) - 1} more' if len(extra) > 1 else ''))
    return {'params': _unflatten(out)}


def _unflatten(flat):
    tree = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def load_vit_weights(path):
    """(ViTSpec, {'params'}) of a timm / DINO / DINOv2 state dict (.pth, .safetensors, .npz
    of torch names) or a big_vision ViT checkpoint (.npz of flax names, `bigvision_params`)."""
    sd = _strip(load_state_dict(path))
    if any(k.startswith(('Transformer/', 'params/Transformer/')) for k in sd):
        return bigvision_params(sd, path)
    spec = vit_spec(sd, path)
    return spec, state_dict_to_params(sd, spec, path)


def bigvision_params(npz, path='weights'):
    """(ViTSpec, {'params'}) of a big_vision ViT (`big_vision/models/vit.py`, pool_type 'tok':
    a class token) saved as .npz of '/'-joined flax names, as its `utils.load_params` reads.

    Its layout: `embedding` (the patch conv, HWIO), `cls`, `pos_embedding` (1, h*w, D) added
    to the patches only (older checkpoints: under `Transformer/`, or `posembed_input/`, with
    the class token's entry first, 1 + h*w rows), `Transformer/encoderblock_N/` with
    `LayerNorm_0`, `MultiHeadDotProductAttention_0/{query,key,value}` (kernels D x heads x
    d_head), `out` (heads x d_head x D), `LayerNorm_1`, `MlpBlock_0/Dense_{0,1}`, then
    `Transformer/encoder_norm`; GELU is flax's tanh approximation."""
    sd = {k[len('params/'):] if k.startswith('params/') else k: np.asarray(v, np.float32)
          for k, v in npz.items()}

    def take(key):
        if key not in sd:
            raise ConversionError(f'{path}: missing key {key!r} in a big_vision ViT checkpoint')
        return sd.pop(key)
    if 'cls' not in sd:
        raise ConversionError(f'{path}: a big_vision ViT without a class token (pool_type '
                              "'gap' or 'map'): only pool_type 'tok' is read")
    pe_key = next((k for k in ('pos_embedding', 'Transformer/pos_embedding',
                               'Transformer/posembed_input/pos_embedding') if k in sd), None)
    if pe_key is None:
        raise ConversionError(f'{path}: missing key \'pos_embedding\' (a learned position '
                              'embedding) in a big_vision ViT checkpoint')
    pe = take(pe_key)
    grid = int(round(math.sqrt(pe.shape[1])))
    if grid * grid != pe.shape[1]:  # old layout: the class token's entry first
        grid = int(round(math.sqrt(pe.shape[1] - 1)))
    else:  # the class token has no position: a zero entry for it
        pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
    kernel = take('embedding/kernel')
    depth = len({m.group(1) for k in sd if (m := re.match(r'Transformer/encoderblock_(\d+)/', k))})
    _, heads, _ = sd['Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel'].shape
    dim = kernel.shape[-1]
    spec = ViTSpec(int(dim), depth, int(kernel.shape[0]), grid, 0, False, int(heads), True)
    params = {'patch_embed': {'kernel': kernel, 'bias': take('embedding/bias')},
              'cls_token': take('cls'), 'pos_embed': pe,
              'norm': {'scale': take('Transformer/encoder_norm/scale'),
                       'bias': take('Transformer/encoder_norm/bias')}}
    for i in range(depth):
        b = f'Transformer/encoderblock_{i}/'
        att = b + 'MultiHeadDotProductAttention_0/'
        qkv = [take(f'{att}{n}/kernel').reshape(dim, dim) for n in ('query', 'key', 'value')]
        qkv_b = [take(f'{att}{n}/bias').reshape(dim) for n in ('query', 'key', 'value')]
        params[f'blocks_{i}'] = {
            'norm1': {'scale': take(b + 'LayerNorm_0/scale'), 'bias': take(b + 'LayerNorm_0/bias')},
            'attn_qkv': {'kernel': np.concatenate(qkv, axis=1), 'bias': np.concatenate(qkv_b)},
            'attn_proj': {'kernel': take(att + 'out/kernel').reshape(dim, dim),
                          'bias': take(att + 'out/bias')},
            'norm2': {'scale': take(b + 'LayerNorm_1/scale'), 'bias': take(b + 'LayerNorm_1/bias')},
            'mlp_fc1': {'kernel': take(b + 'MlpBlock_0/Dense_0/kernel'),
                        'bias': take(b + 'MlpBlock_0/Dense_0/bias')},
            'mlp_fc2': {'kernel': take(b + 'MlpBlock_0/Dense_1/kernel'),
                        'bias': take(b + 'MlpBlock_0/Dense_1/bias')}}
    extra = sorted(k for k in sd if not k.startswith(('head/', 'pre_logits/')))
    if extra:
        raise ConversionError(f'{path}: unexpected key {extra[0]!r} (shape '
                              f'{tuple(sd[extra[0]].shape)}) in a big_vision ViT checkpoint')
    # every shape as the module builds it (a wrong one fails here, not inside a run),
    # matched by parameter path
    shapes = jax.eval_shape(lambda: spec.module().init(
        jax.random.key(0), jnp.zeros((1, spec.patch * grid, spec.patch * grid, 3))))['params']
    want = traverse_util.flatten_dict(shapes, sep='/')
    have = traverse_util.flatten_dict(params, sep='/')
    for name, s_ in want.items():
        if name not in have:
            raise ConversionError(f'{path}: the ViT parameter {name} (shape {tuple(s_.shape)}) '
                                  'has no value in the big_vision checkpoint')
        if tuple(s_.shape) != tuple(have[name].shape):
            raise ConversionError(f'{path}: {name} has shape {tuple(have[name].shape)}, the '
                                  f'ViT expects {tuple(s_.shape)}')
    extra = sorted(set(have) - set(want))
    if extra:
        raise ConversionError(f'{path}: {extra[0]} (shape {tuple(have[extra[0]].shape)}) is '
                              'not a parameter of the ViT')
    return spec, {'params': params}


@functools.lru_cache(maxsize=4)
def _cached(path, mtime):
    del mtime  # part of the key: a rewritten file is read again
    spec, variables = load_vit_weights(path)
    return spec, variables['params']


def vit_weights(path, what='weights'):
    """(ViTSpec, params as NumPy) of a ViT weight file, read once per process; `what` names
    the setting in the error for a missing file."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise ConfigError(f'{what}={path}: no such file')
    return _cached(path, os.path.getmtime(path))


def vit_variables(model, params, key, input_shape):
    """{'params', 'batch_stats': {}} of `model`: `params` (from `vit_weights`) through one
    host callback rather than as constants in the compiled init (a ViT-S is 88 MB of
    float32), or a random init when `params` is None. Pure: a table vmaps it."""
    if params is None:
        return {'params': model.init(key, jnp.zeros(input_shape))['params'], 'batch_stats': {}}
    leaves, tree = jax.tree_util.tree_flatten(params)
    values = jax.pure_callback(lambda: leaves,
                               [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
                               vmap_method='broadcast_all')
    return {'params': jax.tree_util.tree_unflatten(tree, values), 'batch_stats': {}}
