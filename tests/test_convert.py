"""torchvision-layout ResNets -> jaxad encoders (`jaxad.models.convert`).

The torch side is `torch_resnet` below: a plain-torch copy of torchvision's ResNet with
the same module names (so the same state_dict keys), anchored to torchvision's published
parameter totals (TORCHVISION_PARAMS). torch comes through tests.helpers.import_torch (a
skip off CI, a failure on CI); torchvision is not needed, so nothing here depends on
whether it is installed.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from jaxad import config as jc
from jaxad import loop, sharding
from jaxad.errors import ConfigError
from jaxad.methods import get_method
from jaxad.models import convert
from jaxad.models.resnet import ResNet, build_model, count_params
from tests.helpers import import_torch

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
LAYERS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3],
          152: [3, 8, 36, 3]}
# torchvision's parameter totals, fc (1000 classes) included, per (depth, width_per_group).
TORCHVISION_PARAMS = {(18, 64): 11_689_512, (34, 64): 21_797_672, (50, 64): 25_557_032,
                      (101, 64): 44_549_160, (152, 64): 60_192_808, (50, 128): 68_883_240}


def fc_params(depth):
    """The 1000-class fc layer: (512 or 2048) x 1000 weights + 1000 biases."""
    return (512 if depth < 50 else 2048) * 1000 + 1000


def torch_resnet(torch, depth, width_per_group=64, num_classes=1000):
    """torchvision's ResNet (v1.5 Bottleneck), same module names, written in plain torch."""
    nn = torch.nn

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride=1, downsample=None):
            super().__init__()
            width = int(planes * (width_per_group / 64.0))
            self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)) + identity)

    block = BasicBlock if depth < 50 else Bottleneck

    class TorchResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._make_layer(64, LAYERS[depth][0])
            self.layer2 = self._make_layer(128, LAYERS[depth][1], 2)
            self.layer3 = self._make_layer(256, LAYERS[depth][2], 2)
            self.layer4 = self._make_layer(512, LAYERS[depth][3], 2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * block.expansion, num_classes)

        def _make_layer(self, planes, blocks, stride=1):
            downsample = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * block.expansion))
            layers = [block(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * block.expansion
            layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x):
            return self.fc(torch_features(torch, self, x)[0])

    return TorchResNet()


def torch_features(torch, m, x):
    """(pooled avgpool output before fc, [layer1..layer4 outputs]) of a torchvision ResNet."""
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    stages = []
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
        x = layer(x)
        stages.append(x)
    return torch.flatten(m.avgpool(x), 1), stages


def randomised(torch, model, seed=0):
    """Random BN affine params and realistic, non-trivial running statistics, eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.1)
            bn.momentum = None  # cumulative average of the batches below
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, 64, 64, generator=g))
        for bn in bns:
            bn.running_var.mul_(torch.rand(bn.running_var.shape, generator=g) * 0.7 + 0.7)
            bn.running_mean.add_(torch.randn(bn.running_mean.shape, generator=g) * 0.05)
    return model.eval()


def numpy_state_dict(model):
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def torch_reference(torch, depth, size, seed=0):
    """(model, state_dict as numpy, images in [0, 1] NHWC, pooled features, stages NHWC)."""
    torch.manual_seed(seed)
    model = randomised(torch, torch_resnet(torch, depth), seed)
    x = np.random.default_rng(seed).uniform(size=(2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        pooled, stages = torch_features(
            torch, model, torch.from_numpy(((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)))
    return (model, numpy_state_dict(model), x, pooled.numpy(),
            [s.numpy().transpose(0, 2, 3, 1) for s in stages])


@pytest.fixture(scope='module')
def torch_mod():
    return import_torch()


@pytest.fixture(scope='module')
def resnet18_ref(torch_mod):
    return torch_reference(torch_mod, 18, 32)


@pytest.mark.parametrize('depth', [18, 50])
def test_features_match_torch(torch_mod, depth, resnet18_ref):
    model, sd, x, pooled, stages = (resnet18_ref if depth == 18 else
                                    torch_reference(torch_mod, depth, 64))
    assert convert.infer_arch(sd) == (depth, 64, 64)
    variables = convert.torchvision_to_flax(sd, depth)
    np.testing.assert_array_equal(variables['fc']['kernel'], sd['fc.weight'].T)
    net = ResNet(depth=depth, stem='imagenet', input_norm='imagenet', return_stages=True)
    out = jax.jit(lambda v, x: net.apply(v, x, train=False))(
        {'params': variables['params'], 'batch_stats': variables['batch_stats']}, x)
    assert out['pooled'].shape == (2, 512 if depth == 18 else 2048)
    np.testing.assert_allclose(out['pooled'], pooled, atol=1e-4, rtol=1e-4)
    # Stage maps (return_stages): float32 rounding grows with depth and magnitude (up
    # to ~10 in layer4), so the tolerance is relative to each map's largest value.
    for i, want in enumerate(stages):
        np.testing.assert_allclose(out[f'layer{i + 1}'], want, rtol=1e-4,
                                   atol=5e-5 * max(1.0, float(np.abs(want).max())))


def test_encoder_param_counts():
    """Every architecture: torchvision's parameter count minus fc (no torch needed)."""
    assert TORCHVISION_PARAMS[(152, 64)] - fc_params(152) == 58_143_808
    for (depth, wpg), n in TORCHVISION_PARAMS.items():
        got = count_params(convert.encoder_shapes(depth, wpg)['params'])
        assert got == n - fc_params(depth), (depth, wpg)


@pytest.mark.parametrize('depth,wpg', sorted(TORCHVISION_PARAMS))
def test_torch_keys_match_the_encoder(torch_mod, depth, wpg):
    """Every torch key maps onto the flax encoder with its shape (meta device, no compute),
    and the plain-torch copy has torchvision's parameter total."""
    with torch_mod.device('meta'):
        model = torch_resnet(torch_mod, depth, wpg)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[(depth, wpg)]
    sd = model.state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items()
           if not k.startswith('fc.') and not k.endswith('num_batches_tracked')}
    assert got == {k: v[2] for k, v in convert.expected_keys(depth, wpg).items()}
    assert convert.infer_arch(sd) == (depth, wpg, 64)


