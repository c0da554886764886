"""OECL and self-OECL: outlier exposure by the l2 norm of the projection (docs/methods.md §6).

Le-Gia & Ahn, "Understanding normalization in contrastive representation learning and
OOD detection" (arXiv 2312.15288); official code GiaTaiLe/realOECL.

Views (`train_views`): each image gets two SimCLR views (random h-flip, colour jitter,
grey, resized crop; no blur), each optionally rotated by k x 90 degrees AFTER the
augmentation (realOECL rotates the augmented tensors). Rows are laid out view-major,
(view, rotation, image) -> v * R * B + r * B + b, so row i's positive is row
(i + N/2) mod N, as in the code's chunk-2 NT-Xent.

  OECL       ID rows  = [v1(x); v2(x)]                                 (2B)
             OE rows  = [v1(o); v2(o)], o = auxiliary outliers          (2B)
  self-OECL  ID rows  = [rot0 v1(x); rot90 v1(x); rot0 v2(x); rot90 v2(x)]          (4B)
             OE rows  = [rot180 v1(o); rot270 v1(o); rot180 v2(o); rot270 v2(o)]    (4B)
             o = the normal images again, from a second, independently shuffled stream;
             every OE image gets both rotations (realOECL engine/oecl_self/train.py).

ID and OE rows go through the network in ONE forward pass (one BatchNorm batch), as
realOECL's `model(torch.cat([id1, id2, oe1, oe2]))`. With z the un-normalised
projection (Linear -> BatchNorm1d -> ReLU -> Linear(128)):

  L = NT-Xent(normalize(z_id), tau = 0.5, CSI's eps form)  +  alpha(step) * mean_oe ||z_oe||_2

alpha(step) = 0 while step < warm-up steps (realOECL: `epoch < 50`), then oecl.alpha. OE
rows never enter the contrastive term; nothing pushes ||z_id|| up explicitly (it grows
under NT-Xent: the paper's l2-norm observation).

Scores (§6.3), negated so that higher = more anomalous. For a test image x, with
z_0 = z(x) the clean view and z_1..z_T the projections of T SimCLR views (the training
augmentation, eval.num_samples = T; BN in eval mode; nothing normalised):
  norm_mean      = -|| mean_{t=0..T} z_t ||         (auroc_l2_of_EX, the headline)
  mean_sq_norm   = -mean_{t=0..T} ||z_t||^2         (auroc_of_E_square_of_X_2)
  clean_sq_norm  = -||z_0||^2                       (auroc_l2_of_val)
No training data enters the score; `fit_scoring` keeps only the bank size.

The step enters the loss as `batch['step']` (the method sets `needs_step`); the run's
`StepBudget` (given at construction) turns oecl.warmup_epochs into steps.
"""
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from jaxad import losses
from jaxad.data import augment
from jaxad.errors import ConfigError, TrainingError
from jaxad.methods.base import Method
from jaxad.methods.common import (CIFAR10_CLASSES, augment_kwargs, augment_view,
                                  require_budget, train_views)

ID_ROTATIONS = {False: (0,), True: (0, 1)}  # OECL | self-OECL, in units of 90 degrees
OE_ROTATIONS = {False: (0,), True: (2, 3)}

# One-vs-rest CIFAR-10 mean AUROC % from the realOECL README (per class not published).
PAPER_CIFAR10 = {
    False: dict(mean=97.8, source='realOECL README: OECL, Tiny80M outlier exposure '
                                  '(comparable only with a Tiny80M-like oe source)'),
    True: dict(mean=94.7, source='realOECL README: self-OECL'),
}


