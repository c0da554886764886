"""MCL: Masked Contrastive Learning + Self-Ensemble Inference (docs/methods.md §4).

Cho, Seol, Lee, IJCAI 2021; official code HyunsooCho77/MCL @0559afa (`utils/loss.py`,
`utils/data_loader.py`, `evaluate/mcl_validate.py`).

Training views (§4.1): every image b of the batch is rotated by r = 0..K-1; each rotated
image gets two views, each with its own flip draw (p = .5, in the image's own frame: the
code flips the *rotated* image, h-flip for r = 0, 2 and v-flip for r = 1, 3, which is
rot90(hflip(x), r)) followed by the SimCLR augmentation. No mean/std normalisation
(model.input_norm='none'). Rows are laid out (image, rotation, view), row (b*K + r)*2 + v,
so the two views of rotated image k = b*K + r are the adjacent rows 2k, 2k+1 (the code's
interleaved pairs) and all 2K rows of an image are contiguous.

Joint label of rotated image k: y_k = class_b + C * r (C = mcl.num_classes; class_b is the
image's position among the normal classes, 0 in a one-class run).

Logits (§1.1, §4.3): u = l2-normalised projections (2n rows, n = B*K), tau, alpha, beta:
  l_ij = m_ij * max(<u_i, u_j>, clamp) - 1e5 [i == j],   loss_i = CE(l_i, target_i).
Image-level multipliers with Delta_kl = y_l - y_k (nearest-upsampled x2 to the rows):
  k == l (own image: self and partner)            1/tau
  Delta mod C != 0 (different class)              1/tau
  Delta != 0, Delta mod C == 0 (other rotation)   beta
  Delta == 0, k != l (same joint label)           alpha
(mod with the divisor's sign, as python/torch `%` and jnp.mod.)
  L_CCM = mean_i CE(l_i, i xor 1)  (the other view of the same rotated image).
  L_SPA: the same multipliers except the own 2x2 block, which is 0; each rotated image k
  draws one partner p(k) uniformly among the OTHER rotated images with y == y_k (one draw
  shared by its two views, the step key's, as the code's torch.randint per row); row 2k+v
  targets row 2p(k)+v, whose multiplier is set to 1/tau.
  L = L_CCM + spa_weight * L_SPA.
The code raises (and skips L_SPA for the whole batch) when some rotated image has fewer
than two same-label candidates (a squeeze() quirk); here a rotated image with no candidate
is left out of the L_SPA mean instead, and one with a single candidate uses it.

Self-Ensemble Inference (§4.4), deterministic (no test-time augmentation, as the code's
ToTensor-only loaders): view i of an image is rot90(x, r_i) or rot90(hflip(x), r_i),
ordered (r, flip) with the unflipped view first (sei_views = 2K), or the K rotations alone
(sei_views = K). Features: u (N, V, D), unit norm.
Fit: one Gaussian per (class c, rotation r) on the unit projections of ALL views with
rotation r (flipped and unflipped, the code's ConcatDataset), of the first
ceil(fit_fraction * M) bank images in order (the code's "first len/5 batches, to save
time"): mu, Sigma = np.cov (ddof = 1) + cov_ridge * I. (Read literally, the code's
len//5 + 1 batches of the unshuffled ConcatDataset [unflipped copies; flipped copies] hold
only unflipped copies, of the first ~40% of the images; we fit both copies of the first
fit_fraction, which is what the ConcatDataset is there for.) A (c, r) with fewer than 2 rows is
absent (distance +inf). Sigma^-1/2 is stored as W = diag((max(lambda, 0) + ridge)^-1/2) V^T
from eigh(cov) (V, lambda), so d = ||W (x - mu)|| = sqrt((x - mu)^T (cov + ridge I)^-1 (x - mu))
is the code's distance, computed in float32 without forming the (ill-conditioned) inverse.
Score, higher = more anomalous (the code's s(x) is the negative):
  d_i(c) = Mahalanobis(u_i; mu_{c, r_i}, Sigma_{c, r_i})
  wa   : min_c n / sum_i 1/d_i(c)  (harmonic mean; the code's sum_i w_i d_i / sum_i w_i
         with w_i = 1/d_i)
  mean : min_c sum_i d_i(c)        (the code's 'mean' sums the views at the argmin class)
  min  : min_{i, c} d_i(c)
'sei' is mcl.combine's; the other two are reported as 'sei_<name>'.
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxad import losses
from jaxad.data import augment
from jaxad.errors import ConfigError
from jaxad.methods.base import Method
from jaxad.methods.common import augment_kwargs

_HIGHEST = jax.lax.Precision.HIGHEST
COMBINES = ('wa', 'mean', 'min')
DIAGONAL_PENALTY = 1e5  # the code's `- eye * 1e5`


# ------------------------------------------------------------------------------------------
# Views and labels

def vflip(image):
    """Mirror top-bottom (torchvision RandomVerticalFlip on one HWC image)."""
    return image[::-1]


def own_frame_flip(image, r):
    """The code's flip of an image already rotated by r: h-flip (r even) or v-flip (r odd).
    Equals rot90(hflip(x), r) for image = rot90(x, r)."""
    return augment.hflip(image) if r % 2 == 0 else vflip(image)


def train_views(key, images, num_shifts, aug_kwargs, flip_p=0.5):
    """uint8 (B, H, W, C) -> float32 (B * K * 2, H, W, C), rows (image, rotation, view).

    Keys are folded with the image's position in the global batch (as CSI's), then with
    the rotation; each of the two views draws its own flip and SimCLR augmentation.
    """
    def one_view(view_key, rotated, flipped):
        flip_key, aug_key = jax.random.split(view_key)
        v = jnp.where(jax.random.bernoulli(flip_key, flip_p), flipped, rotated)
        return augment.simclr_augment(aug_key, v, **aug_kwargs)

    def one_image(image_key, image):
        x = augment.to_float(image)
        rotated = [augment.rot90(x, r) for r in range(num_shifts)]  # static k: no switch
        flipped = jnp.stack([own_frame_flip(v, r) for r, v in enumerate(rotated)])
        view_keys = jax.vmap(lambda r: jax.random.split(jax.random.fold_in(image_key, r), 2))(
            jnp.arange(num_shifts))  # (K, 2)
        # One vmapped augmentation over all K x 2 views (a single copy in the program).
        per_view = jax.vmap(one_view, in_axes=(0, None, None))
        return jax.vmap(per_view)(view_keys, jnp.stack(rotated), flipped)  # (K, 2, H, W, C)

    image_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
    views = jax.vmap(one_image)(image_keys, images)
    return views.reshape((-1,) + views.shape[3:])


def joint_labels(labels, num_classes, num_shifts):
    """Class positions (B,) -> y (B * K,) = class + C * r, rows (image, rotation)."""
    r = jnp.arange(num_shifts, dtype=jnp.int32)
    return (labels.astype(jnp.int32)[:, None] + num_classes * r[None, :]).reshape(-1)


def sei_view_spec(num_shifts, flips):
    """[(rotation, flipped)] of the SEI views in order: (r, flip) with flip False first."""
    return [(r, f) for r in range(num_shifts) for f in ((False, True) if flips else (False,))]


def sei_views(images, num_shifts, flips):
    """uint8 (B, H, W, C) -> float32 (B, V, H, W, C): rot90(x, r) and rot90(hflip(x), r)."""
    x = jax.vmap(augment.to_float)(images)
    views = [jnp.rot90(x[:, :, ::-1] if f else x, r, axes=(1, 2))
             for r, f in sei_view_spec(num_shifts, flips)]
    return jnp.stack(views, axis=1)


# ------------------------------------------------------------------------------------------
# Masked contrastive losses

def image_multipliers(y, num_classes, temperature, alpha, beta, own=None):
    """(n, n) multipliers between rotated images (module docstring); `own` is the diagonal
    (1/tau for CCM, 0 for SPA)."""
    inv_t = 1.0 / temperature
    delta = y[None, :] - y[:, None]  # Delta_kl = y_l - y_k
    m = jnp.where(jnp.mod(delta, num_classes) == 0, beta, inv_t)
    m = jnp.where(delta == 0, alpha, m)
    eye = jnp.eye(y.shape[0], dtype=bool)
    return jnp.where(eye, inv_t if own is None else own, m).astype(jnp.float32)


def upsample2(m):
    """Nearest x2 upsampling of an (n, n) matrix to (2n, 2n) (F.interpolate, 'nearest')."""
    return jnp.repeat(jnp.repeat(m, 2, axis=0), 2, axis=1)


def partner_index(num_rows):
    """The other view of the same rotated image: 2k <-> 2k + 1."""
    return jnp.arange(num_rows) ^ 1


def ccm_multipliers(y, num_classes, temperature, alpha, beta):
    """Row-level (2n, 2n) multipliers of L_CCM."""
    return upsample2(image_multipliers(y, num_classes, temperature, alpha, beta))


def draw_spa_partners(key, y):
    """(partners (n,), valid (n,)): for each rotated image a uniform draw among the OTHER
    rotated images with the same joint label; valid = it has one (else partner = itself)."""
    n = y.shape[0]
    candidates = (y[None, :] == y[:, None]) & ~jnp.eye(n, dtype=bool)
    u = jax.random.uniform(key, (n, n))
    partners = jnp.argmax(jnp.where(candidates, u, -1.0), axis=1)
    valid = jnp.any(candidates, axis=1)
    return jnp.where(valid, partners, jnp.arange(n)).astype(jnp.int32), valid


def spa_targets(partners):
    """Row 2k + v targets row 2 p(k) + v (the partner's view with the same parity)."""
    return (2 * jnp.repeat(partners, 2) + jnp.tile(jnp.arange(2), partners.shape[0])).astype(
        jnp.int32)


def spa_multipliers(y, partners, num_classes, temperature, alpha, beta):
    """Row-level (2n, 2n) multipliers of L_SPA: own 2x2 block 0, each row's target 1/tau."""
    m = upsample2(image_multipliers(y, num_classes, temperature, alpha, beta, own=0.0))
    targets = spa_targets(partners)
    return m.at[jnp.arange(targets.shape[0]), targets].set(1.0 / temperature), targets


def masked_cross_entropy(u, multipliers, targets, clamp, row_weights=None):
    """mean_i CE(l_i, target_i), l_ij = m_ij * max(<u_i, u_j>, clamp) - 1e5 [i == j].

    u: unit rows (R, D). row_weights (R,): a weighted mean (rows with weight 0 left out;
    0 when every weight is 0).
    """
    cos = jnp.dot(u, u.T, precision=_HIGHEST)
    logits = multipliers * jnp.maximum(cos, clamp)
    logits = logits - DIAGONAL_PENALTY * jnp.eye(u.shape[0], dtype=logits.dtype)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
    ce = jax.nn.logsumexp(logits, axis=1) - target_logit
    if row_weights is None:
        return jnp.mean(ce)
    w = row_weights.astype(jnp.float32)
    return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1.0)


