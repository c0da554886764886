"""CSI: contrasting shifted instances (docs/methods.md §2).

Training views (§2.1): each image gets two views; each view is h-flipped
independently, then rotated by k = 0..K-1 (the shift comes *before* the
SimCLR augmentation), then every one of the 2K images gets its own SimCLR
augmentation. Embeddings are laid out image-major, (B, 2, K) -> rows
(b * 2 + v) * K + k, so with the batch sharded over devices all 2K views of
an image live on one device. The positive of (b, v, k) is (b, 1 - v, k);
every other row, including the other rotations of the same image, is a
negative.

Loss: L = NT-Xent(z, tau) + lambda * CE(shift_logits, k)  (lambda = 1).

Score (§2.5, the code's "CSI-ens"): features are averaged over T test-time
augmentations before the max-cosine; returned negated so that higher means
more anomalous.

Against the original's 4-GPU runs (common/train.py): BatchNorm takes one set of statistics
over the global batch (model.bn_groups = 1), as its apex SyncBN does, and keeps the unbiased
running variance (model.bn_running_var); weights start from PyTorch's default init
(model.init = 'torch'). An epoch is 5000 // 128 = 39 full steps for a CIFAR-10 class where
the original makes 40 (its last of 8 images; StepBudget): same schedule per epoch, 39/40 of
the updates.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from jaxad import losses
from jaxad.data import augment
from jaxad.errors import ConfigError
from jaxad.methods.base import Method
from jaxad.methods.common import CIFAR10_CLASSES, augment_kwargs


def positive_index(batch_size, num_shifts):
    """Row index of each row's positive in the (B, 2, K) layout."""
    b, v, k = jnp.meshgrid(jnp.arange(batch_size), jnp.arange(2), jnp.arange(num_shifts),
                           indexing='ij')
    return ((b * 2 + (1 - v)) * num_shifts + k).reshape(-1)


def shift_labels(batch_size, num_shifts):
    """Rotation label k of each row in the (B, 2, K) layout."""
    return jnp.tile(jnp.arange(num_shifts), batch_size * 2)


def train_views(key, images, num_shifts, aug_kwargs):
    """uint8 (B, H, W, C) -> float32 (B * 2 * K, H, W, C) in the (B, 2, K) layout.

    Keys are folded with the image's position in the global batch, so the
    views do not depend on how the batch is split over devices.
    """
    def one_image(image_key, image):
        x = augment.to_float(image)

        def one_view(view_key):
            flip_key, aug_key = jax.random.split(view_key)
            flipped = augment.random_hflip(flip_key, x)

            def one_shift(k):
                rotated = augment.rot90(flipped, k)
                return augment.simclr_augment(jax.random.fold_in(aug_key, k), rotated, **aug_kwargs)
            return jax.vmap(one_shift)(jnp.arange(num_shifts))

        return jax.vmap(one_view)(jax.random.split(image_key, 2))

    image_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
    views = jax.vmap(one_image)(image_keys, images)
    return views.reshape((-1,) + views.shape[3:])


def loss_and_aux(outputs, batch_size, num_shifts, temperature, shift_weight, eps=1e-8,
                 nt_xent_impl='dense', key_block=2048):
    """CSI loss from the model outputs on `train_views`."""
    loss_con = losses.nt_xent_by_name(nt_xent_impl, outputs['proj'],
                                      positive_index(batch_size, num_shifts), temperature,
                                      eps=eps, block_size=key_block)
    loss_cls = losses.softmax_cross_entropy(outputs['shift_logits'],
                                            shift_labels(batch_size, num_shifts))
    loss = loss_con + shift_weight * loss_cls
    return loss, {'loss': loss, 'loss_con': loss_con, 'loss_cls': loss_cls}


