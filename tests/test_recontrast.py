"""ReContrast building blocks (jaxad.methods.recontrast; docs/methods.md §5, §9.2 target 4).

torch (CPU) and scipy serve as independent references: F.interpolate(align_corners=True),
F.conv_transpose2d, F.cosine_similarity, the code's global_cosine_hm with its backward hook,
scipy.ndimage.gaussian_filter, and a torch re-build of the code's BN_layer / de_resnet
modules (channel constants scaled by width / 64), anchored to the parameter counts of the
official modules at full width.

torch comes lazily through tests.helpers.import_torch (the `torch` fixture): without it
the torch comparisons skip off CI and fail on CI (.ci/run installs it), and the torch-free
tests here still run.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from jaxad.methods import recontrast as rc
from tests.helpers import import_torch


@pytest.fixture(scope='module')
def torch():
    """torch (a skip off CI when it is not installed, a failure on CI)."""
    return import_torch()


def _rand(key, shape, scale=1.0):
    return np.asarray(jax.random.normal(jax.random.PRNGKey(key), shape)) * scale


# ----------------------------------------------------------------------------- loss

def _torch_global_cosine_hm(torch, a, b, alpha=1., factor=0.):
    """utils.global_cosine_hm @381ef13 (with modify_grad), verbatim in substance."""
    tnn = torch.nn
    def modify_grad(x, inds, factor=0.):
        inds = inds.expand_as(x)
        x[inds] *= factor
        return x
    cos_loss = tnn.CosineSimilarity()
    loss = 0
    weight = [1, 1, 1]
    for item in range(len(a)):
        a_ = a[item].detach()
        b_ = b[item]
        with torch.no_grad():
            point_dist = 1 - cos_loss(a_, b_).unsqueeze(1)
        mean_dist = point_dist.mean()
        std_dist = point_dist.reshape(-1).std()
        loss += torch.mean(1 - cos_loss(a_.view(a_.shape[0], -1),
                                        b_.view(b_.shape[0], -1))) * weight[item]
        thresh = mean_dist + alpha * std_dist
        b_.register_hook(functools.partial(modify_grad, inds=point_dist < thresh, factor=factor))
    return loss


def _pairs(seed=0, n=2):
    shapes = [(n, 8, 8, 6), (n, 4, 4, 10), (n, 2, 2, 12)]
    a = [_rand(seed + i, s) for i, s in enumerate(shapes)]
    b = [x + _rand(seed + 10 + i, x.shape, 0.7) for i, x in enumerate(a)]
    return a, b


@pytest.mark.parametrize('alpha', [-3.0, 0.0, 0.5, 1.0])
def test_global_cosine_hm_forward_and_masked_gradient(alpha):
    a, b = _pairs()
    a, b = [jnp.asarray(x) for x in a], [jnp.asarray(x) for x in b]
    plain_val, plain_grad = jax.value_and_grad(lambda bs: rc.global_cosine(a, bs))(b)
    hm_val, hm_grad = jax.value_and_grad(lambda bs: rc.global_cosine_hm(a, bs, alpha))(b)
    np.testing.assert_array_equal(hm_val, plain_val)  # forward value unchanged, bit for bit
    n_easy = 0
    for ai, bi, gp, gh in zip(a, b, plain_grad, hm_grad):
        an, bn = np.asarray(ai, np.float64), np.asarray(bi, np.float64)
        d = 1 - (an * bn).sum(-1) / np.linalg.norm(an, axis=-1) / np.linalg.norm(bn, axis=-1)
        easy = d < d.mean() + alpha * d.std(ddof=1)  # torch .std() is unbiased
        n_easy += easy.sum()
        assert np.all(np.asarray(gh)[easy] == 0.0)
        np.testing.assert_array_equal(np.asarray(gh)[~easy], np.asarray(gp)[~easy])
        assert np.abs(np.asarray(gp)[~easy]).sum() > 0
    if alpha >= 0:
        assert n_easy > 0
    # the a side never gets gradient (stop-gradient targets)
    ga = jax.grad(lambda as_: rc.global_cosine_hm(as_, b, alpha))(a)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in ga)


@pytest.mark.parametrize('alpha,factor', [(-3.0, 0.0), (0.2, 0.0), (1.0, 0.1)])
def test_global_cosine_hm_matches_torch_hook(torch, alpha, factor):
    a, b = _pairs(seed=3, n=3)
    ta = [torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2))) for x in a]
    tb = [torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), requires_grad=True)
          for x in b]
    tloss = _torch_global_cosine_hm(torch, ta, tb, alpha, factor)
    tloss.backward()
    val, grads = jax.value_and_grad(
        lambda bs: rc.global_cosine_hm([jnp.asarray(x) for x in a], bs, alpha, factor))(
            [jnp.asarray(x) for x in b])
    np.testing.assert_allclose(float(val), float(tloss.detach()), rtol=1e-6)
    for g, t in zip(grads, tb):
        np.testing.assert_allclose(np.asarray(g), t.grad.numpy().transpose(0, 2, 3, 1),
                                   atol=1e-7, rtol=1e-5)


def test_recontrast_loss_is_half_of_both_directions():
    a, b = _pairs(seed=5)
    en = [jnp.asarray(x) for x in a + b]
    de = [jnp.asarray(x) for x in b + a]
    want = rc.global_cosine(en[:3], de[:3]) / 2 + rc.global_cosine(en[3:], de[3:]) / 2
    np.testing.assert_allclose(float(rc.recontrast_loss(en, de, 0.3)), float(want), rtol=1e-7)


def test_cosine_similarity_matches_torch_including_zero_vectors(torch):
    F = torch.nn.functional
    x, y = _rand(1, (5, 7)), _rand(2, (5, 7))
    x[0] = 0.0
    y[1] = 1e-12
    got = rc.cosine_similarity(jnp.asarray(x), jnp.asarray(y))
    want = F.cosine_similarity(torch.tensor(x), torch.tensor(y), dim=-1).numpy()
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    g = jax.grad(lambda u: rc.cosine_similarity(u, jnp.asarray(y)).sum())(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(g)))


def test_alpha_schedule():
    total = 2000
    f = lambda s, **kw: float(rc.alpha_schedule(s, total, **kw))  # noqa: E731
    assert f(0) == -3.0
    assert f(100) == pytest.approx(-1.0)   # 5%: halfway
    assert f(200) == 1.0                   # 10%
    assert f(1999) == 1.0
    assert f(200, warmup_frac=0.2) == pytest.approx(-1.0)
    assert f(400, warmup_frac=0.2) == 1.0
    # the code's expression, step by step
    for it in (0, 1, 57, 199, 200, 201, 1000):
        assert f(it) == pytest.approx(min(-3 + (1 - -3) * it / (total * 0.1), 1), abs=1e-6)
    jax.jit(rc.alpha_schedule, static_argnums=1)(jnp.int32(10), total)  # traceable step


# ----------------------------------------------------------------------------- maps

@pytest.mark.parametrize('size_in,size_out', [((4, 4), (16, 16)), ((5, 7), (13, 11)),
                                              ((8, 8), (256, 256)), ((3, 3), (3, 3)),
                                              ((9, 9), (4, 6)), ((6, 2), (1, 5))])
def test_bilinear_align_corners_matches_torch(torch, size_in, size_out):
    F = torch.nn.functional
    x = _rand(7, (2,) + size_in)
    got = rc.resize_bilinear_align_corners(jnp.asarray(x, jnp.float32), size_out)
    want = F.interpolate(torch.tensor(x, dtype=torch.float32)[:, None], size=size_out,
                         mode='bilinear', align_corners=True)[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize('mode', ['reflect', 'constant', 'nearest', 'mirror', 'wrap'])
@pytest.mark.parametrize('shape', [(32, 32), (10, 7), (40, 3)])
def test_gaussian_filter_matches_scipy(mode, shape):
    x = np.abs(_rand(11, (2,) + shape)).astype(np.float64)
    if mode == 'reflect':  # the code: scipy's defaults (mode='reflect', truncate=4.0)
        got = rc.gaussian_filter(jnp.asarray(x, jnp.float32), sigma=4)
        want = np.stack([scipy.ndimage.gaussian_filter(m, sigma=4) for m in x])
    else:
        got = rc.gaussian_filter(jnp.asarray(x, jnp.float32), sigma=4, mode=mode)
        want = np.stack([scipy.ndimage.gaussian_filter(m, sigma=4, mode=mode) for m in x])
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_gaussian_5x5_zero_padded_kernel_matches_code_conv(torch):
    """The multi-class evaluation's get_gaussian_kernel(5, 4): a zero-padded 5x5 conv."""
    F = torch.nn.functional
    x = np.abs(_rand(12, (2, 20, 17)))
    ks, sigma = 5, 4.0
    coords = torch.arange(ks).float()
    xx, yy = torch.meshgrid(coords, coords, indexing='xy')
    k = torch.exp(-((xx - 2) ** 2 + (yy - 2) ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, ks, ks)
    want = F.conv2d(torch.tensor(x, dtype=torch.float32)[:, None], k, padding=2)[:, 0].numpy()
    got = rc.gaussian_filter(jnp.asarray(x, jnp.float32), sigma, mode='constant', radius=2)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def _code_anomaly_map(torch, en, de, out_size):
    """utils.cal_anomaly_map(amap_mode='a') + gaussian_filter(sigma=4), one image."""
    F = torch.nn.functional
    amap = np.zeros((out_size, out_size))
    for fs, ft in zip(en, de):
        a = 1 - F.cosine_similarity(torch.tensor(fs.transpose(0, 3, 1, 2)),
                                    torch.tensor(ft.transpose(0, 3, 1, 2)))
        a = F.interpolate(a[:, None], size=(out_size, out_size), mode='bilinear',
                          align_corners=True)
        amap += a[0, 0].numpy()
    return scipy.ndimage.gaussian_filter(amap, sigma=4)


def _feature_pairs(seed, n=1):
    shapes = [(n, 8, 8, 4), (n, 4, 4, 8), (n, 2, 2, 16)]
    en = [np.abs(_rand(seed + i, s)).astype(np.float32) for i, s in enumerate(shapes)]
    return en, [x.copy() for x in en]


def test_anomaly_map_identical_features_is_zero():
    en, de = _feature_pairs(20, n=2)
    m = rc.anomaly_map(en + en, de + de, 32)
    assert m.shape == (2, 32, 32)
    np.testing.assert_allclose(np.asarray(m), 0.0, atol=1e-6)


def test_anomaly_map_peak_location_and_code_reference(torch):
    en, de = _feature_pairs(30)
    de[0][0, 3, 5] = -de[0][0, 3, 5]  # one differing point at level 1 (8x8)
    raw = np.asarray(rc.anomaly_map(en, de, 32, sigma=0))[0]
    # align_corners: 8x8 pixel (3, 5) sits at (3 * 31/7, 5 * 31/7) = (13.3, 22.1) of 32x32
    assert np.unravel_index(raw.argmax(), raw.shape) == (13, 22)
    smooth = np.asarray(rc.anomaly_map(en, de, 32))[0]
    assert np.unravel_index(smooth.argmax(), smooth.shape) == (13, 22)
    # full assembly vs the code's per-image torch + scipy pipeline, on random pairs
    en2 = [np.abs(_rand(40 + i, x.shape)).astype(np.float32) for i, x in enumerate(en)]
    de2 = [np.abs(_rand(50 + i, x.shape)).astype(np.float32) for i, x in enumerate(en)]
    got = np.asarray(rc.anomaly_map(en2 + de2, de2 + en2, 32))[0]
    want = _code_anomaly_map(torch, en2 + de2, de2 + en2, 32)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_image_score_max_and_top_ratio():
    m = np.abs(_rand(60, (3, 20, 20))).astype(np.float32)
    np.testing.assert_allclose(np.asarray(rc.image_score(jnp.asarray(m))), m.reshape(3, -1).max(1))
    got = np.asarray(rc.image_score(jnp.asarray(m), max_ratio=0.01))
    flat = m.reshape(3, -1)
    want = [np.sort(r)[-int(r.shape[0] * 0.01):].mean() for r in flat]  # evaluation()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    got = np.asarray(rc.image_score(jnp.asarray(m), max_ratio=0.1))
    np.testing.assert_allclose(got, [np.sort(r)[-40:].mean() for r in flat], rtol=1e-6)


# ----------------------------------------------------------------------------- modules

def test_deconv2x2_matches_torch_conv_transpose(torch):
    F = torch.nn.functional
    x = _rand(70, (2, 3, 5, 4)).astype(np.float32)
    mod = rc.Deconv2x2(6)
    v = mod.init(jax.random.PRNGKey(0), jnp.asarray(x))
    k = np.asarray(v['params']['kernel'])  # (2, 2, in, out)
    tw = torch.tensor(k.transpose(2, 3, 0, 1))  # torch ConvTranspose2d weight (in, out, kh, kw)
    want = F.conv_transpose2d(torch.tensor(x.transpose(0, 3, 1, 2)), tw, stride=2)
    got = mod.apply(v, jnp.asarray(x))
    assert got.shape == (2, 6, 10, 6)
    np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), atol=1e-5)
    # torch's default ConvTranspose2d init bound 1/sqrt(4 * out)
    assert np.abs(k).max() <= 1 / np.sqrt(4 * 6) + 1e-7


