"""Feature kNN: a fixed encoder, no training; the scoring state is the bank of the normal
training images' features (docs/methods.md §8).

  f(x)     = the encoder's feature of image x:
             'pixels': the raw uint8 values, flattened (as floats);
             'resnet': the pooled feature of a jaxad ResNet (`config.model`, its weights from
             `model.init_from`: a converted torchvision checkpoint or a jaxad run), BN in
             eval mode, the image resized to feature_knn.image_size (0: as it is);
             'vit': the class token of a ViT (`jaxad.models.vit`: timm, DINO or DINOv2
             weights from feature_knn.weights), the image resized and ImageNet-normalised
  score(x) = mean over the k nearest bank features b of d(f(x), b),
             d = ||f(x) - b|| ('l2') or 1 - cos(f(x), b) ('cosine')   (`density.knn_scores`)

kNN on a fixed encoder's features is the one-class baseline that pretrained features make
strong (DN2, Bergman et al. 2020, arXiv 2002.10445: kNN on ImageNet ResNet features), and
with the 'pixels' encoder, k = 1 and 'l2' it is the raw-pixel 1-NN baseline every result
carries (`jaxad.baseline`), computed here in float32 on the device.

The run takes no step (`trains = False`): the trainer builds the initial state, fits the
bank and evaluates. The shared density evaluators (`eval.density`) read the same features.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections

from jaxad import density
from jaxad.data import augment
from jaxad.errors import ConfigError, TrainingError
from jaxad.methods.base import Method
from jaxad.models.vit import VIT_ARCHS, ViTSpec, vit_input, vit_variables, vit_weights

ENCODERS = ('pixels', 'resnet', 'vit')
METRICS = ('l2', 'cosine')


class FeatureKNN(Method):
    """kNN on a fixed encoder's features (no training)."""
    config_section = 'feature_knn'
    # The bank and the scores depend on them, the (untrained) model does not.
    scoring_fields = ('feature_knn.k', 'feature_knn.metric')
    trains = False

    @classmethod
    def default_config(cls):
        c = ml_collections.ConfigDict()
        c.encoder = 'resnet'  # 'pixels' | 'resnet' (config.model, weights: model.init_from)
        c.k = 1
        c.metric = 'l2'  # 'l2' | 'cosine'
        c.image_size = 0  # side the encoder sees (224 for ImageNet weights); 0 = data size
        # encoder 'vit': a timm / DINO / DINOv2 state dict (.pth, .safetensors, .npz; its
        # shapes give the architecture), or '' for random weights of feature_knn.vit
        c.weights = ''
        c.vit = 'vit_small'  # random weights only: vit_small | vit_base | vit_large
        c.patch = 16  # random weights only
        c.pos_offset = 0.0  # DINO / DINOv2: 0.1 (their position-interpolation offset)
        # Anomaly maps: each patch feature's distance to the nearest normal patch feature
        # (ViT patch tokens; ResNet: the output of stage `resnet_stage`), the image score the
        # map's maximum (`patch_max`, then the headline), PatchCore-style.
        c.patch_maps = False
        c.resnet_stage = 3
        # Fraction of the normal patch features kept in the memory bank, chosen by greedy
        # k-center selection (`greedy_coreset`); 1.0 keeps them all.
        c.coreset = 1.0
        return c

    @classmethod
    def validate(cls, config):
        cfg = config.feature_knn
        if cfg.encoder not in ENCODERS:
            raise ConfigError(f'feature_knn.encoder must be one of {", ".join(ENCODERS)}, '
                              f'got {cfg.encoder!r}')
        if cfg.metric not in METRICS:
            raise ConfigError(f'feature_knn.metric must be one of {", ".join(METRICS)}, '
                              f'got {cfg.metric!r}')
        if cfg.k < 1:
            raise ConfigError(f'feature_knn.k must be >= 1, got {cfg.k}')
        if cfg.image_size < 0:
            raise ConfigError(f'feature_knn.image_size must be >= 0, got {cfg.image_size}')
        if not 0.0 < cfg.coreset <= 1.0:
            raise ConfigError(f'feature_knn.coreset must be in (0, 1], got {cfg.coreset}')
        if cfg.patch_maps and cfg.encoder == 'pixels':
            raise ConfigError('feature_knn.patch_maps needs a spatial encoder (resnet or vit), '
                              'not pixels')
        if not 1 <= cfg.resnet_stage <= 4:
            raise ConfigError(f'feature_knn.resnet_stage must be 1..4, got {cfg.resnet_stage}')
        if cfg.encoder == 'vit' and not cfg.weights and cfg.vit not in VIT_ARCHS:
            raise ConfigError(f'feature_knn.vit must be one of {", ".join(VIT_ARCHS)}, '
                              f'got {cfg.vit!r}')

    def __init__(self, config, budget=None):
        from jaxad.models.resnet import build_model
        super().__init__(config, budget)
        self.cfg = config.feature_knn
        self.headline_score = 'patch_max' if self.cfg.patch_maps else 'knn'
        # 'pixels' builds the ResNet too, unused: every method has a model; it has no
        # variables here (init_variables), so nothing of it is traced or saved.
        self.size = self.cfg.image_size or config.data.image_size
        self.weights = None
        if self.cfg.encoder == 'vit':
            if self.cfg.weights:
                spec, self.weights = vit_weights(self.cfg.weights, 'feature_knn.weights')
            else:
                dim, depth, _ = VIT_ARCHS[self.cfg.vit]
                spec = ViTSpec(dim, depth, self.cfg.patch, self.size // self.cfg.patch, 0, False)
            self.model = spec.module(pos_offset=self.cfg.pos_offset)
        else:
            self.model = build_model(config.model, num_shifts=0, proj_dim=0)
        self.init_from = config.model.get('init_from', '')
        self.blocks = (config.eval.density_test_block, config.eval.density_bank_block)

    def density_features(self, features):
        return features['feat']

    def init_variables(self, key, image_shape):
        if self.cfg.encoder == 'pixels':
            # No weights. One unused scalar, so that a table's stack of pixel encoders has
            # a model axis (jaxad.stacking reads the number of models from the variables).
            return {'params': {}, 'batch_stats': {'model_axis': jnp.zeros((), jnp.float32)}}
        if self.cfg.encoder == 'vit':
            return vit_variables(self.model, self.weights, key,
                                 (1, self.size, self.size, image_shape[-1]))
        from jaxad.models.convert import init_variables
        return init_variables(self.model, key, (self.size, self.size, image_shape[-1]),
                              self.init_from)

    def loss(self, params, batch_stats, consts, batch, key):
        raise TrainingError('feature_knn trains nothing (its runs take no step)')

    def features(self, variables, images, indices, key):
        del indices, key
        if self.cfg.encoder == 'pixels':
            return {'feat': images.reshape(images.shape[0], -1).astype(jnp.float32)}
        x = augment.to_float(images)
        if self.size != images.shape[1]:
            x = jax.vmap(lambda im: augment.resize(im, self.size))(x)
        if self.cfg.encoder == 'vit':  # the class token of the ImageNet-normalised image
            out = self.model.apply({'params': variables['params']}, vit_input(x))
            feats = {'feat': out['cls']}
            if self.cfg.patch_maps:
                feats['patches'] = out['patches']
            return feats
        if not self.cfg.patch_maps:
            return {'feat': self.model.apply(variables, x, train=False)['features']}
        stages = self._stages().apply(
            {'params': variables['params']['encoder'],
             'batch_stats': variables['batch_stats']['encoder']}, x, train=False)
        return {'feat': stages['pooled'], 'patches': stages[f'layer{self.cfg.resnet_stage}']}

    def _stages(self):
        """The model's encoder returning its stage outputs (the same variables)."""
        from jaxad.models.resnet import ResNet
        fields = ('depth', 'stem', 'width', 'dtype', 'bn_mode', 'bn_groups', 'width_per_group',
                  'input_norm', 'conv_impl', 'param_init', 'bn_running_var')
        return ResNet(**{f: getattr(self.model, f) for f in fields}, return_stages=True)

    def fit_scoring(self, train_features):
        scoring = {'bank': train_features['feat']}
        if self.cfg.patch_maps:
            patches = train_features['patches']
            patches = patches.reshape(-1, patches.shape[-1])
            keep = max(1, math.ceil(self.cfg.coreset * patches.shape[0]))
            if keep < patches.shape[0]:
                patches = patches[greedy_coreset(patches, keep)]
            scoring['patch_bank'] = patches
        return scoring

    def _knn(self, test, bank, k, metric):
        return density.knn_scores(test, bank, k=min(k, bank.shape[0]), metric=metric,
                                  reduce='mean', test_block=self.blocks[0],
                                  bank_block=self.blocks[1])

    def score(self, scoring, test_features):
        scores = {'knn': self._knn(test_features['feat'], scoring['bank'], self.cfg.k,
                                   self.cfg.metric)}
        if self.cfg.patch_maps:
            patches = test_features['patches']
            b, h, w, d = patches.shape
            amap = self._knn(patches.reshape(-1, d), scoring['patch_bank'], 1, 'l2')
            amap = amap.reshape(b, h, w)
            scores.update(patch_max=jnp.max(amap.reshape(b, -1), axis=1), map=amap)
        return scores


def greedy_coreset(x, m):
    """Row indices of `m` rows of `x` (n, d) chosen by greedy k-center selection, as
    PatchCore subsamples its memory bank: row 0 first, then each time the row farthest (L2)
    from every row chosen so far. Exact squared distances in float32 via
    |a|^2 + |b|^2 - 2 a.b, clipped at 0 (PatchCore also projects to fewer dimensions first
    for speed; not done here)."""
    x = jnp.asarray(x, jnp.float32)
    sq = jnp.sum(x * x, axis=1)

    def dist_to(i):
        return jnp.maximum(sq + sq[i] - 2.0 * (x @ x[i]), 0.0)

    def pick(j, carry):
        chosen, nearest = carry
        i = jnp.argmax(nearest).astype(jnp.int32)
        return chosen.at[j].set(i), jnp.minimum(nearest, dist_to(i))
    chosen = jnp.zeros((m,), jnp.int32)
    chosen, _ = jax.lax.fori_loop(1, m, pick, (chosen, dist_to(0)))
    return chosen