def tta_features(apply_fn, key, images, indices, num_shifts, num_samples, proj_dim, aug_kwargs):
    """Test-time-averaged projections and shift logits of a batch (§2.5).

    For t < T and each k: x_tk = simclr_aug(rot90(hflip(x), k)), with an
    independent random flip per (t, k) as in CSI's `_get_features`. Keys come
    from the image's dataset index, so a feature never depends on batching.
    Returns z_bar (B, K, D) and logits_bar (B, K, K), both float32.
    """
    x = jax.vmap(augment.to_float)(images)
    image_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)

    def views_for_sample(t):
        def one(image_key, image):
            def one_shift(k):
                flip_key, aug_key = jax.random.split(
                    jax.random.fold_in(jax.random.fold_in(image_key, t), k))
                v = augment.rot90(augment.random_hflip(flip_key, image), k)
                return augment.simclr_augment(aug_key, v, **aug_kwargs)
            return jax.vmap(one_shift)(jnp.arange(num_shifts))
        return jax.vmap(one)(image_keys, x)  # (B, K, H, W, C)

    def body(carry, t):
        views = views_for_sample(t)
        out = apply_fn(views.reshape((-1,) + views.shape[2:]))
        z = out['proj'].reshape(views.shape[:2] + (-1,))
        logits = out['shift_logits'].reshape(views.shape[:2] + (-1,))
        return (carry[0] + z, carry[1] + logits), None

    b = images.shape[0]
    z0 = jnp.zeros((b, num_shifts, proj_dim), jnp.float32)
    l0 = jnp.zeros((b, num_shifts, num_shifts), jnp.float32)
    (z_sum, l_sum), _ = jax.lax.scan(body, (z0, l0), jnp.arange(num_samples))
    return z_sum / num_samples, l_sum / num_samples


class ScoringState(NamedTuple):
    """What the CSI score needs from the training set (saved with the model)."""
    axis: jax.Array        # (K, M, D) unit-norm TTA-mean train projections
    weight_sim: jax.Array  # (K,) 1 / mean_m ||z_bar_k(x_m)||
    weight_shi: jax.Array  # (K,) 1 / mean_m logits_bar_k(x_m)[k]


def fit_scoring(z_bar, logits_bar):
    """Scoring state from train features z_bar (M, K, D), logits_bar (M, K, K)."""
    k = z_bar.shape[1]
    norms = jnp.linalg.norm(z_bar, axis=-1)  # (M, K)
    own_logit = logits_bar[:, jnp.arange(k), jnp.arange(k)]  # (M, K)
    return ScoringState(axis=jnp.swapaxes(losses.l2_normalize(z_bar), 0, 1),
                        weight_sim=1.0 / jnp.mean(norms, axis=0),
                        weight_shi=1.0 / jnp.mean(own_logit, axis=0))


def scores(state: ScoringState, z_bar, logits_bar, knn_k=1):
    """Anomaly scores (higher = more anomalous) for test features.

    csi:        -(1/K) sum_k [w_sim,k max_m <z_bar_k, a_k,m> + w_shi,k logits_bar_k[k]]
    csi_sim / csi_shift: the two terms of that sum alone (negated).
    knn_cosine: 1 - mean of the knn_k largest cosines to the 0-degree bank.
    """
    k = z_bar.shape[1]
    sims = jnp.einsum('bkd,kmd->bkm', z_bar, state.axis)  # <z_bar, unit axis>
    sim_term = jnp.max(sims, axis=-1) * state.weight_sim  # (B, K)
    shift_term = logits_bar[:, jnp.arange(k), jnp.arange(k)] * state.weight_shi
    cos0 = sims[:, 0] / jnp.maximum(jnp.linalg.norm(z_bar[:, 0], axis=-1, keepdims=True), 1e-12)
    top = jax.lax.top_k(cos0, min(knn_k, cos0.shape[-1]))[0]
    return {'csi': -jnp.mean(sim_term + shift_term, axis=1),
            'csi_sim': -jnp.mean(sim_term, axis=1),
            'csi_shift': -jnp.mean(shift_term, axis=1),
            'knn_cosine': 1.0 - jnp.mean(top, axis=-1)}


# One-class AUROC % from the paper (docs/methods.md §2.6): Table 1(a) per class and
# mean, Table 1(b) CIFAR-100 super-classes (mean only was recovered).
PAPER_ONE_CLASS = (
    dict(classes=CIFAR10_CLASSES, mean=94.3, source='CSI (NeurIPS 2020) Table 1(a)',
         auroc=(89.9, 99.1, 93.1, 86.4, 93.9, 93.2, 95.1, 98.7, 97.9, 95.5)),
    dict(classes=None, num_classes=20, mean=89.6, auroc=None,
         source='CSI (NeurIPS 2020) Table 1(b), CIFAR-100 super-classes'),
)