def test_cli_pth_and_npz(torch_mod, resnet18_ref, tmp_path, capsys):
    model, sd, *_ = resnet18_ref
    direct = convert.torchvision_to_flax(sd, 18)
    torch_mod.save({'state_dict': model.state_dict(), 'epoch': 3}, tmp_path / 'r18.pth')
    np.savez(tmp_path / 'r18.npz', **{f'module.{k}': v for k, v in sd.items()})  # DataParallel
    for name, extra in [('r18.pth', []), ('r18.npz', ['--depth', '18'])]:
        out = tmp_path / f'out_{name}'
        assert convert.main(['--in', str(tmp_path / name), '--out', str(out)] + extra) == 0
        assert 'resnet18' in capsys.readouterr().out
        loaded, meta = convert.load_converted(out)
        assert meta['depth'] == 18 and meta['arch'] == 'resnet18' and meta['has_fc']
        assert meta['encoder_params'] == 11_689_512 - 513_000
        flat = traverse_util.flatten_dict(loaded)
        assert flat.keys() == traverse_util.flatten_dict(direct).keys()
        for k, v in traverse_util.flatten_dict(direct).items():
            np.testing.assert_array_equal(flat[k], v)
    # HWIO kernel = OIHW weight transposed; BN names.
    k = loaded['params']['layer2_0']['shortcut_conv']['kernel']
    np.testing.assert_array_equal(k, sd['layer2.0.downsample.0.weight'].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(loaded['batch_stats']['layer4_1']['bn2']['var'],
                                  sd['layer4.1.bn2.running_var'])
    # CLI errors: one line on stderr, exit status 1.
    assert convert.main(['--in', str(tmp_path / 'nope.pth'), '--out', str(tmp_path / 'x')]) == 1
    assert 'no such file' in capsys.readouterr().err
    assert convert.main(['--in', str(tmp_path / 'r18.npz'), '--out', str(tmp_path / 'x'),
                         '--depth', '34']) == 1
    err = capsys.readouterr().err
    assert 'missing keys' in err and 'look like resnet18' in err


def _csi_config(init_from, name='resnet18', stem='imagenet'):
    c = jc.csi_base()
    c.model.update(name=name, stem=stem, input_norm='imagenet', init_from=str(init_from))
    return c


def test_init_from_loads_the_encoder(torch_mod, resnet18_ref, tmp_path):
    model, sd, x, pooled, _ = resnet18_ref
    np.savez(tmp_path / 'r18.npz', **sd)
    convert.convert_file(tmp_path / 'r18.npz', tmp_path / 'conv')
    loaded, _ = convert.load_converted(tmp_path / 'conv')
    shape, tx, key = (32, 32, 3), optax.sgd(0.1), jax.random.key(0)
    mesh = sharding.make_mesh()  # the trainer's path: jit, replicated over 8 CPU devices
    method = get_method(_csi_config(tmp_path / 'conv'))
    state = loop.init_state(method, tx, key, shape, mesh)
    scratch_init = loop.make_init_fn(get_method(_csi_config('')), tx, shape)
    assert jax.tree_util.tree_structure(state) == \
        jax.tree_util.tree_structure(jax.eval_shape(scratch_init, key))
    for col in ('params', 'batch_stats'):
        got = traverse_util.flatten_dict(getattr(state, col)['encoder'])
        for k, v in traverse_util.flatten_dict(loaded[col]).items():
            np.testing.assert_array_equal(got[k], v)
    # The heads stay as randomly initialised (a full random init of the 11M encoder
    # params takes ~15 s on 2 cores, so only the parts compared are computed).
    heads = ('proj_hidden', 'proj_out', 'shift_cls')
    scratch = jax.jit(lambda k: (lambda st: ({h: st.params[h] for h in heads},
                                             st.batch_stats['encoder']['bn1']))(
        scratch_init(k)))(key)
    for h in heads:
        np.testing.assert_array_equal(state.params[h]['kernel'], scratch[0][h]['kernel'])
    assert np.all(scratch[1]['mean'] == 0) and np.all(state.batch_stats['encoder']['bn1']['mean'] != 0)
    # CSINet's features (model.input_norm='imagenet') are torch's.
    out = jax.jit(lambda v, x: method.model.apply(v, x, train=False))(
        {'params': state.params, 'batch_stats': state.batch_stats}, jnp.asarray(x))
    np.testing.assert_allclose(out['features'], pooled, atol=1e-4, rtol=1e-4)
    # A model that the weights do not fit: a clear error (shapes only, no compute).
    for name, stem, match in [('resnet34', 'imagenet', 'missing in the file'),
                              ('resnet18', 'cifar', "stem='imagenet'")]:
        bad = get_method(_csi_config(tmp_path / 'conv', name, stem))
        with pytest.raises(convert.ConversionError, match=match):
            jax.eval_shape(loop.make_init_fn(bad, tx, shape), key)
    with pytest.raises(convert.ConversionError, match='not a converted encoder directory'):
        jax.eval_shape(lambda: get_method(_csi_config(tmp_path)).init_variables(key, shape))


def fake_state_dict(depth, wpg=64, width=64, seed=0):
    """Random arrays under every torch key of the architecture (no torch needed)."""
    rng = np.random.default_rng(seed)
    sd = {k: rng.normal(size=shape).astype(np.float32)
          for k, (_, _, shape) in convert.expected_keys(depth, wpg, width).items()}
    sd['bn1.num_batches_tracked'] = np.array(7)
    return sd


def test_conversion_errors(tmp_path, monkeypatch):
    sd = fake_state_dict(18)
    out = convert.torchvision_to_flax(sd, 18)
    assert 'fc' not in out
    np.testing.assert_array_equal(out['params']['conv1']['kernel'],
                                  sd['conv1.weight'].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(out['batch_stats']['layer1_0']['bn1']['mean'],
                                  sd['layer1.0.bn1.running_mean'])
    missing = {k: v for k, v in sd.items() if k != 'layer3.1.bn2.weight'}
    with pytest.raises(convert.ConversionError, match=r'1 missing keys: layer3\.1\.bn2\.weight'):
        convert.torchvision_to_flax(missing, 18)
    with pytest.raises(convert.ConversionError, match=r'unexpected keys: layer5\.0\.conv1\.weight'):
        convert.torchvision_to_flax(dict(sd, **{'layer5.0.conv1.weight': sd['conv1.weight']}), 18)
    wrong = dict(sd, **{'layer2.0.conv2.weight': np.zeros((128, 128, 1, 1), np.float32)})
    with pytest.raises(convert.ConversionError,
                       match=r'shape mismatches: layer2\.0\.conv2\.weight \(128, 128, 1, 1\) '
                             r'\(want \(128, 128, 3, 3\)\)'):
        convert.torchvision_to_flax(wrong, 18)
    with pytest.raises(convert.ConversionError, match='look like resnet18'):
        convert.torchvision_to_flax(sd, 50)
    with pytest.raises(convert.ConversionError, match='depth 19 is not supported'):
        convert.torchvision_to_flax(sd, 19)
    with pytest.raises(convert.ConversionError, match='unknown weight format'):
        (tmp_path / 'w.h5').write_bytes(b'')
        convert.load_state_dict(tmp_path / 'w.h5')
    (tmp_path / 'w.safetensors').write_bytes(b'')
    monkeypatch.setitem(__import__('sys').modules, 'safetensors', None)
    with pytest.raises(convert.ConversionError, match='pip install safetensors'):
        convert.load_state_dict(tmp_path / 'w.safetensors')
    assert issubclass(convert.ConversionError, ConfigError)


def test_wide_resnet_conversion_roundtrip(tmp_path):
    """WRN-50-2 layout at stem width 8 (small): file -> DIR -> the model's tree."""
    sd = fake_state_dict(50, 128, width=8)
    np.savez(tmp_path / 'w.npz', **sd)
    meta = convert.convert_file(tmp_path / 'w.npz', tmp_path / 'out')
    assert (meta['arch'], meta['depth'], meta['width_per_group'], meta['width']) == \
        ('wide_resnet50_2', 50, 128, 8)
    with open(tmp_path / 'out' / 'meta.json') as f:
        assert json.load(f)['format'] == convert.FORMAT
    loaded, _ = convert.load_converted(tmp_path / 'out')
    shapes = convert.encoder_shapes(50, 128, 8)
    assert jax.tree_util.tree_map(lambda a: a.shape, loaded) == \
        jax.tree_util.tree_map(lambda a: a.shape, shapes)
    assert meta['encoder_params'] == count_params(shapes['params'])
    np.testing.assert_array_equal(loaded['params']['layer3_0']['conv3']['kernel'],
                                  sd['layer3.0.conv3.weight'].transpose(2, 3, 1, 0))


def test_build_model_names_and_options():
    c = jc.csi_base()
    c.model.width = 4
    x = jnp.zeros((2, 32, 32, 3))
    for name, feat in [('resnet50', 128), ('wide_resnet50_2', 128), ('resnet152', 128)]:
        c.model.name = name
        shapes = jax.eval_shape(lambda: build_model(c.model, 4).init(jax.random.key(0), x,
                                                                     train=False))
        assert shapes['params']['proj_hidden']['kernel'].shape == (feat, feat)
        inner = shapes['params']['encoder']['layer1_0']['conv1']['kernel'].shape[-1]
        assert inner == (8 if name.startswith('wide') else 4)
    c.model.input_norm = 'bogus'
    with pytest.raises(ConfigError, match='input_norm'):
        build_model(c.model, 4)
    with pytest.raises(ConfigError, match='width_per_group'):
        ResNet(depth=18, width_per_group=128).init(jax.random.key(0), x, train=False)
    # input_norm='imagenet' needs 3 channels.
    with pytest.raises(ConfigError, match='3 input channels'):
        ResNet(depth=18, width=4, input_norm='imagenet').init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
    # return_stages: layer1..layer4 + pooled, float32.
    out = jax.eval_shape(lambda: ResNet(depth=50, stem='imagenet', width=4, return_stages=True)
                         .init_with_output(jax.random.key(0), x, train=False)[0])
    assert {k: v.shape for k, v in out.items()} == {
        'layer1': (2, 8, 8, 16), 'layer2': (2, 4, 4, 32), 'layer3': (2, 2, 2, 64),
        'layer4': (2, 1, 1, 128), 'pooled': (2, 128)}