def _net_shapes(depth, width, wpg, size, n=2):
    net = rc.ReContrastNet(depth=depth, width=width, width_per_group=wpg)
    x = jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32)
    enc_vars = jax.eval_shape(lambda x: rc.net_encoder(net).init(jax.random.PRNGKey(0), x,
                                                                 train=False), x)
    frozen = jax.eval_shape(lambda v, x: rc.frozen_taps(net, v, x), enc_vars, x)
    v = jax.eval_shape(lambda x, f: net.init(jax.random.PRNGKey(1), x, f, train=False), x, frozen)
    out = jax.eval_shape(lambda v, x, f: net.apply(v, x, f, train=True, mutable=['batch_stats']),
                         v, x, frozen)
    return v, frozen, out[0]


@pytest.mark.parametrize('depth,wpg,size', [(18, 64, 64), (50, 64, 64), (50, 128, 32)])
def test_module_shapes(depth, wpg, size):
    width = 8
    v, frozen, (en, de) = _net_shapes(depth, width, wpg, size)
    e = 1 if depth == 18 else 4
    want = [(2, size // 4, size // 4, width * e), (2, size // 8, size // 8, 2 * width * e),
            (2, size // 16, size // 16, 4 * width * e)]
    assert [f.shape for f in frozen] == want
    assert len(en) == len(de) == 6
    assert [x.shape for x in en] == want + want
    assert [x.shape for x in de] == want + want
    assert all(x.dtype == jnp.float32 for x in en + de)
    assert set(v['params']) == {'encoder', 'bottleneck', 'decoder'}


# Official counts, computed once from guojiajeremy/ReContrast @381ef13 models/resnet.py and
# models/de_resnet.py (sum of p.numel() over .parameters()):
#   BN_layer(Bottleneck, 3, width_per_group=128): 67,277,824, of which conv4+bn4 (never used in
#     forward) 8,392,704 -> 58,885,120 used; de_wide_resnet50_2(output_conv=2): 27,673,600
#   resnet18: BN_layer(BasicBlock, 2) 12,205,312 - 525,312 = 11,680,000; de_resnet18: 3,876,096
#   resnet50: BN_layer(Bottleneck, 3) 39,222,272 - 8,392,704 = 30,829,568; de_resnet50: 18,577,920
OFFICIAL_COUNTS = {(50, 128): (58_885_120, 27_673_600), (18, 64): (11_680_000, 3_876_096),
                   (50, 64): (30_829_568, 18_577_920)}


@pytest.mark.parametrize('arch', sorted(OFFICIAL_COUNTS))
def test_param_counts_match_official_modules(arch):
    depth, wpg = arch
    v, _, _ = _net_shapes(depth, 64, wpg, 32, n=1)
    ocbe, dec = OFFICIAL_COUNTS[arch]
    assert rc.param_count(v['params']['bottleneck']) == ocbe
    assert rc.param_count(v['params']['decoder']) == dec


# --- a torch re-build of the code's modules with the channel constants scaled by w / 64
# (classes built on first use: torch is imported lazily, through the `torch` fixture)

@functools.cache
def _torch_module_classes(torch):
    """(BasicBlock, Bottleneck, BN_layer, decoder) torch classes, 64 -> w."""
    F = torch.nn.functional
    tnn = torch.nn

    def _t_conv3(i, o, s=1):
        return tnn.Conv2d(i, o, 3, s, 1, bias=False)

    def _t_conv1(i, o, s=1):
        return tnn.Conv2d(i, o, 1, s, bias=False)

    def _t_deconv(i, o, s):
        return tnn.ConvTranspose2d(i, o, 2, s, bias=False)

    def _identity(block, x):
        res = getattr(block, block._res_name)
        return x if res is None else res(x)

    class _TBasic(tnn.Module):
        expansion = 1

        def __init__(self, inplanes, planes, stride=1, resample=None, base_width=64, up=False):
            super().__init__()
            self.conv1 = _t_deconv(inplanes, planes, 2) if up and stride == 2 \
                else _t_conv3(inplanes, planes, stride)
            self.bn1 = tnn.BatchNorm2d(planes)
            self.conv2 = _t_conv3(planes, planes)
            self.bn2 = tnn.BatchNorm2d(planes)
            self._res_name = 'upsample' if up else 'downsample'
            setattr(self, self._res_name, resample)

        def forward(self, x):
            out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(out + _identity(self, x))

    class _TBottle(tnn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride=1, resample=None, base_width=64, up=False):
            super().__init__()
            width = int(planes * (base_width / 64.))
            self.conv1 = _t_conv1(inplanes, width)
            self.bn1 = tnn.BatchNorm2d(width)
            self.conv2 = _t_deconv(width, width, 2) if up and stride == 2 \
                else _t_conv3(width, width, stride)
            self.bn2 = tnn.BatchNorm2d(width)
            self.conv3 = _t_conv1(width, planes * 4)
            self.bn3 = tnn.BatchNorm2d(planes * 4)
            self._res_name = 'upsample' if up else 'downsample'
            setattr(self, self._res_name, resample)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = F.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return F.relu(out + _identity(self, x))

    class _TBNLayer(tnn.Module):
        """models/resnet.py BN_layer with 64 -> w."""

        def __init__(self, block, layers, w, base_width=64):
            super().__init__()
            e = block.expansion
            inplanes = 4 * w * e
            down = tnn.Sequential(_t_conv1(inplanes * 3, 8 * w * e, 2),
                                  tnn.BatchNorm2d(8 * w * e))
            blocks = [block(inplanes * 3, 8 * w, 2, down, base_width)]
            blocks += [block(8 * w * e, 8 * w, base_width=base_width) for _ in range(1, layers)]
            self.bn_layer = tnn.Sequential(*blocks)
            self.conv1 = _t_conv3(w * e, 2 * w * e, 2)
            self.bn1 = tnn.BatchNorm2d(2 * w * e)
            self.conv2 = _t_conv3(2 * w * e, 4 * w * e, 2)
            self.bn2 = tnn.BatchNorm2d(4 * w * e)
            self.conv3 = _t_conv3(2 * w * e, 4 * w * e, 2)
            self.bn3 = tnn.BatchNorm2d(4 * w * e)
            self.conv4 = _t_conv1(16 * w * e, 8 * w * e, 1)  # unused, as in the code
            self.bn4 = tnn.BatchNorm2d(8 * w * e)

        def forward(self, x):
            l1 = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x[0]))))))
            l2 = F.relu(self.bn3(self.conv3(x[1])))
            return self.bn_layer(torch.cat([l1, l2, x[2]], 1))

    class _TDecoder(tnn.Module):
        """models/de_resnet.py ResNet(output_conv=2) with 64 -> w."""

        def __init__(self, block, layers, w, base_width=64, output_conv=2):
            super().__init__()
            e = block.expansion
            self.inplanes = 8 * w * e
            self.layer1 = self._make_layer(block, 4 * w, layers[0], base_width)
            self.layer2 = self._make_layer(block, 2 * w, layers[1], base_width)
            self.layer3 = self._make_layer(block, w, layers[2], base_width)
            self.out1, self.out2, self.out3 = tnn.ModuleList(), tnn.ModuleList(), tnn.ModuleList()
            for _ in range(output_conv):
                self.out1.append(tnn.Conv2d(w * e, w * e, 1))
                self.out2.append(tnn.Conv2d(2 * w * e, 2 * w * e, 1))
                self.out3.append(tnn.Conv2d(4 * w * e, 4 * w * e, 1))

        def _make_layer(self, block, planes, blocks, base_width):
            up = tnn.Sequential(_t_deconv(self.inplanes, planes * block.expansion, 2),
                                tnn.BatchNorm2d(planes * block.expansion))
            layers = [block(self.inplanes, planes, 2, up, base_width, up=True)]
            self.inplanes = planes * block.expansion
            layers += [block(self.inplanes, planes, base_width=base_width, up=True)
                       for _ in range(1, blocks)]
            return tnn.Sequential(*layers)

        def forward(self, x):
            f3 = self.layer1(x)
            f2 = self.layer2(f3)
            f1 = self.layer3(f2)
            out = []
            for i in range(len(self.out1)):
                out += [self.out1[i](f1), self.out2[i](f2), self.out3[i](f3)]
            return out

    return _TBasic, _TBottle, _TBNLayer, _TDecoder