def positive_index(num_rows):
    """Row i's positive in the view-major layout: (i + N/2) mod N."""
    return jnp.roll(jnp.arange(num_rows), num_rows // 2)


def safe_norm(z):
    """||z||_2 over the last axis; gradient 0 (not NaN) at z = 0, as torch.norm."""
    sq = jnp.sum(jnp.square(z), axis=-1)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def alpha_at(step, warmup_steps, alpha):
    """0 while step < warmup_steps, then alpha (realOECL: `_alpha = 0. if epoch < 50`)."""
    return jnp.where(jnp.asarray(step) < warmup_steps, 0.0, alpha).astype(jnp.float32)


def loss_and_aux(z_id, z_oe, alpha, temperature, eps=1e-8, nt_xent_impl='dense',
                 key_block=2048):
    """NT-Xent on the ID rows (view-major pairs) + alpha * mean ||z_oe||, and metrics."""
    loss_con = losses.nt_xent_by_name(nt_xent_impl, z_id, positive_index(z_id.shape[0]),
                                      temperature, eps=eps, block_size=key_block)
    loss_oe = jnp.mean(safe_norm(z_oe))
    loss = loss_con + alpha * loss_oe
    return loss, {'loss': loss, 'loss_con': loss_con, 'loss_oe': loss_oe, 'alpha': alpha,
                  'id_norm': jnp.mean(safe_norm(z_id))}


def tta_features(apply_fn, key, images, indices, num_samples, aug_kwargs, flip_p=0.5):
    """Clean and test-time-augmented projection statistics of a batch (§6.3).

    View t (1..T) of the image with dataset index i is `augment_view` with key
    fold_in(fold_in(key, i), t), so a feature never depends on batching. Returns
    z_clean (B, D), z_mean (B, D) = mean over the T + 1 views, sq_norm_mean (B,) = mean
    over the T + 1 views of ||z||^2; all float32, un-normalised.
    """
    x = jax.vmap(augment.to_float)(images)
    z_clean = apply_fn(x).astype(jnp.float32)
    image_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)

    def body(carry, t):
        views = jax.vmap(lambda k, im: augment_view(jax.random.fold_in(k, t), im, aug_kwargs,
                                                    flip_p))(image_keys, x)
        z = apply_fn(views).astype(jnp.float32)
        return (carry[0] + z, carry[1] + jnp.sum(jnp.square(z), axis=-1)), None

    start = (jnp.zeros_like(z_clean), jnp.zeros(z_clean.shape[:1], jnp.float32))
    (z_sum, sq_sum), _ = jax.lax.scan(body, start, jnp.arange(1, num_samples + 1))
    clean_sq = jnp.sum(jnp.square(z_clean), axis=-1)
    n = num_samples + 1
    return {'z_clean': z_clean, 'z_mean': (z_clean + z_sum) / n,
            'sq_norm_mean': (clean_sq + sq_sum) / n}


def scores(features):
    """{norm_mean, mean_sq_norm, clean_sq_norm}: negated normality, higher = anomalous."""
    return {'norm_mean': -jnp.linalg.norm(features['z_mean'], axis=-1),
            'mean_sq_norm': -features['sq_norm_mean'],
            'clean_sq_norm': -jnp.sum(jnp.square(features['z_clean']), axis=-1)}


