"""A toy method in one file: the worked example of README.md's "Adding a method".

'toy' trains a small ResNet (jaxad.models.resnet, sized by `config.model`) with a SimCLR-style
NT-Xent between two views of each image (a random resized crop and a random flip), and scores
an image by the squared distance of its encoder features to the mean feature of the normal
training images. It is not a good detector; it is the smallest method that goes through every
part of the contract (jaxad/methods/base.py):

  required   init_variables, loss, features, fit_scoring, score; and in __init__: `model`,
             `headline_score`
  config     config_section, default_config (the defaults of config.toy), validate
  optional   everything else keeps Method's default (no step counter, constants, labels,
             outliers, frozen params or density features; `needs_bank` True: fit_scoring sees
             the train-bank features)

A real method lives in jaxad/methods/<name>.py and is registered with one line in
jaxad/methods/__init__.py (`'toy': Toy,` in REGISTRY). tests/test_conformance.py registers this
one for the length of a test (`monkeypatch.setitem(REGISTRY, 'toy', Toy)`) and runs the same
checks every registered method passes: train, checkpoint, predict, export.
"""
import jax
import jax.numpy as jnp
import ml_collections

from jaxad import losses
from jaxad.data import augment
from jaxad.errors import ConfigError
from jaxad.methods.base import Method


def two_views(key, images, crop_scale):
    """uint8 (B, H, W, C) -> float32 (2B, H, W, C), rows (b * 2 + v): view v of image b."""
    def one(image_key, image):
        x = augment.to_float(image)

        def view(k):
            crop_key, flip_key = jax.random.split(k)
            x_v = augment.random_resized_crop(crop_key, x, scale=crop_scale)
            return augment.random_hflip(flip_key, x_v)
        return jax.vmap(view)(jax.random.split(image_key, 2))

    # A key per image position, so the views do not depend on how the batch is sharded.
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
    views = jax.vmap(one)(keys, images)  # (B, 2, H, W, C)
    return views.reshape((-1,) + views.shape[2:])


class Toy(Method):
    """Two-view NT-Xent training; score = squared distance to the mean normal feature."""
    config_section = 'toy'  # the knobs live in config.toy
    scoring_fields = ()  # nothing in config.toy changes the scores without retraining

    @classmethod
    def default_config(cls):
        c = ml_collections.ConfigDict()
        c.temperature = 0.5
        c.crop_scale = (0.5, 1.0)
        return c

    @classmethod
    def validate(cls, config):
        if config.toy.temperature <= 0:
            raise ConfigError(f'toy.temperature must be > 0, got {config.toy.temperature}')
        low, high = config.toy.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f'toy.crop_scale must satisfy 0 < low <= high <= 1, got '
                              f'{tuple(config.toy.crop_scale)}')
        if config.model.proj_dim <= 0:
            raise ConfigError('toy trains on the projection head: model.proj_dim must be > 0')

    def __init__(self, config, budget=None):
        from jaxad.models.resnet import build_model
        super().__init__(config, budget)  # runs validate(config)
        self.model = build_model(config.model, num_shifts=0)  # encoder + projection head
        self.headline_score = 'toy'
        self.temperature = float(config.toy.temperature)
        self.crop_scale = tuple(config.toy.crop_scale)
        self.init_from = config.model.init_from

    def init_variables(self, key, image_shape):
        from jaxad.models.convert import init_variables
        return init_variables(self.model, key, image_shape, self.init_from)

    def loss(self, params, batch_stats, consts, batch, key):
        del consts  # uses_consts is False
        images = batch['image']
        views = two_views(key, images, self.crop_scale)
        out, mutated = self.model.apply({'params': params, 'batch_stats': batch_stats}, views,
                                        train=True, mutable=['batch_stats'])
        rows = jnp.arange(views.shape[0])
        loss = losses.nt_xent(out['proj'], rows ^ 1, self.temperature)  # (b, 0) <-> (b, 1)
        return loss, ({'loss': loss}, mutated['batch_stats'])

    def features(self, variables, images, indices, key):
        del indices, key  # no test-time augmentation: a feature depends on its image alone
        x = jax.vmap(augment.to_float)(images)
        out = self.model.apply(variables, x, train=False)
        return {'feature': out['features'].astype(jnp.float32)}

    def fit_scoring(self, train_features):
        return {'mean': jnp.mean(train_features['feature'], axis=0)}

    def score(self, scoring, test_features):
        d = jnp.sum(jnp.square(test_features['feature'] - scoring['mean']), axis=-1)
        return {'toy': d}
