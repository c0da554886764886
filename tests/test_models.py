"""ResNet/CSINet shapes, dtypes and stems."""
import jax
import jax.numpy as jnp
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


def test_build_model_errors():
    c = jc.csi_base()
    c.model.name = 'resnet7'
    with pytest.raises(ConfigError, match='resnet7'):
        build_model(c.model, 4)
    c.model.name = 'resnet18'
    c.model.dtype = 'float8'
    with pytest.raises(ConfigError, match='float8'):
        build_model(c.model, 4)
