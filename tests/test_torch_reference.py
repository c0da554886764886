"""benchmarks/torch_reference.py computes what jaxad's CSI step computes.

The throughput comparison is only meaningful if the PyTorch step is the same work: same view
layout, same network, same loss, same update. Random draws differ between the frameworks, so
the augmentations are compared on given parameters.
"""
import functools
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxad import losses, optim
from jaxad.data import augment
from jaxad.methods import csi
from jaxad.models.resnet import CSINet
from tests.helpers import import_torch

torch = import_torch()

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     'benchmarks', 'torch_reference.py')
_spec = importlib.util.spec_from_file_location('torch_reference', _PATH)
tr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tr)


def test_view_layout_matches_jaxad():
    for b, k in ((3, 4), (2, 1), (5, 2)):
        np.testing.assert_array_equal(tr.positive_index(b, k).numpy(),
                                      np.asarray(csi.positive_index(b, k)))
        np.testing.assert_array_equal(tr.shift_labels(b, k).numpy(),
                                      np.asarray(csi.shift_labels(b, k)))
    # The views themselves: row (b * 2 + v) * K + k is image b, rotated by k.
    # With no augmentation the two views differ only by their random flip.
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    no_aug = dict(tr.DEFAULT_AUG, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0,
                  gray_p=0.0)
    gen = torch.Generator().manual_seed(0)
    views = tr.train_views(torch.from_numpy(images), 4, gen, no_aug).numpy()
    assert views.shape == (3 * 2 * 4, 3, 8, 8)
    x = images.astype(np.float32) / 255.0
    for row in range(views.shape[0]):
        b, k = row // 8, row % 4
        got = views[row].transpose(1, 2, 0)
        options = [np.rot90(x[b], k, axes=(0, 1)), np.rot90(x[b][:, ::-1], k, axes=(0, 1))]
        assert min(np.abs(got - o).max() for o in options) < 1e-6, row


def test_loss_matches_jaxad():
    b, k, d = 6, 4, 16
    rng = np.random.default_rng(1)
    z = rng.normal(size=(b * 2 * k, d)).astype(np.float32)
    logits = rng.normal(size=(b * 2 * k, k)).astype(np.float32)
    for eps in (1e-8, 0.0):
        want = losses.nt_xent(jnp.asarray(z), csi.positive_index(b, k), 0.5, eps=eps)
        got = tr.nt_xent(torch.from_numpy(z), tr.positive_index(b, k), 0.5, eps)
        np.testing.assert_allclose(float(got), float(want), rtol=0, atol=1e-5)
    want, aux = csi.loss_and_aux({'proj': jnp.asarray(z), 'shift_logits': jnp.asarray(logits)},
                                 b, k, temperature=0.5, shift_weight=1.0, eps=1e-8)
    got, con, cls = tr.csi_loss({'proj': torch.from_numpy(z),
                                 'shift_logits': torch.from_numpy(logits)}, b, k, 0.5, 1.0, 1e-8)
    np.testing.assert_allclose(float(con), float(aux['loss_con']), atol=1e-5)
    np.testing.assert_allclose(float(cls), float(aux['loss_cls']), atol=1e-5)
    np.testing.assert_allclose(float(got), float(want), atol=1e-5)


def test_augmentations_match_jaxad_on_given_parameters():
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(6, 8, 8, 3)).astype(np.float32)
    x[0, :2] = 0.0  # black pixels: the HSV conversion's undefined saturation
    n = len(x)
    contrast, sat, val = (rng.uniform(0.6, 1.4, n).astype(np.float32) for _ in range(3))
    hue = rng.uniform(-0.1, 0.1, n).astype(np.float32)
    first = np.array([True, False] * 3)
    want = jax.vmap(augment.adjust_color)(x, contrast, hue, sat, val, first)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    got = tr.adjust_color(xt, *(torch.from_numpy(a) for a in (contrast, hue, sat, val, first)))
    np.testing.assert_allclose(got.numpy().transpose(0, 2, 3, 1), want, atol=1e-5)
    # Crops, the h-flip-free part of the resized-crop layer, including reflection padding.
    params = np.array([[1, 1, 0, 0], [0.5, 0.25, 0.5, -0.75], [0.3, 0.9, -0.2, 0.1],
                       [1.2, 0.7, 0.4, 0.0], [0.125, 0.125, 0.875, 0.875], [1, 1, 0.3, 0]],
                      np.float32)
    want = jax.vmap(augment.apply_crop)(x, params)
    got = tr.apply_crop(xt, torch.from_numpy(params))
    np.testing.assert_allclose(got.numpy().transpose(0, 2, 3, 1), want, atol=1e-5)
    gray = jax.vmap(augment.grayscale)(x)
    got = tr.random_grayscale(xt, torch.Generator().manual_seed(0), p=1.0)
    np.testing.assert_allclose(got.numpy().transpose(0, 2, 3, 1), gray, atol=1e-6)