def ccm_loss(u, y, num_classes, temperature, alpha, beta, clamp):
    """L_CCM of unit projections u (2n, D) in the interleaved layout, joint labels y (n,)."""
    m = ccm_multipliers(y, num_classes, temperature, alpha, beta)
    return masked_cross_entropy(u, m, partner_index(u.shape[0]), clamp)


def spa_loss(u, y, partners, valid, num_classes, temperature, alpha, beta, clamp):
    """L_SPA for given partners (n,) and validity (n,) (`draw_spa_partners`)."""
    m, targets = spa_multipliers(y, partners, num_classes, temperature, alpha, beta)
    return masked_cross_entropy(u, m, targets, clamp, row_weights=jnp.repeat(valid, 2))


def loss_and_aux(proj, y, spa_key, cfg):
    """L = L_CCM + spa_weight * L_SPA from projections (2n, D) and joint labels y (n,)."""
    u = losses.l2_normalize(proj.astype(jnp.float32))
    args = (cfg.num_classes, cfg.temperature, cfg.alpha, cfg.beta, cfg.clamp)
    loss_ccm = ccm_loss(u, y, *args)
    partners, valid = draw_spa_partners(spa_key, y)
    loss_spa = spa_loss(u, y, partners, valid, *args)
    loss = loss_ccm + cfg.spa_weight * loss_spa
    return loss, {'loss': loss, 'loss_ccm': loss_ccm, 'loss_spa': loss_spa}


