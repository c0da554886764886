"""config.model.init and config.model.bn_running_var (jaxad.models.resnet).

References from outside jaxad: PyTorch's documented defaults (Conv2d / Linear weights
kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), Linear bias U(+-1/sqrt(fan_in)); BatchNorm
keeps the unbiased batch variance in running_var), torch itself where installed, Flax's
lecun_normal (variance_scaling(1, fan_in, truncated_normal): variance 1/fan_in, cut at 2
standard deviations of the untruncated normal) and NumPy formulas.

Initialisation checks are statistical. For N i.i.d. draws w with E[w] = 0, the mean of w^2
estimates the variance s2 with standard error sqrt(Var(w^2) / N); Var(w^2) = E[w^4] - s2^2 is
4/5 s2^2 for a uniform (E[w^4] = b^4/5, s2 = b^2/3) and 2 s2^2 for a normal (an upper bound for
a truncated one). A check allows 6 standard errors (two-sided normal tail 2e-9).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad import config as jc
from jaxad import fingerprint
from jaxad.errors import ConfigError
from jaxad.models.resnet import CSINet, ResNet, batch_norm, build_model
from tests.helpers import import_torch

EPS32 = float(np.finfo(np.float32).eps)
SIGMAS = 6.0
UNIFORM_W2_VAR = 4.0 / 5.0  # Var(w^2) / s2^2 for a uniform
NORMAL_W2_VAR = 2.0  # the same for a normal (>= a truncated normal's)
TRUNC = 0.87962566103423978  # std of a standard normal cut at +-2 (flax / jax)


def second_moment_ok(w, s2, w2_var_ratio):
    """|mean(w^2) - s2| within SIGMAS standard errors; (ok, observed, bound) for messages."""
    w = np.asarray(w, np.float64).ravel()
    observed = float(np.mean(w * w))
    bound = SIGMAS * math.sqrt(w2_var_ratio / w.size) * s2
    return abs(observed - s2) <= bound, observed, bound


def init_params(model_cfg, num_shifts=4):
    x = jnp.zeros((1, 8, 8, 3))  # kernel shapes do not depend on the image size
    return build_model(model_cfg, num_shifts).init(jax.random.key(0), x, train=False)


def layers(tree, prefix=''):
    """{path: leaf dict} of every dict that holds a 'kernel' or 'scale'."""
    out = {}
    for name, sub in tree.items():
        if hasattr(sub, 'items'):
            if 'kernel' in sub or 'scale' in sub:
                out[f'{prefix}{name}'] = sub
            else:
                out.update(layers(sub, f'{prefix}{name}/'))
    return out


def resnet18_config(init, **model):
    c = jc.csi_base()  # width 64, ResNet-18, CIFAR stem, heads 512-512-128 and 512-4
    c.model.init = init
    c.model.update(model)
    return c.model


@pytest.fixture(scope='module')
def torch_params():
    return layers(init_params(resnet18_config('torch'))['params'])


def test_torch_init_is_pytorchs_default(torch_params):
    kernels = biases = bns = 0
    for path, layer in torch_params.items():
        if 'scale' in layer:  # BatchNorm
            np.testing.assert_array_equal(layer['scale'], 1.0)
            np.testing.assert_array_equal(layer['bias'], 0.0)
            bns += 1
            continue
        kernel = np.asarray(layer['kernel'])
        fan_in = int(np.prod(kernel.shape[:-1]))  # HWIO: kh*kw*in; Dense: in
        b = 1.0 / math.sqrt(fan_in)
        # U(-b, b): every |w| <= b (float32 rounding of b), variance b^2/3 = 1/(3 fan_in)
        assert np.abs(kernel).max() <= b * (1 + 2 * EPS32), path
        ok, got, tol = second_moment_ok(kernel, b * b / 3, UNIFORM_W2_VAR)
        assert ok, f'{path}: mean w^2 {got:.4g} vs 1/(3 fan_in) {b * b / 3:.4g} +- {tol:.2g}'
        assert np.abs(kernel).max() > 0.9 * b or kernel.size < 50, path  # not narrower
        kernels += 1
        if 'bias' in layer:
            bias = np.asarray(layer['bias'])
            assert np.abs(bias).max() <= b * (1 + 2 * EPS32), path
            ok, got, tol = second_moment_ok(bias, b * b / 3, UNIFORM_W2_VAR)
            assert ok, f'{path} bias: {got:.4g} vs {b * b / 3:.4g} +- {tol:.2g}'
            assert np.any(bias != 0), path
            biases += 1
    # ResNet-18: stem + 16 block convs + 3 shortcut convs; proj_hidden, proj_out, shift_cls.
    assert (kernels, biases, bns) == (23, 3, 20)


def test_flax_init_is_lecun_truncated_normal():
    params = layers(init_params(resnet18_config('flax'))['params'])
    checked = 0
    for path, layer in params.items():
        if 'kernel' not in layer:
            continue
        kernel = np.asarray(layer['kernel'])
        fan_in = int(np.prod(kernel.shape[:-1]))
        s2 = 1.0 / fan_in
        assert np.abs(kernel).max() <= 2 * math.sqrt(s2) / TRUNC * (1 + 4 * EPS32), path
        ok, got, tol = second_moment_ok(kernel, s2, NORMAL_W2_VAR)
        assert ok, f'{path}: mean w^2 {got:.4g} vs 1/fan_in {s2:.4g} +- {tol:.2g}'
        if 'bias' in layer:
            np.testing.assert_array_equal(layer['bias'], 0.0)
        checked += 1
    assert checked == 23


def test_torchvision_init_kaiming_fan_out_convs():
    """torchvision's ResNet: convs kaiming_normal(fan_out, relu), variance 2/(kh*kw*out); a
    CIFAR 3x3 stem (replaced after construction, as MCL does) and the heads torch's."""
    params = layers(init_params(resnet18_config('torchvision'))['params'])
    for path, layer in params.items():
        if 'kernel' not in layer:
            continue
        kernel = np.asarray(layer['kernel'])
        fan_in = int(np.prod(kernel.shape[:-1]))
        if path.startswith('encoder/layer'):
            fan_out = int(np.prod(kernel.shape[:-2])) * kernel.shape[-1]
            ok, got, tol = second_moment_ok(kernel, 2.0 / fan_out, NORMAL_W2_VAR)
        else:  # encoder/conv1 (CIFAR stem) and the Dense heads
            assert np.abs(kernel).max() <= (1 + 2 * EPS32) / math.sqrt(fan_in), path
            ok, got, tol = second_moment_ok(kernel, 1.0 / (3 * fan_in), UNIFORM_W2_VAR)
        assert ok, f'{path}: mean w^2 {got:.4g} +- {tol:.2g}'
    # The ImageNet stem is torchvision's own conv1: kaiming too.
    stem = ResNet(depth=18, stem='imagenet', param_init='torchvision').init(
        jax.random.key(1), jnp.zeros((1, 16, 16, 3)), train=False)['params']['conv1']['kernel']
    ok, got, tol = second_moment_ok(stem, 2.0 / (7 * 7 * 64), NORMAL_W2_VAR)
    assert ok, (got, tol)