def test_crop_sampler_draws_valid_crops():
    # Same rule as augment.sample_crop_params: whole pixels, inside the image.
    gen = torch.Generator().manual_seed(0)
    p = tr.sample_crop_params(4000, 32, 32, gen, 'cpu', (0.08, 1.0), (3 / 4, 4 / 3)).numpy()
    w, h, bx, by = (p[:, i] for i in range(4))
    np.testing.assert_allclose(w * 32, np.round(w * 32), atol=1e-4)
    np.testing.assert_allclose(bx * 32, np.round(bx * 32), atol=1e-4)
    assert (w > 0).all() and (w <= 1).all() and (h > 0).all() and (h <= 1).all()
    assert (np.abs(bx) <= 1 - w + 1e-6).all() and (np.abs(by) <= 1 - h + 1e-6).all()
    area = w * h
    assert area.min() > 0.05 and 0.45 < area.mean() < 0.6


def load_flax_variables(model, variables):
    """Copy a jaxad CSINet's params and batch stats into torch_reference.CSINet."""
    params, stats = variables['params'], variables['batch_stats']

    def t(a):
        return torch.from_numpy(np.asarray(a, np.float32).copy())

    def conv(module, p):
        module.weight.data = t(np.transpose(p['kernel'], (3, 2, 0, 1)))

    def bn(module, p, s):
        module.weight.data, module.bias.data = t(p['scale']), t(p['bias'])
        module.running_mean.data, module.running_var.data = t(s['mean']), t(s['var'])

    def dense(module, p):
        module.weight.data, module.bias.data = t(np.asarray(p['kernel']).T), t(p['bias'])

    enc, enc_s = params['encoder'], stats['encoder']
    conv(model.conv1, enc['conv1'])
    bn(model.bn1, enc['bn1'], enc_s['bn1'])
    for name, block in model.blocks.items():
        p, s = enc[name], enc_s[name]
        for c, b in (('conv1', 'bn1'), ('conv2', 'bn2'), ('shortcut_conv', 'shortcut_bn')):
            assert (c in p) == hasattr(block, c), (name, c)
            if c in p:
                conv(getattr(block, c), p[c])
                bn(getattr(block, b), p[b], s[b])
    for name in ('proj_hidden', 'proj_out', 'shift_cls'):
        dense(getattr(model, name), params[name])


def random_leaf(name, shape, rng):
    """A float32 array for a Flax variable: He-scaled kernels, BN stats around (0, 1)."""
    if name == 'kernel':
        return rng.normal(size=shape, scale=math.sqrt(2.0 / np.prod(shape[:-1])))
    if name in ('scale', 'var'):
        return rng.uniform(0.5, 1.5, shape)
    return rng.normal(size=shape, scale=0.1)  # bias, mean


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(net, variables, x, train):
    if train:
        return net.apply(variables, x, train=True, mutable=['batch_stats'])[0]
    return net.apply(variables, x, train=False)


def test_network_matches_jaxad():
    width, proj_dim, k, size = 4, 8, 4, 8
    net = CSINet(width=width, proj_dim=proj_dim, num_shifts=k)
    rng = np.random.default_rng(3)
    x = rng.uniform(size=(6, size, size, 3)).astype(np.float32)
    # Random values of init's shapes: jitting init itself compiles for ~30 s on a busy CPU.
    shapes = jax.eval_shape(lambda k: net.init(k, jnp.asarray(x), train=False),
                            jax.random.key(0))
    variables = jax.tree_util.tree_map_with_path(
        lambda path, s: random_leaf(path[-1].key, s.shape, rng), shapes)
    model = tr.CSINet(width, proj_dim, k)
    assert sum(p.numel() for p in model.parameters()) == sum(
        a.size for a in jax.tree_util.tree_leaves(variables['params']))
    load_flax_variables(model, variables)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    for train in (False, True):  # train: BatchNorm on batch statistics
        model.train(train)
        with torch.no_grad():
            got = model(xt)
        want = _apply(net, variables, jnp.asarray(x), train)
        for key in ('features', 'proj', 'shift_logits'):
            np.testing.assert_allclose(got[key].numpy(), want[key], atol=1e-4, rtol=1e-4,
                                       err_msg=f'{key} train={train}')


