"""ResNet/CSINet shapes, dtypes and stems."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad import config as jc
from jaxad.errors import ConfigError
from jaxad.models.resnet import CSINet, ResNet, build_model, count_params


@pytest.mark.parametrize('depth,stem,size', [(18, 'cifar', 16), (34, 'cifar', 8),
                                             (18, 'imagenet', 32)])
def test_encoder_shapes(depth, stem, size):
    model = ResNet(depth=depth, stem=stem, width=4)
    x = jnp.zeros((2, size, size, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    out = model.apply(variables, x, train=False)
    assert out.shape == (2, 32) and out.dtype == jnp.float32


def test_paper_resnet18_size():
    model = CSINet(depth=18, width=64)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                               train=False))
    # CIFAR ResNet-18 encoder 11.17M + 512x512 + 512x128 + 512x4 head params.
    n = count_params(shapes['params'])
    assert n == 11_173_962 - 5130 + (512 * 512 + 512) + (512 * 128 + 128) + (512 * 4 + 4)


def test_bfloat16_compute_float32_params_and_outputs():
    model = CSINet(width=4, proj_dim=8, dtype=jnp.bfloat16)
    x = jnp.ones((2, 8, 8, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables['params']))
    out = model.apply(variables, x, train=False)
    assert out['proj'].dtype == jnp.float32 and out['proj'].shape == (2, 8)
    assert out['shift_logits'].shape == (2, 4)


def test_train_mode_updates_batch_stats():
    model = CSINet(width=4, proj_dim=8)
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    _, mutated = model.apply(variables, x, train=True, mutable=['batch_stats'])
    before = jax.tree_util.tree_leaves(variables['batch_stats'])
    after = jax.tree_util.tree_leaves(mutated['batch_stats'])
    assert any(not jnp.allclose(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize('field,value,match', [
    ('name', 'resnet7', 'resnet7'), ('dtype', 'float8', 'float8'),
    ('init', 'kaiming', "unknown model.init 'kaiming'"),
    ('bn_running_var', 'sample', "unknown model.bn_running_var 'sample'")])
def test_build_model_errors(field, value, match):
    c = jc.csi_base()
    c.model[field] = value
    with pytest.raises(ConfigError, match=match):
        build_model(c.model, 4)


def numpy_group_bn(x, groups, eps=1e-5):
    """Per contiguous group: (x - mean) / sqrt(biased var + eps) over all but channels."""
    out = []
    for g in np.split(x.astype(np.float64), groups):
        axes = tuple(range(g.ndim - 1))
        out.append((g - g.mean(axes)) / np.sqrt(g.var(axes) + eps))
    return np.concatenate(out)


@pytest.mark.parametrize('groups', [1, 2, 4])
def test_grouped_batch_norm_matches_numpy(groups):
    from jaxad.models.resnet import batch_norm
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return batch_norm(train, 0.9, jnp.float32, 'batch', groups, 'bn')(x)

    x = np.random.default_rng(groups).normal(2.0, 3.0, size=(8, 3, 3, 5)).astype(np.float32)
    variables = Net().init(jax.random.key(0), x, train=False)
    y, mutated = Net().apply(variables, x, train=True, mutable=['batch_stats'])
    np.testing.assert_allclose(np.asarray(y), numpy_group_bn(x, groups), rtol=1e-4, atol=1e-4)
    # Running statistics: 0.9 * init + 0.1 * (mean over groups of the group statistics).
    parts = np.split(x.astype(np.float64), groups)
    want_mean = 0.1 * np.mean([p.mean((0, 1, 2)) for p in parts], 0)
    want_var = 0.9 + 0.1 * np.mean([p.var((0, 1, 2)) for p in parts], 0)
    stats = mutated['batch_stats']['bn']
    np.testing.assert_allclose(np.asarray(stats['mean']), want_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats['var']), want_var, rtol=1e-4)
    # Same variables as nn.BatchNorm, so checkpoints and weight import are unaffected.
    plain = nn.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
    assert jax.tree_util.tree_structure({k: v['bn'] for k, v in variables.items()}) == \
        jax.tree_util.tree_structure(plain)


def test_bn_modes_in_the_network():
    c = jc.csi_base()
    c.model.width = 4
    x = np.random.default_rng(0).uniform(size=(8, 8, 8, 3)).astype(np.float32)
    variables = build_model(c.model, 4).init(jax.random.key(0), x, train=False)

    def train_apply(**model):
        c.model.update(model)
        return build_model(c.model, 4).apply(variables, x, train=True, mutable=['batch_stats'])

    out_global, stats_global = train_apply(bn_mode='batch', bn_groups=1)
    out_grouped, _ = train_apply(bn_mode='batch', bn_groups=2)
    out_frozen, stats_frozen = train_apply(bn_mode='frozen', bn_groups=1)
    # Two ghost batches: each half normalised on its own; equal to running each half alone.
    half, _ = build_model(_with(c.model, bn_groups=1, bn_mode='batch'), 4).apply(
        variables, x[:4], train=True, mutable=['batch_stats'])
    # (flax's BN takes E[x^2] - E[x]^2, ours E[(x - mean)^2]: rounding differs a little.)
    np.testing.assert_allclose(out_grouped['proj'][:4], half['proj'], rtol=1e-3, atol=1e-4)
    assert not np.allclose(out_grouped['proj'], out_global['proj'], atol=1e-3)
    # Frozen: training-mode forward equals the eval forward, running statistics untouched.
    eval_out = build_model(c.model, 4).apply(variables, x, train=False)
    np.testing.assert_allclose(out_frozen['proj'], eval_out['proj'], rtol=1e-5, atol=1e-6)
    chex_equal = jax.tree_util.tree_map(np.array_equal, stats_frozen['batch_stats'],
                                        variables['batch_stats'])
    assert all(jax.tree_util.tree_leaves(chex_equal))
    assert not all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        np.array_equal, stats_global['batch_stats'], variables['batch_stats'])))
    with pytest.raises(ConfigError, match='bn_mode'):
        build_model(_with(c.model, bn_mode='sync'), 4)


def _with(model_cfg, **fields):
    new = model_cfg.copy_and_resolve_references()
    new.update(fields)
    return new