def test_init_against_torch(torch_params):
    """torch's own Conv2d / Linear for the same shapes: the second moments of the two samples
    agree within 6 standard errors of their difference, and both stay inside +-1/sqrt(fan_in)."""
    torch = import_torch()
    torch.manual_seed(0)
    pairs = [(torch.nn.Conv2d(256, 512, 3, bias=False).weight,
              torch_params['encoder/layer4_0/conv1']['kernel']),
             (torch.nn.Conv2d(3, 64, 3, bias=False).weight,
              torch_params['encoder/conv1']['kernel'])]
    linear = torch.nn.Linear(512, 128)
    pairs += [(linear.weight, torch_params['proj_out']['kernel']),
              (linear.bias, torch_params['proj_out']['bias'])]
    for theirs, ours in pairs:
        theirs = theirs.detach().numpy()
        ours = np.asarray(ours)
        assert theirs.size == ours.size
        fan_in = theirs[0].size if theirs.ndim > 1 else 512  # OIHW: in*kh*kw; bias: Linear's in
        s2 = 1.0 / (3 * fan_in)
        for w in (theirs, ours):
            assert np.abs(w).max() <= (1 + 2 * EPS32) / math.sqrt(fan_in)
        diff = (np.mean(np.square(theirs, dtype=np.float64))
                - np.mean(np.square(ours, dtype=np.float64)))
        se = math.sqrt(2 * UNIFORM_W2_VAR / ours.size) * s2
        assert abs(diff) <= SIGMAS * se, (theirs.shape, diff, se)
    # torchvision's conv init: torch's kaiming_normal_(fan_out, relu) on the same shape.
    w = torch.empty(512, 256, 3, 3)
    torch.nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu')
    ours = ResNet(depth=18, param_init='torchvision').init(
        jax.random.key(2), jnp.zeros((1, 8, 8, 3)), train=False)['params']['layer4_0']['conv1']
    diff = (np.mean(np.square(w.numpy(), dtype=np.float64))
            - np.mean(np.square(np.asarray(ours['kernel']), dtype=np.float64)))
    s2 = 2.0 / (512 * 9)
    assert abs(diff) <= SIGMAS * math.sqrt(2 * NORMAL_W2_VAR / w.numel()) * s2, diff


