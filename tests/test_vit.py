"""jaxad.models.vit against a PyTorch ViT on the same random weights.

The reference below is written here from timm's `VisionTransformer` and DINOv2's
`DinoVisionTransformer` (their module names, so its `state_dict()` has their layout:
`patch_embed.proj`, `cls_token`, `pos_embed`, `register_tokens`, `blocks.N.norm1`,
`blocks.N.attn.qkv`, `blocks.N.attn.proj`, `blocks.N.ls1.gamma`, `blocks.N.mlp.fc1`, ...), not
from jaxad's module: pre-norm blocks, fused qkv, softmax(q k^T / sqrt(d)) v, exact GELU,
LayerNorm eps 1e-6, positions resized with `F.interpolate(mode='bicubic')` by size (timm) or
by DINOv2's scale factor (grid + 0.1) / pretrained grid. Weights go through a real `.pth`
file and `jaxad.models.vit.load_vit_weights`.
"""
import math
import re

import jax
import numpy as np
import pytest

from jaxad.models import convert, vit
from tests.helpers import import_torch

# float32, 3 blocks of width 128 (|x| ~ 1): summation order differs (torch's GEMMs vs XLA's),
# each op within a few ulp; 1e-4 absolute is ~1000 ulp of the outputs' scale and far below
# any mis-mapped weight or wrong formula (O(1e-1)).
ATOL = 1e-4