def paper_one_class(class_names):
    """{'per_class': {name: AUROC %} or {}, 'mean', 'source'} for a known data set, else None.

    Matched by class names (CIFAR-10 from any source) or, for CIFAR-100
    super-classes, by the 20 TFDS coarse-label names' first entry.
    """
    names = tuple(class_names)
    for entry in PAPER_ONE_CLASS:
        if entry['classes'] == names:
            return {'per_class': dict(zip(names, entry['auroc'])), 'mean': entry['mean'],
                    'source': entry['source']}
        if (entry['classes'] is None and len(names) == entry['num_classes']
                and names[0] == 'aquatic_mammals'):
            return {'per_class': {}, 'mean': entry['mean'], 'source': entry['source']}
    return None


class CSI(Method):
    """The CSI method object used by the shared trainer and evaluator."""
    config_section = 'csi'

    @classmethod
    def default_config(cls):
        c = ml_collections.ConfigDict()
        c.num_shifts = 4  # rotations 0, 90, 180, 270
        c.temperature = 0.5  # hard-coded in CSI's simclr_CSI.py
        c.shift_weight = 1.0  # lambda of L_cls-SI
        c.eps = 1e-8  # eps inside CSI's NT_xent
        return c

    @classmethod
    def validate(cls, config):
        for name in ('num_shifts', 'temperature'):
            if config.csi[name] <= 0:
                raise ConfigError(f'csi.{name} must be > 0, got {config.csi[name]}')
        if config.csi.num_shifts > 4:
            raise ConfigError(f'csi.num_shifts={config.csi.num_shifts}: rotations give at most '
                              '4 shifts')

    def __init__(self, config, budget=None):
        from jaxad.models.resnet import build_model
        super().__init__(config, budget)
        self.headline_score = 'csi'
        self.cfg = config.csi
        self.loss_cfg = config.loss
        self.num_shifts = config.csi.num_shifts
        self.model = build_model(config.model, num_shifts=self.num_shifts)
        self.init_from = config.model.get('init_from', '')  # converted encoder DIR or ''
        self.proj_dim = config.model.proj_dim
        self.train_aug = augment_kwargs(config.augment, config.augment.crop_scale)
        # Test-time crops use a fixed scale (CSI: --resize_factor 0.54 --resize_fix).
        s = config.eval.crop_scale
        self.eval_aug = augment_kwargs(config.augment, (s, s))
        self.num_samples = config.eval.num_samples
        self.knn_k = config.eval.knn_k

    def paper_one_class(self, class_names):
        return paper_one_class(class_names)

    def density_features(self, features):
        """eval.density sees the 0-degree TTA-mean projection, as CSI's own knn_cosine does."""
        return features['z_bar'][:, 0]

    def init_variables(self, key, image_shape):
        from jaxad.models.convert import init_variables
        return init_variables(self.model, key, image_shape, self.init_from)

    def loss(self, params, batch_stats, consts, batch, key):
        """(loss, (metrics, new_batch_stats)) for a uint8 batch, BN in train mode."""
        del consts  # CSI has none
        images = batch['image']
        views = train_views(key, images, self.num_shifts, self.train_aug)
        out, mutated = self.model.apply({'params': params, 'batch_stats': batch_stats}, views,
                                        train=True, mutable=['batch_stats'])
        loss, metrics = loss_and_aux(out, images.shape[0], self.num_shifts,
                                     self.cfg.temperature, self.cfg.shift_weight, self.cfg.eps,
                                     self.loss_cfg.nt_xent, self.loss_cfg.key_block)
        return loss, (metrics, mutated['batch_stats'])

    def features(self, variables, images, indices, key):
        """Test-time-averaged features of a batch, BN in eval mode."""
        apply_fn = lambda x: self.model.apply(variables, x, train=False)  # noqa: E731
        z_bar, logits_bar = tta_features(apply_fn, key, images, indices, self.num_shifts,
                                         self.num_samples, self.proj_dim, self.eval_aug)
        return {'z_bar': z_bar, 'logits_bar': logits_bar}

    def fit_scoring(self, train_features):
        return fit_scoring(train_features['z_bar'], train_features['logits_bar'])._asdict()

    def score(self, scoring, test_features):
        return scores(ScoringState(**scoring), test_features['z_bar'],
                      test_features['logits_bar'], knn_k=self.knn_k)