@pytest.mark.parametrize('bn_groups', [1, 2])
def test_network_gradients_match_torch(bn_groups):
    """Backward of the whole training-mode network (convolutions with the CPU weight gradient
    of jaxad.models.conv, BatchNorm on batch statistics) against torch's autograd.

    bn_groups=2 takes statistics per half of the batch; torch does the same by running its
    BatchNorm2d on each half (what two GPUs without SyncBN do). 16x16 inputs leave 2x2 maps
    at stage 4, so each BN group there still has 4 x 2 x 2 = 16 values per channel: with 8x8
    inputs and 3 images per group (3 values per channel) jaxad's and torch's gradients
    differed by 1.1e-4 relative, float32 rounding amplified by the near-zero variance.
    Tolerance: 1e-4 of the largest gradient of each tensor, for float32 sums of up to
    8 x 16 x 16 = 2048 terms per channel."""
    width, proj_dim, k, size, n = 4, 8, 4, 16, 8
    net = CSINet(width=width, proj_dim=proj_dim, num_shifts=k, bn_groups=bn_groups,
                 bn_running_var='unbiased', conv_impl='matmul_dw')
    rng = np.random.default_rng(5)
    x = rng.uniform(size=(n, size, size, 3)).astype(np.float32)
    shapes = jax.eval_shape(lambda key: net.init(key, jnp.asarray(x), train=False),
                            jax.random.key(0))
    variables = jax.tree_util.tree_map_with_path(
        lambda path, s: random_leaf(path[-1].key, s.shape, rng).astype(np.float32), shapes)
    # A loss that reaches every output: fixed random weights on features, proj, shift logits.
    weights = {key: rng.normal(size=shape).astype(np.float32) for key, shape in
               (('features', (n, width * 8)), ('proj', (n, proj_dim)), ('shift_logits', (n, k)))}

    def loss(params):
        out, _ = net.apply({'params': params, 'batch_stats': variables['batch_stats']},
                           jnp.asarray(x), train=True, mutable=['batch_stats'])
        return sum(jnp.sum(out[key] * w) for key, w in weights.items())
    grads = jax.jit(jax.grad(loss))(variables['params'])

    model = tr.CSINet(width, proj_dim, k)
    load_flax_variables(model, variables)
    model.train(True)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    rows = n // bn_groups  # each group through the network on its own batch statistics
    total = 0
    for i in range(0, n, rows):
        out = model(xt[i:i + rows])
        total = total + sum((out[key] * torch.from_numpy(w[i:i + rows])).sum()
                            for key, w in weights.items())
    total.backward()
    want = {name: p.grad.numpy() for name, p in model.named_parameters()}
    # jaxad's gradients in torch's layout, by the same mapping as the weights (kernels
    # transposed): loaded into a second copy of the torch model.
    as_torch = tr.CSINet(width, proj_dim, k)
    load_flax_variables(as_torch, {'params': grads, 'batch_stats': variables['batch_stats']})
    got = {name: p.detach().numpy() for name, p in as_torch.named_parameters()}
    assert sorted(got) == sorted(want)
    for name in want:
        scale = np.max(np.abs(want[name]))
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-4 * scale,
                                   err_msg=name)


@pytest.mark.parametrize('exclude_1d', [False, True])
def test_lars_matches_jaxad_torchlars(exclude_1d):
    rng = np.random.default_rng(4)
    params = {'w': rng.normal(size=(3, 4)).astype(np.float32), 'b': np.zeros(4, np.float32),
              's': rng.normal(size=4).astype(np.float32)}
    grads = [{n: rng.normal(size=p.shape).astype(np.float32) for n, p in params.items()}
             for _ in range(3)]
    mask = {'w': True, 'b': not exclude_1d, 's': not exclude_1d}
    tx = optim.torchlars_sgd(0.1, momentum=0.9, weight_decay=1e-2, trust_coef=1e-3, mask=mask)
    state, want = tx.init(params), dict(params)
    tensors = {n: torch.from_numpy(p.copy()).requires_grad_() for n, p in params.items()}
    opt = tr.LARS(list(tensors.values()), lr=0.1, momentum=0.9, weight_decay=1e-2,
                  trust_coef=1e-3, exclude_1d=exclude_1d)
    for g in grads:
        updates, state = tx.update(g, state, want)
        want = optax.apply_updates(want, updates)
        for n, p in tensors.items():
            p.grad = torch.from_numpy(g[n].copy())
        opt.step()
    for n, p in tensors.items():
        np.testing.assert_allclose(p.detach().numpy(), want[n], rtol=1e-5, atol=1e-7)


def test_measure_runs_tiny():
    r = tr.measure(4, 16, 8, 4, steps=2, warmup=1, device='cpu', proj_dim=16)
    assert r['views_per_step'] == 4 * 2 * 4 and r['view_shape_nchw'] == [32, 3, 16, 16]
    for key in ('median_step_s', 'images_per_s', 'views_per_s', 'final_loss'):
        assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
    assert r['device'] == 'cpu' and r['torch'] == torch.__version__