# ------------------------------------------------------------------------------------------
# Self-Ensemble Inference

class SEIState(NamedTuple):
    """One Gaussian per (rotation r, class c), indexed [r, c]."""
    means: jax.Array    # (K, C, D)
    whiten: jax.Array   # (K, C, D, D): W with W^T W = (cov + ridge I)^-1
    present: jax.Array  # (K, C) bool: at least two rows (np.cov with ddof = 1)


def fit_count(num_bank, fit_fraction):
    """Bank images the Gaussians see: the first ceil(fit_fraction * M), at least 1."""
    return min(num_bank, max(1, math.ceil(fit_fraction * num_bank - 1e-9)))


def fit_sei(u, labels, view_rotations, num_classes, num_shifts, fit_fraction, ridge):
    """SEIState from bank features u (M, V, D) and class positions labels (M,)."""
    n = fit_count(u.shape[0], fit_fraction)
    u = u[:n].astype(jnp.float32)
    v, d = u.shape[1], u.shape[2]
    rot = jnp.asarray(view_rotations, jnp.int32)
    joint = (rot[None, :] * num_classes + labels[:n].astype(jnp.int32)[:, None]).reshape(-1)
    rows = u.reshape(n * v, d)
    groups = num_shifts * num_classes
    counts = jax.ops.segment_sum(jnp.ones_like(joint, jnp.float32), joint, groups)
    means = jax.ops.segment_sum(rows, joint, groups) / jnp.maximum(counts, 1.0)[:, None]
    centred = rows - means[jnp.clip(joint, 0, groups - 1)]

    def scatter(g):
        w = (joint == g).astype(jnp.float32)[:, None]
        return jnp.dot((centred * w).T, centred, precision=_HIGHEST)
    cov = jax.lax.map(scatter, jnp.arange(groups)) / jnp.maximum(counts - 1.0, 1.0)[:, None, None]
    lam, vec = jnp.linalg.eigh(cov)
    inv_sqrt = jax.lax.rsqrt(jnp.maximum(lam, 0.0) + ridge)
    whiten = jnp.swapaxes(vec, -1, -2) * inv_sqrt[..., :, None]
    return SEIState(means=means.reshape(num_shifts, num_classes, d),
                    whiten=whiten.reshape(num_shifts, num_classes, d, d),
                    present=(counts >= 2).reshape(num_shifts, num_classes))