class OECL(Method):
    """OECL (outliers from `oe.source`) for the shared trainer; `SelfOECL` is self-OECL."""
    config_section = 'oecl'
    self_supervised = False  # SelfOECL: True
    needs_step = True  # the trainer sets batch['step'] = state.step
    needs_bank = False  # density-free scores: the evaluator skips the train-bank pass

    @classmethod
    def default_config(cls):
        c = ml_collections.ConfigDict()
        c.temperature = 0.5
        c.alpha = 1.0  # weight of mean ||z|| of outlier views after the warm-up
        c.warmup_epochs = 50  # alpha = 0 before this (pure SimCLR)
        c.warmup_steps = 0  # > 0 overrides warmup_epochs
        c.oe_grayscale = False  # grey the OE images first (colour OE for grey data)
        c.eps = 1e-8  # eps inside NT-Xent (CSI's form, as NTXentOE)
        return c

    @classmethod
    def validate(cls, config):
        cfg = config.oecl
        name = 'self_oecl' if cls.self_supervised else 'oecl'
        if cfg.temperature <= 0:
            raise ConfigError(f'oecl.temperature must be > 0, got {cfg.temperature}')
        if cfg.alpha < 0:
            raise ConfigError(f'oecl.alpha must be >= 0, got {cfg.alpha}')
        if cfg.warmup_epochs < 0 or cfg.get('warmup_steps', 0) < 0:
            raise ConfigError('oecl.warmup_epochs and oecl.warmup_steps must be >= 0, got '
                              f'{cfg.warmup_epochs}, {cfg.get("warmup_steps", 0)}')
        if config.model.proj_dim <= 0:
            raise ConfigError(f'{name} scores the projection norm: model.proj_dim must be > 0')
        if cfg.get('oe_grayscale', False) and config.data.channels != 3:
            raise ConfigError('oecl.oe_grayscale needs data.channels=3 (RGB images)')

    def __init__(self, config, budget=None):
        from jaxad.models.resnet import build_model
        super().__init__(config, budget)
        self.headline_score = 'norm_mean'
        self.inputs = ('outlier',)
        self.cfg = config.oecl
        self.loss_cfg = config.loss
        self_supervised = self.self_supervised
        source = config.oe.source
        if self_supervised and source and source != 'normal':
            logging.warning('self_oecl with oe.source=%r: the paper rotates the normal '
                            'images themselves (oe.source=normal)', source)
        if not self_supervised and source == 'normal':
            logging.warning('oecl with oe.source=normal pushes the norms of the normal '
                            'images down; self-OECL (method=self_oecl) rotates them first')
        self.model = build_model(config.model, num_shifts=0)
        self.init_from = config.model.get('init_from', '')
        self.id_rotations = ID_ROTATIONS[self_supervised]
        self.oe_rotations = OE_ROTATIONS[self_supervised]
        # realOECL's test-time views use the training transform (its 'simclr' loader).
        self.aug = augment_kwargs(config.augment, config.augment.crop_scale)
        self.num_samples = config.eval.num_samples
        self.oe_grayscale = bool(self.cfg.get('oe_grayscale', False))
        # The warm-up in steps: oecl.warmup_steps > 0 wins; else oecl.warmup_epochs x the
        # budget's steps per epoch (unknown without a budget, unless it is 0 epochs).
        steps = int(self.cfg.get('warmup_steps', 0))
        if steps > 0:
            self.warmup_steps = steps
        elif self.cfg.warmup_epochs == 0:
            self.warmup_steps = 0
        elif budget is not None:
            self.warmup_steps = int(round(self.cfg.warmup_epochs * budget.steps_per_epoch))
        else:
            self.warmup_steps = None

    def paper_one_class(self, class_names):
        if tuple(class_names) == CIFAR10_CLASSES:
            return {'per_class': {}, **PAPER_CIFAR10[self.self_supervised]}
        return None

    def init_variables(self, key, image_shape):
        from jaxad.models.convert import init_variables
        return init_variables(self.model, key, image_shape, self.init_from)

    def density_features(self, features):
        """The clean view's (un-normalised) projection."""
        return features['z_clean']

    def alpha(self, step):
        if self.warmup_steps is None:
            require_budget(self, 'the warm-up length in steps (oecl.warmup_epochs x steps '
                                 'per epoch; or set oecl.warmup_steps > 0)')
        return alpha_at(step, self.warmup_steps, self.cfg.alpha)

    def loss(self, params, batch_stats, consts, batch, key):
        """(loss, (metrics, new_batch_stats)); batch: image, outlier (uint8), step."""
        del consts  # none
        if 'step' not in batch:
            raise TrainingError('OECL needs batch["step"] for its alpha warm-up '
                                '(the trainer adds it when method.needs_step)')
        id_key, oe_key = jax.random.split(key)
        id_views = train_views(id_key, batch['image'], self.id_rotations, self.aug)
        oe_views = train_views(oe_key, batch['outlier'], self.oe_rotations, self.aug,
                               grey=self.oe_grayscale)
        views = jnp.concatenate([id_views, oe_views], axis=0)  # one BN batch, as realOECL
        out, mutated = self.model.apply({'params': params, 'batch_stats': batch_stats}, views,
                                        train=True, mutable=['batch_stats'])
        z = out['proj']
        n = id_views.shape[0]
        loss, metrics = loss_and_aux(z[:n], z[n:], self.alpha(batch['step']),
                                     self.cfg.temperature, self.cfg.eps,
                                     self.loss_cfg.nt_xent, self.loss_cfg.key_block)
        return loss, (metrics, mutated['batch_stats'])

    def features(self, variables, images, indices, key):
        """Clean + test-time-augmented projection statistics, BN in eval mode."""
        apply_fn = lambda x: self.model.apply(variables, x, train=False)['proj']  # noqa: E731
        return tta_features(apply_fn, key, images, indices, self.num_samples, self.aug)

    def fit_scoring(self, train_features):
        # Density-free: keep only the bank size (a non-empty tree for the checkpoint).
        return {'num_bank': jnp.asarray(train_features['z_clean'].shape[0], jnp.int32)}

    def score(self, scoring, test_features):
        del scoring
        return scores(test_features)


class SelfOECL(OECL):
    """self-OECL: the normal images, rotated by 180/270 degrees, are the outliers."""
    self_supervised = True