def _torch_modules(torch, depth, w, wpg):
    _TBasic, _TBottle, _TBNLayer, _TDecoder = _torch_module_classes(torch)
    stages, e = rc.arch_spec(depth)
    block = _TBottle if e == 4 else _TBasic
    return (_TBNLayer(block, stages[3], w, wpg), _TDecoder(block, stages[:3], w, wpg))


def _count(m, skip=()):
    return sum(p.numel() for n, p in m.named_parameters() if not n.startswith(skip))


@pytest.mark.parametrize('arch', sorted(OFFICIAL_COUNTS))
def test_torch_rebuild_matches_official_counts(torch, arch):
    """Anchors the scaled re-build to the official module definitions at width 64."""
    with torch.device('meta'):
        bn, dec = _torch_modules(torch, arch[0], 64, arch[1])
    assert (_count(bn, ('conv4', 'bn4')), _count(dec)) == OFFICIAL_COUNTS[arch]


def _torch_to_flax(module):
    """state_dict -> ({params}, {batch_stats}) with jaxad's names (the converter rule)."""
    params, stats = {}, {}
    for key, val in module.state_dict().items():
        parts = key.split('.')
        if parts[-1] == 'num_batches_tracked' or parts[0] in ('conv4', 'bn4'):
            continue
        path, i = [], 0
        while i < len(parts) - 1:
            p = parts[i]
            if p in ('downsample', 'upsample'):
                path.append('shortcut_conv' if parts[i + 1] == '0' else 'shortcut_bn')
                i += 2
            elif i + 2 < len(parts) and parts[i + 1].isdigit():
                path.append(f'{p}_{parts[i + 1]}')
                i += 2
            else:
                path.append(p)
                i += 1
        arr, leaf = val.detach().numpy(), parts[-1]
        tree = params
        if leaf == 'weight' and arr.ndim == 4:  # conv (O, I, k, k); deconv (I, O, 2, 2)
            arr, leaf = arr.transpose(2, 3, 0, 1) if arr.shape[-1] == 2 else \
                arr.transpose(2, 3, 1, 0), 'kernel'
        elif leaf == 'weight':
            leaf = 'scale'
        elif leaf in ('running_mean', 'running_var'):
            tree, leaf = stats, {'running_mean': 'mean', 'running_var': 'var'}[leaf]
        for p in path:
            tree = tree.setdefault(p, {})
        tree[leaf] = jnp.asarray(arr)
    return params, stats