def torch_vit(dim, depth, patch, grid, registers, layerscale, dinov2):
    torch = import_torch()
    nn, F = torch.nn, torch.nn.functional
    heads = dim // 64

    class LayerScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(0.5 + torch.rand(dim))

        def forward(self, x):
            return x * self.gamma

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            attn = ((q @ k.transpose(-2, -1)) / math.sqrt(c // heads)).softmax(dim=-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            self.attn, self.mlp = Attention(), Mlp()
            self.ls1 = LayerScale() if layerscale else nn.Identity()
            self.ls2 = LayerScale() if layerscale else nn.Identity()

        def forward(self, x):
            x = x + self.ls1(self.attn(self.norm1(x)))
            return x + self.ls2(self.mlp(self.norm2(x)))

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, dim, patch, patch)

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = PatchEmbed()
            self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
            self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.5)
            if registers:
                self.register_tokens = nn.Parameter(torch.randn(1, registers, dim) * 0.5)
            self.blocks = nn.ModuleList([Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.head = nn.Linear(dim, 10)  # a classifier head: ignored by the import

        def forward(self, x):  # NCHW
            t = self.patch_embed.proj(x)
            h, w = t.shape[2:]
            t = t.flatten(2).transpose(1, 2)
            pos = self.pos_embed[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
            if (h, w) != (grid, grid):
                if dinov2:  # DINOv2's interpolate_pos_encoding (interpolate_offset 0.1)
                    pos = F.interpolate(pos, mode='bicubic', align_corners=False,
                                        scale_factor=((h + 0.1) / grid, (w + 0.1) / grid))
                else:  # timm's resample_abs_pos_embed, upsampling
                    pos = F.interpolate(pos, size=(h, w), mode='bicubic', align_corners=False)
            pos = pos.permute(0, 2, 3, 1).reshape(1, h * w, dim)
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(t), -1, -1)
            x = torch.cat([cls, t + pos], dim=1)
            if registers:
                x = torch.cat([x[:, :1], self.register_tokens.expand(len(x), -1, -1),
                               x[:, 1:]], dim=1)
            for block in self.blocks:
                x = block(x)
            x = self.norm(x)
            return x[:, 0], x[:, 1 + registers:].reshape(len(x), h, w, dim)

    torch.manual_seed(0)
    return ViT().eval()


@pytest.mark.parametrize('layout,registers,layerscale,image', [
    ('timm', 0, False, 32),     # the pretrained grid (4 x 4 patches of 8)
    ('timm', 0, False, 48),     # 6 x 6: positions resized by size
    ('dinov2', 4, True, 48),    # registers, LayerScale, DINOv2's scale-factor resize
])
def test_features_equal_the_pytorch_vit_on_the_same_weights(layout, registers, layerscale,
                                                            image, tmp_path):
    torch = import_torch()
    ref = torch_vit(128, 3, 8, 4, registers, layerscale, layout == 'dinov2')
    path = tmp_path / 'vit.pth'
    torch.save(ref.state_dict(), path)
    spec, variables = vit.load_vit_weights(path)
    assert (spec.dim, spec.depth, spec.patch, spec.pos_grid, spec.num_registers,
            spec.layerscale, spec.heads) == (128, 3, 8, 4, registers, layerscale, 2)
    x = np.random.default_rng(1).normal(size=(2, image, image, 3)).astype(np.float32)
    with torch.no_grad():
        want_cls, want_patches = (t.numpy() for t in ref(torch.from_numpy(x).permute(0, 3, 1, 2)))
    model = spec.module(pos_offset=0.1 if layout == 'dinov2' else 0.0)
    got = jax.jit(model.apply)(variables, x)
    assert got['patches'].shape == (2, image // 8, image // 8, 128)
    np.testing.assert_allclose(got['cls'], want_cls, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got['patches'], want_patches, atol=ATOL, rtol=0)


def test_a_safetensors_file_gives_the_same_weights_as_the_pth(tmp_path):
    """timm and Hugging Face ship .safetensors: the same state dict read from one (written
    with safetensors' NumPy API) is the .pth's, leaf for leaf."""
    torch = import_torch()
    from safetensors.numpy import save_file
    sd = torch_vit(128, 2, 8, 4, 4, True, True).state_dict()
    torch.save(sd, tmp_path / 'vit.pth')
    save_file({k: v.numpy() for k, v in sd.items()}, str(tmp_path / 'vit.safetensors'))
    spec_pth, from_pth = vit.load_vit_weights(tmp_path / 'vit.pth')
    spec_st, from_st = vit.load_vit_weights(tmp_path / 'vit.safetensors')
    assert spec_st == spec_pth and spec_st.num_registers == 4 and spec_st.layerscale
    for a, b in zip(jax.tree_util.tree_leaves(from_pth), jax.tree_util.tree_leaves(from_st)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('size,scale', [((7, 9), None), ((3, 2), None), ((6, 6), (6.1 / 4, 6.1 / 4))])
def test_bicubic_resize_is_torchs(size, scale):
    torch = import_torch()
    x = np.random.default_rng(0).normal(size=(4, 4, 5)).astype(np.float32)
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    kw = dict(size=size) if scale is None else dict(scale_factor=scale)
    want = torch.nn.functional.interpolate(t, mode='bicubic', align_corners=False, **kw)
    got = vit.bicubic_resize(x, size, scale)
    np.testing.assert_allclose(got, want[0].permute(1, 2, 0).numpy(), atol=1e-5, rtol=0)


def test_a_file_that_does_not_fit_is_refused_naming_the_key(tmp_path):
    torch = import_torch()
    sd = torch_vit(128, 2, 8, 4, 0, False, False).state_dict()

    def refused(state_dict, match):
        path = tmp_path / 'bad.pth'
        torch.save(state_dict, path)
        with pytest.raises(convert.ConversionError, match=match):
            vit.load_vit_weights(path)

    refused({k: v for k, v in sd.items() if k != 'blocks.1.mlp.fc2.bias'},
            r"missing key 'blocks\.1\.mlp\.fc2\.bias' \(shape \(128,\)\)")
    refused(dict(sd, **{'blocks.0.attn.q_norm.weight': torch.ones(64)}),
            r"unexpected key 'blocks\.0\.attn\.q_norm\.weight' \(shape \(64,\)\)")
    refused(dict(sd, **{'blocks.0.mlp.fc1.weight': torch.ones(256, 128)}),
            r"'blocks\.0\.mlp\.fc1\.weight' has shape \(256, 128\), the ViT expects "
            r"\(512, 128\)")
    # DINOv2's chunked blocks ('blocks.C.N.': block N in chunk C) read as plain ones
    chunked = {re.sub(r'^blocks\.(\d)\.', lambda m: f'blocks.{int(m.group(1)) // 2}.{m.group(1)}.', k): v
               for k, v in sd.items()}
    assert 'blocks.0.1.norm1.weight' in chunked
    torch.save(chunked, tmp_path / 'chunked.pth')
    spec, variables = vit.load_vit_weights(tmp_path / 'chunked.pth')
    assert spec.depth == 2
    np.testing.assert_array_equal(variables['params']['blocks_1']['norm1']['scale'],
                                  sd['blocks.1.norm1.weight'].numpy())
    refused({'conv1.weight': torch.ones(8, 3, 3, 3)}, r"not a ViT state dict: no "
                                                      r"'patch_embed\.proj\.weight'")


def _bigvision_forward(params, image, heads):
    """big_vision's ViT (big_vision/models/vit.py, pool_type 'tok') in NumPy from its source:
    patch conv, posemb added to the patches, then the class token concatenated; blocks of
    LayerNorm (eps 1e-6) -> MultiHeadDotProductAttention (q / sqrt(d_head)) -> residual,
    LayerNorm -> Dense -> tanh-GELU -> Dense -> residual; encoder_norm."""
    def ln(x, p):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-6) * params[p + '/scale'] + params[p + '/bias']

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    kernel = params['embedding/kernel']
    p, dim = kernel.shape[0], kernel.shape[-1]
    n, size = image.shape[0], image.shape[1]
    g = size // p
    patches = image.reshape(n, g, p, g, p, -1).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, -1)
    x = patches @ kernel.reshape(-1, dim) + params['embedding/bias'] + params['pos_embedding']
    x = np.concatenate([np.tile(params['cls'], (n, 1, 1)), x], axis=1)
    for i in range(2):
        b = f'Transformer/encoderblock_{i}/'
        a = b + 'MultiHeadDotProductAttention_0/'
        y = ln(x, b + 'LayerNorm_0')
        q, k, v = (np.einsum('nld,dhk->nlhk', y, params[f'{a}{m}/kernel']) + params[f'{a}{m}/bias']
                   for m in ('query', 'key', 'value'))
        logits = np.einsum('nqhk,nlhk->nhql', q / np.sqrt(q.shape[-1]), k)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        y = np.einsum('nhql,nlhk->nqhk', w, v)
        x = x + np.einsum('nqhk,hkd->nqd', y, params[a + 'out/kernel']) + params[a + 'out/bias']
        y = ln(x, b + 'LayerNorm_1')
        y = gelu_tanh(y @ params[b + 'MlpBlock_0/Dense_0/kernel'] + params[b + 'MlpBlock_0/Dense_0/bias'])
        x = x + y @ params[b + 'MlpBlock_0/Dense_1/kernel'] + params[b + 'MlpBlock_0/Dense_1/bias']
    x = ln(x, 'Transformer/encoder_norm')
    return x[:, 0], x[:, 1:].reshape(n, g, g, dim)


def _bigvision_params(rng, dim=64, heads=2, patch=4, grid=3, depth=2):
    hd = dim // heads
    r = lambda *s: rng.normal(size=s).astype(np.float32) * 0.3  # noqa: E731
    params = {'embedding/kernel': r(patch, patch, 3, dim), 'embedding/bias': r(dim),
              'cls': r(1, 1, dim), 'pos_embedding': r(1, grid * grid, dim),
              'Transformer/encoder_norm/scale': 1 + r(dim),
              'Transformer/encoder_norm/bias': r(dim), 'head/kernel': r(dim, 10),
              'head/bias': r(10)}
    for i in range(depth):
        b = f'Transformer/encoderblock_{i}/'
        a = b + 'MultiHeadDotProductAttention_0/'
        for m in ('query', 'key', 'value'):
            params[f'{a}{m}/kernel'], params[f'{a}{m}/bias'] = r(dim, heads, hd), r(heads, hd)
        params[a + 'out/kernel'], params[a + 'out/bias'] = r(heads, hd, dim), r(dim)
        for ln in ('LayerNorm_0', 'LayerNorm_1'):
            params[f'{b}{ln}/scale'], params[f'{b}{ln}/bias'] = 1 + r(dim), r(dim)
        params[b + 'MlpBlock_0/Dense_0/kernel'] = r(dim, 4 * dim)
        params[b + 'MlpBlock_0/Dense_0/bias'] = r(4 * dim)
        params[b + 'MlpBlock_0/Dense_1/kernel'] = r(4 * dim, dim)
        params[b + 'MlpBlock_0/Dense_1/bias'] = r(dim)
    return params


def test_a_big_vision_checkpoint_gives_big_visions_features(tmp_path):
    """A big_vision ViT .npz (its flax names; heads read from the query kernel, not width /
    64) against a NumPy forward written from big_vision/models/vit.py; and the older layout
    (the class token's position entry first, under Transformer/posembed_input) gives the
    same features as big_vision's fix_old_checkpoints makes of it."""
    rng = np.random.default_rng(0)
    params = _bigvision_params(rng)
    np.savez(tmp_path / 'bv.npz', **params)
    spec, variables = vit.load_vit_weights(tmp_path / 'bv.npz')
    assert (spec.dim, spec.heads, spec.patch, spec.pos_grid, spec.gelu_tanh) == (64, 2, 4, 3,
                                                                                True)
    image = rng.normal(size=(2, 12, 12, 3)).astype(np.float32)
    want_cls, want_patches = _bigvision_forward(params, image.astype(np.float64), 2)
    got = jax.jit(spec.module().apply)(variables, image)
    np.testing.assert_allclose(got['cls'], want_cls, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got['patches'], want_patches, atol=ATOL, rtol=0)

    old = dict(params)
    pe_cls = rng.normal(size=(1, 1, 64)).astype(np.float32)
    old['Transformer/posembed_input/pos_embedding'] = np.concatenate(
        [pe_cls, old.pop('pos_embedding')], axis=1)
    old['cls'] = params['cls'] - pe_cls  # fix_old_checkpoints adds pe_cls back
    np.savez(tmp_path / 'bv_old.npz', **old)
    spec_old, variables_old = vit.load_vit_weights(tmp_path / 'bv_old.npz')
    got_old = jax.jit(spec_old.module().apply)(variables_old, image)
    np.testing.assert_allclose(got_old['cls'], want_cls, atol=ATOL, rtol=0)

    del params['Transformer/encoderblock_1/LayerNorm_1/bias']
    np.savez(tmp_path / 'bv_bad.npz', **params)
    with pytest.raises(convert.ConversionError,
                       match=r"missing key 'Transformer/encoderblock_1/LayerNorm_1/bias'"):
        vit.load_vit_weights(tmp_path / 'bv_bad.npz')