def view_distances(state, u, view_rotations):
    """d (N, V, C): Mahalanobis distance of view i to class c at rotation r_i (+inf absent)."""
    rot = np.asarray(view_rotations)
    means, whiten = state.means[rot], state.whiten[rot]  # (V, C, D), (V, C, D, D)
    diff = u.astype(jnp.float32)[:, :, None, :] - means[None]
    z = jnp.einsum('vced,nvcd->nvce', whiten, diff, precision=_HIGHEST)
    dist = jnp.sqrt(jnp.sum(jnp.square(z), axis=-1))
    return jnp.where(state.present[rot][None], dist, jnp.inf)


def combine_views(dist):
    """{'wa', 'mean', 'min'} anomaly scores (N,) from d (N, V, C) (module docstring)."""
    v = dist.shape[1]
    usable = jnp.all(jnp.isfinite(dist), axis=1)  # (N, C): class present at every view
    wa = v / jnp.sum(1.0 / dist, axis=1)
    total = jnp.sum(dist, axis=1)
    return {'wa': jnp.min(jnp.where(usable, wa, jnp.inf), axis=1),
            'mean': jnp.min(jnp.where(usable, total, jnp.inf), axis=1),
            'min': jnp.min(dist, axis=(1, 2))}


def sei_scores(state, u, view_rotations, combine='wa'):
    """{'sei': the `combine` score, 'sei_<other>': the other two}; higher = more anomalous."""
    scores = combine_views(view_distances(state, u, view_rotations))
    out = {'sei': scores[combine]}
    out.update({f'sei_{k}': s for k, s in scores.items() if k != combine})
    return out