def test_flax_option_keeps_the_module_defaults():
    """init='flax' + bn_running_var='biased' is jaxad's behaviour before the options (the
    modules' defaults): same params, same training step, bit for bit."""
    c = jc.csi_base()
    c.model.update(width=4, name='resnet10', init='flax', bn_running_var='biased')
    x = np.random.default_rng(0).uniform(size=(4, 8, 8, 3)).astype(np.float32)
    ours = build_model(c.model, 4)
    plain = CSINet(depth=10, width=4)
    v1 = ours.init(jax.random.key(0), x, train=False)
    v2 = plain.init(jax.random.key(0), x, train=False)
    out1 = ours.apply(v1, x, train=True, mutable=['batch_stats'])
    out2 = plain.apply(v2, x, train=True, mutable=['batch_stats'])
    for a, b in zip(jax.tree_util.tree_leaves((v1, out1)), jax.tree_util.tree_leaves((v2, out2))):
        np.testing.assert_array_equal(a, b)
    # The default config (torch's init) differs.
    c.model.update(init='torch', bn_running_var='unbiased')
    v3 = build_model(c.model, 4).init(jax.random.key(0), x, train=False)
    assert not np.array_equal(v3['params']['proj_out']['kernel'],
                              v1['params']['proj_out']['kernel'])


# ----------------------------------------------------------------------------- BatchNorm

class BN(nn.Module):
    groups: int = 1
    running_var: str = 'unbiased'

    @nn.compact
    def __call__(self, x, train):
        return batch_norm(train, 0.9, jnp.float32, 'batch', self.groups, 'bn', self.running_var)(x)


def run_steps(batches, groups=1, running_var='unbiased'):
    """[(y, mean, var)] after each training step of BN over `batches` (NHWC or NC)."""
    module = BN(groups, running_var)
    variables = module.init(jax.random.key(0), batches[0], train=False)
    out = []
    for x in batches:
        y, mutated = module.apply(variables, x, train=True, mutable=['batch_stats'])
        variables = {'params': variables['params'], 'batch_stats': mutated['batch_stats']}
        stats = mutated['batch_stats']['bn']
        out.append((np.asarray(y), np.asarray(stats['mean']), np.asarray(stats['var'])))
    return out


def gamma(n):
    """Relative error bound of a float32 sum of n terms (recursive summation, any order:
    Higham, Accuracy and Stability of Numerical Algorithms, 2002, §4.2)."""
    return n * EPS32 / (1 - n * EPS32)


def numpy_running(batches, groups, momentum=0.1):
    """torch's update in float64: mean and the unbiased variance n/(n-1) x biased per group,
    averaged over groups; running = (1 - momentum) running + momentum batch."""
    mean, var = 0.0, 1.0
    out = []
    for x in batches:
        parts = np.split(np.asarray(x, np.float64), groups)
        axes = tuple(range(x.ndim - 1))
        n = parts[0].size // x.shape[-1]
        m = np.mean([p.mean(axes) for p in parts], 0)
        v = np.mean([p.var(axes) * n / (n - 1) for p in parts], 0)
        mean = (1 - momentum) * mean + momentum * m
        var = (1 - momentum) * var + momentum * v
        out.append((mean, var))
    return out


