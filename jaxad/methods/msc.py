"""MSC: Mean-Shifted Contrastive loss (Reiss & Hoshen, docs/methods.md §3).

An encoder that already gives good features (ImageNet ResNet-152 in the paper, or a
jaxad CSI run's encoder: `model.init_from`) is fine-tuned:

  phi(x)   = normalize(phi0(x))                   encoder features, unit norm
  m        = mean over the normal training images of phi(x) under the INITIAL encoder,
             computed once before step 1 (`fit_consts`, kept raw in the train state)
  c        = m, or m / ||m|| when msc.angular
  theta(x) = normalize(phi(x) - c)
  L_msc    = NT-Xent over u = [theta(x1); theta(x2)], tau = 0.25, no eps
  L_center = mean ||phi(x1) - c||^2 + mean ||phi(x2) - c||^2          (msc.angular only)

The angular case follows the official code (talreiss/Mean-Shifted-Anomaly-Detection,
main.py): `train_model` takes the mean of the initial features and, under --angular,
replaces it by `F.normalize(center)` before training; `run_epoch` then subtracts that one
normalised centre from both views, feeds the differences to `contrastive_loss` (which
normalises them) and adds their mean squared norms. So with msc.angular the unit centre
is in BOTH terms; without it the raw mean is used in the contrastive term.

BatchNorm stays in eval mode for the whole run (model.bn_mode='frozen': running
statistics, affine parameters trained); the optimiser is SGD without momentum and
`optim.freeze` fixes the stem, layer1 and layer2 of ResNet-152.

On a ViT (msc.encoder='vit', jaxad.models.vit): phi is the unit class token of the
ImageNet-normalised view; there is no BatchNorm, everything else is as above.

Score: kNN on phi (not theta) against the normal training images, k = 2, summed
squared L2 distances of unit vectors (= 2 x summed cosine distances), blockwise so the
test x bank matrix is never held whole (`density.knn_scores`).
"""
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from jaxad import density, losses
from jaxad.data import augment
from jaxad.errors import ConfigError
from jaxad.methods.base import Method
from jaxad.methods.common import CIFAR10_CLASSES
from jaxad.models.vit import vit_input, vit_variables, vit_weights

CIFAR10_PAPER = dict(
    mean=97.5, source='MSC v1 abstract (arXiv 2106.03844v1, ResNet-152 ImageNet weights, '
                      'with the angular loss); not comparable to runs without those weights')


def view_pair(key, image, size, crop_scale, aug_kwargs, blur_p):
    """Two MoCo-v2 views of one float image: resize to `size`, random resized crop,
    colour jitter, grey, Gaussian blur, horizontal flip (each view its own draws)."""
    x = augment.resize(image, size)

    def one(view_key):
        aug_key, blur_key, flip_key = jax.random.split(view_key, 3)
        v = augment.simclr_augment(aug_key, x, crop_scale=crop_scale, **aug_kwargs)
        v = augment.random_gaussian_blur(blur_key, v, blur_p)
        return augment.random_hflip(flip_key, v)
    return jax.vmap(one)(jax.random.split(key, 2))


def train_views(key, images, size, crop_scale, aug_kwargs, blur_p):
    """uint8 (B, H, W, C) -> float32 (2B, S, S, C) laid out [views 1; views 2]."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
    pairs = jax.vmap(lambda k, x: view_pair(k, augment.to_float(x), size, crop_scale,
                                            aug_kwargs, blur_p))(keys, images)
    return jnp.concatenate([pairs[:, 0], pairs[:, 1]], axis=0)


def positive_index(batch_size):
    """Row i's positive in [v1; v2]: i + B for the first half, i - B for the second."""
    i = jnp.arange(2 * batch_size)
    return jnp.where(i < batch_size, i + batch_size, i - batch_size)


def loss_and_aux(phi, centre, temperature, angular):
    """MSC loss of unit features phi (2B, D) laid out [v1; v2] and the fixed centre (D,).

    `centre` is the raw mean of the initial features (`fit_consts`). With `angular` it is
    normalised first and that unit centre is used in both the contrastive and the centre
    term, as in the official main.py (`if args.angular: center = F.normalize(center)` in
    `train_model`, then `out = model(img) - center` feeds both terms in `run_epoch`).
    """
    b = phi.shape[0] // 2
    c = losses.l2_normalize(centre) if angular else centre
    diff = phi - c
    theta = losses.l2_normalize(diff)
    loss_msc = losses.nt_xent(theta, positive_index(b), temperature, eps=0.0)
    metrics = {'loss_msc': loss_msc}
    loss = loss_msc
    if angular:
        sq = jnp.sum(jnp.square(diff), axis=-1)
        loss_center = jnp.mean(sq[:b]) + jnp.mean(sq[b:])
        loss = loss + loss_center
        metrics['loss_center'] = loss_center
    metrics['loss'] = loss
    return loss, metrics


def scores(bank, phi, k=2, test_block=1024, bank_block=4096):
    """{'knn': sum of the k smallest ||phi - b||^2 over the unit bank}, higher = anomalous."""
    return {'knn': density.knn_scores(phi, bank, k=min(k, bank.shape[0]), metric='sql2',
                                      reduce='sum', normalize=True, test_block=test_block,
                                      bank_block=bank_block)}