# ------------------------------------------------------------------------------------------
# The method object

def _classes_of_item(item):
    """The normal classes of one detector item of table.classes ('3' or '0+3'), as
    jaxad.config.normal_classes parses them (not imported: jaxad.config imports the methods)."""
    try:
        return tuple(int(c) for c in str(item).split('+'))
    except ValueError as e:
        raise ConfigError(f'normal_class={item!r}: expected an int or ints joined by "+"') from e


def _detector_class_counts(data_cfg, table_cfg):
    """Normal classes per detector of the run (for the num_classes check)."""
    items = [i for i in str(table_cfg.classes).split(',') if i and i != 'all']
    counts = [len(_classes_of_item(i)) for i in items]
    if not table_cfg.classes:
        counts.append(len(tuple(data_cfg.normal_classes)))
    return counts


class MCL(Method):
    """The MCL method object for the shared trainer and evaluator."""
    config_section = 'mcl'
    # Change the scores, not the model (jaxad.fingerprint: rescored, not refused).
    scoring_fields = ('mcl.sei_views', 'mcl.combine', 'mcl.fit_fraction', 'mcl.cov_ridge')

    @classmethod
    def default_config(cls):
        c = ml_collections.ConfigDict()
        c.num_shifts = 4
        c.temperature = 0.2
        c.alpha = 0.05  # multiplier: same class, same rotation, other image
        c.beta = 2.0  # multiplier: same class, other rotation
        c.clamp = 1e-7  # cosines are clamped below at this before scaling
        c.spa_weight = 1.0  # weight of stochastic positive attraction
        c.num_classes = 10  # class part of the joint label y = class + num_classes * rot
        c.sei_views = 8  # 8: 4 rotations x (flip, no flip) (SEI-8); 4: rotations (SEI-4)
        c.combine = 'wa'  # wa (harmonic mean) | mean | min
        c.fit_fraction = 0.2  # fraction of the training set the Gaussians see (code: 1/5)
        c.cov_ridge = 1e-9
        return c

    @classmethod
    def validate(cls, config):
        cfg = config.mcl
        if cfg.temperature <= 0:
            raise ConfigError(f'mcl.temperature must be > 0, got {cfg.temperature}')
        if cfg.alpha < 0 or cfg.beta < 0:
            raise ConfigError(f'mcl.alpha and mcl.beta must be >= 0, got {cfg.alpha}, {cfg.beta}')
        if cfg.spa_weight < 0:
            raise ConfigError(f'mcl.spa_weight must be >= 0, got {cfg.spa_weight}')
        if not 1 <= cfg.num_shifts <= 4:
            raise ConfigError(f'mcl.num_shifts must be 1..4 (rotations), got {cfg.num_shifts}')
        if cfg.num_classes < 1:
            raise ConfigError(f'mcl.num_classes must be >= 1, got {cfg.num_classes}')
        most = max(_detector_class_counts(config.data, config.table), default=1)
        if most > cfg.num_classes:
            raise ConfigError(f'mcl.num_classes={cfg.num_classes} is smaller than the {most} '
                              'normal classes of a detector: joint labels would collide')
        k = cfg.num_shifts
        if cfg.sei_views not in (k, 2 * k):
            raise ConfigError(f'mcl.sei_views must be {k} (rotations) or {2 * k} (rotations x '
                              f'flip) with mcl.num_shifts={k}, got {cfg.sei_views}')
        if cfg.combine not in COMBINES:
            raise ConfigError(f'mcl.combine must be one of {COMBINES}, got {cfg.combine!r}')
        if not 0 < cfg.fit_fraction <= 1:
            raise ConfigError(f'mcl.fit_fraction must be in (0, 1], got {cfg.fit_fraction}')
        if cfg.cov_ridge <= 0:
            raise ConfigError(f'mcl.cov_ridge must be > 0 (code: 1e-9), got {cfg.cov_ridge}')
        if config.model.proj_dim <= 0:
            raise ConfigError('MCL needs a projection head: set model.proj_dim > 0')

    def __init__(self, config, budget=None):
        from jaxad.models.resnet import build_model
        super().__init__(config, budget)
        self.headline_score = 'sei'
        self.inputs = ('label',)
        cfg = self.cfg = config.mcl
        k = cfg.num_shifts
        if config.model.get('input_norm', 'csi') != 'none':
            logging.warning("MCL with model.input_norm=%r: the official code feeds ToTensor() "
                            "images without normalisation ('none')", config.model.input_norm)
        self.num_shifts = k
        self.num_classes = cfg.num_classes
        self.flips = cfg.sei_views == 2 * k
        self.view_rotations = tuple(r for r, _ in sei_view_spec(k, self.flips))
        self.model = build_model(config.model, num_shifts=0)
        self.init_from = config.model.get('init_from', '')
        self.train_aug = augment_kwargs(config.augment, config.augment.crop_scale)

    def paper_one_class(self, class_names):
        """None: no verified one-class MCL number (the README's ~94 is CIFAR-10 -> CIFAR-100)."""
        del class_names
        return None

    def density_features(self, features):
        """The unflipped 0-degree SEI view's unit projection."""
        return features['u'][:, 0]

    def init_variables(self, key, image_shape):
        if self.num_shifts > 1 and image_shape[0] != image_shape[1]:
            raise ConfigError(f'MCL rotates images by 90 degrees: they must be square, got '
                              f'{image_shape[0]}x{image_shape[1]}')
        from jaxad.models.convert import init_variables
        return init_variables(self.model, key, image_shape, self.init_from)

    def loss(self, params, batch_stats, consts, batch, key):
        """(loss, (metrics, new_batch_stats)) for a uint8 batch with labels, BN in train mode."""
        del consts  # MCL has none
        aug_key, spa_key = jax.random.split(key)
        views = train_views(aug_key, batch['image'], self.num_shifts, self.train_aug)
        out, mutated = self.model.apply({'params': params, 'batch_stats': batch_stats}, views,
                                        train=True, mutable=['batch_stats'])
        y = joint_labels(batch['label'], self.num_classes, self.num_shifts)
        loss, metrics = loss_and_aux(out['proj'], y, spa_key, self.cfg)
        return loss, (metrics, mutated['batch_stats'])

    def features(self, variables, images, indices, key):
        """{'u': (B, V, D)} unit projections of the SEI views, BN in eval mode."""
        del indices, key  # deterministic views
        views = sei_views(images, self.num_shifts, self.flips)
        b, v = views.shape[:2]
        proj = self.model.apply(variables, views.reshape((b * v,) + views.shape[2:]),
                                train=False)['proj']
        return {'u': losses.l2_normalize(proj.astype(jnp.float32)).reshape(b, v, -1)}

    def fit_scoring(self, train_features):
        return fit_sei(train_features['u'], train_features['label'], self.view_rotations,
                       self.num_classes, self.num_shifts, self.cfg.fit_fraction,
                       self.cfg.cov_ridge)._asdict()

    def score(self, scoring, test_features):
        return sei_scores(SEIState(**scoring), test_features['u'], self.view_rotations,
                          self.cfg.combine)