def tolerances(batches, groups):
    """(atol of the running mean, rtol of the running variance): each side's per-channel sums
    of n terms err by gamma(n) relative to sum |x| (mean) or to the sum of squares (variance,
    all terms >= 0); the update adds a few roundings of the running value."""
    n = batches[0][: len(batches[0]) // groups].size // batches[0].shape[-1]
    abs_mean = max(float(np.abs(x).reshape(-1, x.shape[-1]).mean(0).max()) for x in batches)
    return 2 * gamma(n) * abs_mean + 8 * EPS32 * abs_mean, 2 * gamma(n) + 8 * EPS32


@pytest.mark.parametrize('shape,groups', [((8, 4, 4, 5), 1), ((6, 3, 3, 4), 2), ((10, 6), 1),
                                          ((4, 2, 2, 3), 1)])
def test_running_var_unbiased_numpy(shape, groups):
    rng = np.random.default_rng(sum(shape))
    batches = [rng.normal(2.0, 1.5, size=shape).astype(np.float32) for _ in range(3)]
    got = run_steps(batches, groups)
    atol, rtol = tolerances(batches, groups)
    for (_, mean, var), (want_mean, want_var) in zip(got, numpy_running(batches, groups)):
        np.testing.assert_allclose(mean, want_mean, rtol=0, atol=atol)
        np.testing.assert_allclose(var, want_var, rtol=rtol, atol=0)
    # 'biased' keeps flax's n-divided variance: detectably different at these n.
    _, _, biased = run_steps(batches[:1], groups, 'biased')[0]
    assert np.abs(biased / numpy_running(batches[:1], groups)[0][1] - 1).max() > 10 * rtol


def test_running_stats_match_torch_batchnorm():
    torch = import_torch()
    rng = np.random.default_rng(0)
    batches = [rng.normal(1.0, 2.0, size=(4, 3, 3, 6)).astype(np.float32) for _ in range(4)]
    bn = torch.nn.BatchNorm2d(6)  # momentum 0.1, eps 1e-5, train mode
    got = run_steps(batches)
    atol, rtol = tolerances(batches, 1)
    n = 4 * 3 * 3
    for x, (y, mean, var) in zip(batches, got):
        ty = bn(torch.from_numpy(x).permute(0, 3, 1, 2)).detach().permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(mean, bn.running_mean.numpy(), rtol=0, atol=atol)
        np.testing.assert_allclose(var, bn.running_var.numpy(), rtol=rtol, atol=0)
        # Both normalise with the biased batch variance: |dy| <= dmean/sd + |y| dvar/(2 var)
        # + a few roundings, dmean and dvar within each side's gamma(n) bounds.
        sd = x.std((0, 1, 2), dtype=np.float64)
        mean_abs = np.abs(x).mean((0, 1, 2), dtype=np.float64)
        bound = 2 * (gamma(n) * mean_abs / sd + np.abs(ty) * (gamma(n) + 4 * EPS32))
        assert np.all(np.abs(y - ty) <= bound + 4 * EPS32)


def test_sharded_batch_statistics_are_global():
    """Under jit over a batch sharded on 8 devices the statistics are the global batch's
    (SyncBN): each device alone holds 2 rows, whose statistics would differ."""
    devices = jax.devices()
    assert len(devices) >= 2, 'tests/conftest.py emulates 8 CPU devices'
    mesh = jax.make_mesh((len(devices),), ('data',))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 1.0, size=(2 * len(devices), 3, 3, 4)).astype(np.float32)
    module = BN()
    variables = module.init(jax.random.key(0), x, train=False)
    step = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=['batch_stats']))
    _, mutated = step(variables, jax.device_put(x, sharding))
    atol, rtol = tolerances([x], 1)
    want_mean, want_var = numpy_running([x], 1)[0]
    np.testing.assert_allclose(mutated['batch_stats']['bn']['mean'], want_mean, rtol=0, atol=atol)
    np.testing.assert_allclose(mutated['batch_stats']['bn']['var'], want_var, rtol=rtol, atol=0)


@pytest.mark.parametrize('rows,groups', [(2, 2), (1, 1)])  # grouped and whole-batch layers
def test_unbiased_needs_two_values_per_channel(rows, groups):
    x = np.ones((rows, 3), np.float32)
    module = BN(groups=groups)
    variables = module.init(jax.random.key(0), x, train=False)
    with pytest.raises(ConfigError, match='one value per channel'):
        module.apply(variables, x, train=True, mutable=['batch_stats'])


# ----------------------------------------------------------------------------- old runs

def test_run_saved_before_the_fields_is_read_as_flax(tmp_path):
    """A config.json without model.init / bn_running_var was trained with flax's init and
    BN: load_run_config says so, and the workdir guard skips fields the record lacks."""
    import json
    saved = json.loads(jc.csi_base().to_json_best_effort())
    del saved['model']['init'], saved['model']['bn_running_var']
    (tmp_path / 'config.json').write_text(json.dumps(saved))
    config = jc.load_run_config(tmp_path)
    assert (config.model.init, config.model.bn_running_var) == ('flax', 'biased')
    recorded = fingerprint.split(saved)[0]
    assert fingerprint.differences(recorded, fingerprint.training_fields(jc.csi_base())) == []
    # A run saved with the fields keeps its own values.
    saved['model'].update(init='torch', bn_running_var='unbiased')
    (tmp_path / 'config.json').write_text(json.dumps(saved))
    config = jc.load_run_config(tmp_path)
    assert (config.model.init, config.model.bn_running_var) == ('torch', 'unbiased')