class MSC(Method):
    """The MSC method object for the shared trainer and evaluator."""
    config_section = 'msc'
    # Change the scores, not the model (jaxad.fingerprint: rescored, not refused).
    scoring_fields = ('msc.knn_k', 'msc.eval_center_crop')
    uses_consts = True  # the centre of the initial features (fit_consts)

    @classmethod
    def default_config(cls):
        c = ml_collections.ConfigDict()
        c.temperature = 0.25
        c.angular = False  # add the centre loss ||phi - c||^2 (v1 paper; code default off)
        c.knn_k = 2
        c.image_size = 0  # side the encoder sees (224 for ImageNet weights); 0 = data size
        c.crop_scale = (0.2, 1.0)  # MoCo-v2 views
        c.blur_p = 0.5  # Gaussian blur, sigma ~ U(0.1, 2) pixels at msc.image_size
        c.eval_center_crop = 0.875  # Resize(S/0.875) -> CenterCrop(S) (R152); 1.0: Resize(S)
        # 'resnet' (config.model, weights: model.init_from) or 'vit': phi is the class token
        # of a ViT read from msc.vit_weights (timm / DINO / DINOv2; jaxad.models.vit), the
        # views ImageNet-normalised; msc.vit_pos_offset as feature_knn.pos_offset (0.1: DINO)
        c.encoder = 'resnet'
        c.vit_weights = ''
        c.vit_pos_offset = 0.0
        return c

    @classmethod
    def validate(cls, config):
        cfg = config.msc
        if cfg.temperature <= 0:
            raise ConfigError(f'msc.temperature must be > 0, got {cfg.temperature}')
        if cfg.knn_k < 1:
            raise ConfigError(f'msc.knn_k must be >= 1, got {cfg.knn_k}')
        if cfg.get('encoder', 'resnet') not in ('resnet', 'vit'):
            raise ConfigError(f"msc.encoder must be 'resnet' or 'vit', got {cfg.encoder!r}")
        if cfg.get('encoder', 'resnet') == 'vit' and not cfg.vit_weights:
            raise ConfigError('msc.encoder=vit needs msc.vit_weights (a timm, DINO or DINOv2 '
                              'state dict): MSC shifts a pretrained feature space')

    def __init__(self, config, budget=None):
        from jaxad.models.resnet import build_model
        super().__init__(config, budget)
        self.headline_score = 'knn'
        self.cfg = config.msc
        if config.model.bn_mode != 'frozen':
            logging.warning('MSC with model.bn_mode=%r: the paper keeps BN in eval mode for '
                            'the whole run (frozen); issue #1 of the official code failed to '
                            'reproduce without it', config.model.bn_mode)
        self.size = self.cfg.image_size or config.data.image_size
        self.vit_params = None
        if self.cfg.get('encoder', 'resnet') == 'vit':
            spec, self.vit_params = vit_weights(self.cfg.vit_weights, 'msc.vit_weights')
            self.model = spec.module(pos_offset=self.cfg.vit_pos_offset)
        else:
            self.model = build_model(config.model, num_shifts=0, proj_dim=0)
        self.init_from = config.model.get('init_from', '')
        self.crop_scale = tuple(self.cfg.crop_scale)
        aug = config.augment
        self.aug_kwargs = dict(crop_ratio=tuple(aug.crop_ratio), brightness=aug.brightness,
                               contrast=aug.contrast, saturation=aug.saturation, hue=aug.hue,
                               jitter_p=aug.jitter_p, gray_p=aug.gray_p)
        self.blur_p = self.cfg.blur_p
        self.eval_crop = self.cfg.eval_center_crop
        self.blocks = (config.eval.density_test_block, config.eval.density_bank_block)

    def paper_one_class(self, class_names):
        if tuple(class_names) == CIFAR10_CLASSES:
            return {'per_class': {}, **CIFAR10_PAPER}
        return None

    def density_features(self, features):
        return features['phi']

    def init_variables(self, key, image_shape):
        if self.vit_params is not None:
            return vit_variables(self.model, self.vit_params, key,
                                 (1, self.size, self.size, image_shape[-1]))
        from jaxad.models.convert import init_variables
        return init_variables(self.model, key, (self.size, self.size, image_shape[-1]),
                              self.init_from)

    def _phi(self, variables, x, train):
        if self.vit_params is not None:  # no BatchNorm: the class token, batch_stats as they are
            out = self.model.apply({'params': variables['params']}, vit_input(x))
            phi = losses.l2_normalize(out['cls'])
            return (phi, variables['batch_stats']) if train else phi
        if train:
            out, mutated = self.model.apply(variables, x, train=True, mutable=['batch_stats'])
            return losses.l2_normalize(out['features']), mutated['batch_stats']
        return losses.l2_normalize(self.model.apply(variables, x, train=False)['features'])

    def loss(self, params, batch_stats, consts, batch, key):
        views = train_views(key, batch['image'], self.size, self.crop_scale, self.aug_kwargs,
                            self.blur_p)
        phi, new_stats = self._phi({'params': params, 'batch_stats': batch_stats}, views, True)
        loss, metrics = loss_and_aux(phi, consts['centre'], self.cfg.temperature,
                                     self.cfg.angular)
        return loss, (metrics, new_stats)

    def features(self, variables, images, indices, key):
        """phi of the deterministic test view (resize, centre crop), BN in eval mode."""
        del indices, key
        x = jax.vmap(lambda im: augment.center_crop_resized(
            augment.to_float(im), self.size, self.eval_crop))(images)
        return {'phi': self._phi(variables, x, False)}

    def fit_consts(self, train_features):
        """The centre of the initial model's normal features, stored raw (not re-normalised):
        `loss_and_aux` normalises it when msc.angular, which equals the official code's
        normalising it once before training since it never changes."""
        return {'centre': jnp.mean(train_features['phi'], axis=0)}

    def fit_scoring(self, train_features):
        return {'bank': train_features['phi']}

    def score(self, scoring, test_features):
        return scores(scoring['bank'], test_features['phi'], self.cfg.knn_k, *self.blocks)