@pytest.mark.parametrize('depth,wpg', [(18, 64), (50, 128)])
def test_bottleneck_decoder_match_torch_rebuild(torch, depth, wpg):
    """OCBE + decoder (train-mode BN over the concatenated batch, and eval mode) against
    the torch re-build with the same weights, tiny width."""
    w, n = 4, 4
    torch.manual_seed(0)
    tbn, tdec = _torch_modules(torch, depth, w, wpg)
    _, e = rc.arch_spec(depth)
    taps = [np.abs(_rand(80 + i, (n, 16 // 2 ** i, 16 // 2 ** i, (2 ** i) * w * e)))
            .astype(np.float32) for i in range(3)]
    ttaps = [torch.tensor(t.transpose(0, 3, 1, 2)) for t in taps]
    ocbe = rc.OCBE(depth=depth, width=w, width_per_group=wpg)
    dec = rc.Decoder(depth=depth, width=w, width_per_group=wpg)
    pb, sb = _torch_to_flax(tbn)
    pd, sd = _torch_to_flax(tdec)
    vb = jax.eval_shape(lambda: ocbe.init(jax.random.PRNGKey(0), taps, train=False))
    assert jax.tree_util.tree_structure(vb) == jax.tree_util.tree_structure(
        {'params': pb, 'batch_stats': sb})
    assert rc.param_count(pb) == _count(tbn, ('conv4', 'bn4'))
    assert rc.param_count(pd) == _count(tdec)

    @functools.partial(jax.jit, static_argnums=2)
    def run(vars_b, vars_d, train):
        if train:
            z, ub = ocbe.apply(vars_b, taps, True, mutable=['batch_stats'])
            out, ud = dec.apply(vars_d, z, True, mutable=['batch_stats'])
            return out, ub, ud
        return dec.apply(vars_d, ocbe.apply(vars_b, taps, False), False), None, None

    for train in (False, True):
        tbn.train(train)
        tdec.train(train)
        with torch.no_grad():
            want = tdec(tbn(ttaps))
        out, ub, ud = run({'params': pb, 'batch_stats': sb}, {'params': pd, 'batch_stats': sd},
                          train)
        got = [h for head in out for h in head]
        assert len(got) == len(want) == 6
        for g, t in zip(got, want):
            # eval mode agrees to ~1e-7; train-mode BN over few samples per channel (16 at
            # the bottleneck's 2x2 output) amplifies float32 rounding to ~1e-4 relative
            tol = 2e-3 if train else 1e-5
            np.testing.assert_allclose(np.asarray(g), t.numpy().transpose(0, 2, 3, 1),
                                       atol=tol, rtol=tol)
    # running means after one train step agree (momentum 0.1 = flax 0.9)
    # (running_var differs: torch updates it with the unbiased batch variance, flax biased)
    for (tmod, upd) in ((tbn, ub), (tdec, ud)):
        _, ts = _torch_to_flax(tmod)
        flat_t = jax.tree_util.tree_leaves_with_path(ts)
        flat_j = dict(jax.tree_util.tree_leaves_with_path(upd['batch_stats']))
        means = [(path, a) for path, a in flat_t if path[-1].key == 'mean']
        assert means
        for path, a in means:
            np.testing.assert_allclose(np.asarray(flat_j[path]), np.asarray(a), atol=1e-5)


def test_forward_concatenates_both_encoders_before_shared_bn():
    """en = [E'; E], de = [D0(E); D1(E')] with the bottleneck and decoder run once on the
    batch-concatenated taps (train-mode BN statistics over both halves)."""
    depth, w, size, n = 10, 4, 32, 2  # resnet10: one block per stage (fast compile)
    net = rc.ReContrastNet(depth=depth, width=w, width_per_group=64)
    x = jnp.asarray(np.abs(_rand(90, (n, size, size, 3))).astype(np.float32))
    enc = rc.net_encoder(net)

    @jax.jit
    def init(x):
        frozen_vars = enc.init(jax.random.PRNGKey(3), x, train=False)
        fr = rc.frozen_taps(net, frozen_vars, x)
        return fr, net.init(jax.random.PRNGKey(4), x, fr, train=False)

    fr, v = init(x)

    @jax.jit
    def both(v, x, fr):
        (en, de), upd = net.apply(v, x, fr, train=True, mutable=['batch_stats'])
        en_t, _ = enc.apply({'params': v['params']['encoder'],
                             'batch_stats': v['batch_stats']['encoder']}, x, True,
                            mutable=['batch_stats'])
        cat = [jnp.concatenate([a, b], 0) for a, b in zip(rc.taps_of(en_t), fr)]
        z, _ = rc.OCBE(depth=depth, width=w).apply(
            {'params': v['params']['bottleneck'], 'batch_stats': v['batch_stats']['bottleneck']},
            cat, True, mutable=['batch_stats'])
        heads, _ = rc.Decoder(depth=depth, width=w).apply(
            {'params': v['params']['decoder'], 'batch_stats': v['batch_stats']['decoder']},
            z, True, mutable=['batch_stats'])
        grads = jax.grad(lambda p, f: rc.recontrast_loss(*net.apply(
            {'params': p, 'batch_stats': v['batch_stats']}, x, f, train=True,
            mutable=['batch_stats'])[0], alpha=-3.0), argnums=(0, 1))(v['params'], fr)
        return en, de, rc.taps_of(en_t), heads, grads

    en, de, en_t, heads, g = both(v, x, fr)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(en[i]), np.asarray(fr[i]))
        np.testing.assert_allclose(np.asarray(en[3 + i]), np.asarray(en_t[i]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(de[i]), np.asarray(heads[0][i][:n]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(de[3 + i]), np.asarray(heads[1][i][n:]), atol=1e-5)
    # frozen taps get no gradient through the net; the trainable encoder does
    assert all(float(jnp.abs(t).max()) == 0.0 for t in g[1])
    assert float(jnp.abs(g[0]['encoder']['layer1_0']['conv1']['kernel']).max()) > 0
