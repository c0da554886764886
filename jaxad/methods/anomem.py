"""AnoMem: multi-scale contrasted memory (Jezequel et al., arXiv 2211.09041; docs/methods.md §7).

NOT a parity implementation. No public code exists and the paper's equations were not
recovered (docs/methods.md §7.1); this is the sketch of docs/methods.md §7.2. Every choice marked
[inferred] below is a guess and a config field (`config.anomem`), so it can be changed
once the paper PDF is checked. There are no published numbers to compare with
(`paper_one_class` returns None).

Model (`AnoMemNet`)
  A ResNet encoder (`config.model`, CIFAR stem by default), run stage by stage, with a
  memory layer after each stage named in `anomem.scales` (default layer2, layer3, layer4).
  The encoder keeps the parameter names of `jaxad.models.resnet.ResNet` under the scope
  'encoder' (conv1, bn1, layer{s}_{b}/...), so `model.init_from` (a converted torchvision
  DIR or another jaxad run) loads into it as for the other methods; the memories and heads
  live outside that scope (memory_layer2, ..., proj_hidden, proj_out, classifier).

  Memory at scale s: learnable prototypes M_s (N_s x C_s, `anomem.num_prototypes`,
  initialised |N(0, 1)| so that they look like post-ReLU features [inferred]). For each
  spatial feature q = F_s(x)[h, w] a modern-Hopfield retrieval
      r = softmax(beta * q^ M^_s^T) M_s        (q^, M^: L2-normalised; `anomem.beta`)
  `anomem.memory_mix` [inferred] says what the next stage (or the global pooling after
  layer4) sees: 'replace' = r (default) or 'residual' = q + r. Default 'replace': the
  downstream network then only sees what the memory can express, so the contrastive loss
  must make the prototypes informative (MemAE-style bottleneck); with 'residual' the
  network can route around a useless memory. The same forward is used at train and test
  time, so deviations of scale s+1 are computed on features of the retrieved scale s.

Loss (one train-mode forward of 2 SimCLR views per normal image, OECL's
`common.train_views` with no rotation: h-flip + CSI's jitter/grey/resized crop; view-major
rows, positive (i + N/2) mod N)
  L = NT-Xent(proj, anomem.temperature, CSI's eps form)
      + var_weight  * sum_s mean_c max(0, gamma - sqrt(Var_n(M_s[:, c]) + 1e-4))
      + pull_weight * sum_s mean_{b,h,w} D~_s                                  (normal views)
  * The variance hinge is VICReg's (`anomem.var_gamma`, `anomem.var_weight`) with the
    UNBIASED variance over the N_s prototypes (torch.var's default, as VICReg's code) and
    eps 1e-4 inside the sqrt. Default gamma 0.5 [inferred]: BN -> ReLU features of a unit
    normal pre-activation have per-channel std ~0.58; gamma = 1 (VICReg) would push the
    prototypes to spread further than the features they memorise.
  * The pull ("memorise the normal features", the y_k = 1 part of the paper's Eqs. 2-4
    [inferred]; the reported "variance term to prevent prototype collapse" only makes sense
    with such a term) uses D~_s, the deviation of stop_gradient(q) from its retrieval with
    the live memory (`anomem.pull_stop_grad`: the codebook half of a VQ loss; the features
    are not pulled towards the memory), divided by C_s for 'l2' so scales weigh alike.
    pull_weight = 0 gives the plain sketch of §7.2 (NT-Xent + variance only).

Deviation maps (`anomem.deviation`): D_s(x)[h, w] = ||q - r||^2 ('l2', the default) or
1 - cos(q, r) ('cos').

Scores (eval-mode BN, the clean test image, no test-time augmentation [inferred]):
  dev_<scale>   m_s(x) = mean_{h,w} D_s(x)                      per-scale image score
  anomem        sum_s (m_s - mu_s) / sigma_s                      one-class headline
  anomem_map    (N, H, W): sum_s (up(D_s) - mu_s) / sigma_s, up = bilinear to the image size
  mu_s, sigma_s: mean and (population) std of m_s over the normal training images
  (`fit_scoring`; inverse-std weights fitted on normal data only [inferred: the paper's
  weights are "somewhat arbitrary" per a reviewer]).

Few-anomaly (outlier-exposure) mode, `anomem.few_anomalies` = True: the method asks for
`batch['outlier']` (the trainer's `oe.source` stream; `oe.max_images` keeps only a few).
  * A small CNN (`anomem.cls_hidden` channels: conv3x3 - ReLU - conv3x3/2 - ReLU - global
    mean & max pool - Dense(1)) on the stacked log1p(D_s) maps, up-sampled to the finest
    scale's size, with stop_gradient on the maps. It is trained with balanced BCE (normal 0,
    anomaly 1; `anomem.cls_weight`) JOINTLY in the same step as the memory and encoder
    [inferred]; the paper's second stage is sequential, but the stop-gradient keeps the
    classifier from shaping the features, as a sequential stage would.
  * The classifier's inputs come from a second, eval-mode (running BN statistics) forward
    over the clean normal images and the anomalies (random h-flip only), i.e. the maps the
    test set will produce; the train-mode BN batch stays normal-only [inferred].
  * Optional deviation hinge for the memory (the y_k = 0 part of Eqs. 2-4 [inferred]):
    hinge_weight * sum_s mean_anomalies max(0, margin - m~_s(o) / sg(mean_normal m~_s)),
    i.e. an anomaly's mean deviation should be `anomem.hinge_margin` times the normal
    batch's; on stop_gradient(q), so only the memory moves. Default OFF (hinge_weight 0):
    it is the least supported piece, and with a handful of anomalies it can overfit.
  * Score 'classifier' (the logit, higher = anomalous) is the headline; the one-class
    scores are reported beside it.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxad import losses
from jaxad.errors import ConfigError
from jaxad.methods.base import Method
from jaxad.methods.common import augment_kwargs, train_views
from jaxad.models import resnet

SCALES = ('layer1', 'layer2', 'layer3', 'layer4')
MEMORY_MIXES = ('replace', 'residual')
DEVIATIONS = ('l2', 'cos')
VAR_EPS = 1e-4  # VICReg: std = sqrt(var + 1e-4)


# ----------------------------------------------------------------------------- formulas

def hopfield_retrieve(q, memory, beta):
    """r = softmax(beta * q^ M^^T) M for queries q (..., C) and prototypes M (N, C)."""
    q = q.astype(jnp.float32)
    memory = memory.astype(jnp.float32)
    sims = losses.l2_normalize(q) @ losses.l2_normalize(memory).T  # (..., N) cosines
    return jax.nn.softmax(beta * sims, axis=-1) @ memory


def deviation(q, r, kind='l2'):
    """D = ||q - r||^2 ('l2') or 1 - cos(q, r) ('cos') over the last axis."""
    q, r = q.astype(jnp.float32), r.astype(jnp.float32)
    if kind == 'l2':
        return jnp.sum(jnp.square(q - r), axis=-1)
    if kind == 'cos':
        return 1.0 - jnp.sum(losses.l2_normalize(q) * losses.l2_normalize(r), axis=-1)
    raise ConfigError(f'unknown anomem.deviation {kind!r}; choose from {DEVIATIONS}')


def variance_term(memory, gamma):
    """VICReg variance hinge of prototypes M (N, C): mean_c max(0, gamma - std_n M[:, c]),
    std = sqrt(unbiased var + 1e-4)."""
    std = jnp.sqrt(jnp.var(memory.astype(jnp.float32), axis=0, ddof=1) + VAR_EPS)
    return jnp.mean(jax.nn.relu(gamma - std))


def classifier_bce(logit_normal, logit_anomaly):
    """Balanced BCE with logits: 0.5 (mean_normal -log(1 - p) + mean_anomaly -log p)."""
    return 0.5 * (jnp.mean(jax.nn.softplus(logit_normal))
                  + jnp.mean(jax.nn.softplus(-logit_anomaly)))


def positive_index(num_rows):
    """Row i's positive in the view-major [v1; v2] layout: (i + N/2) mod N."""
    return jnp.roll(jnp.arange(num_rows), num_rows // 2)


def fit_scoring(dev_maps, scales):
    """{'mu', 'sigma'} (S,): mean / std of the per-scale image scores m_s on normal data."""
    m = jnp.stack([jnp.mean(dev_maps[s], axis=(1, 2)) for s in scales], axis=1)  # (N, S)
    return {'mu': jnp.mean(m, axis=0), 'sigma': jnp.maximum(jnp.std(m, axis=0), 1e-12)}


def scores(scoring, dev_maps, scales, image_size):
    """{'anomem', 'dev_<s>', 'anomem_map'} (module docstring); higher = anomalous."""
    out, total, amap = {}, 0.0, 0.0
    for i, s in enumerate(scales):
        d = dev_maps[s].astype(jnp.float32)
        m = jnp.mean(d, axis=(1, 2))
        out[f'dev_{s}'] = m
        total = total + (m - scoring['mu'][i]) / scoring['sigma'][i]
        up = jax.image.resize(d, (d.shape[0],) + tuple(image_size), 'bilinear')
        amap = amap + (up - scoring['mu'][i]) / scoring['sigma'][i]
    out['anomem'] = total
    out['anomem_map'] = amap
    return out


# ----------------------------------------------------------------------------- model

class StagedResNet(nn.Module):
    """`jaxad.models.resnet.ResNet`, callable one piece at a time: stage 0 = input
    normalisation + stem, stage s (1..4) = the blocks of layer s. Same parameter names
    (conv1, bn1, layer{s}_{b}), so weights of a ResNet encoder load unchanged."""
    depth: int = 18
    stem: str = 'cifar'
    width: int = 64
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_mode: str = 'batch'
    bn_groups: int = 1
    width_per_group: int = 64
    input_norm: str = 'csi'
    conv_impl: str = 'auto'

    @nn.compact
    def __call__(self, x, train, stage):
        if stage == 0:
            return resnet.resnet_stem(self, x, train)
        return resnet.resnet_stage(self, x, stage, train)


class HopfieldMemory(nn.Module):
    """Learnable prototypes (num_prototypes, C) and their Hopfield retrieval."""
    num_prototypes: int
    beta: float

    @nn.compact
    def __call__(self, q):
        init = lambda key, shape: jnp.abs(jax.random.normal(key, shape))  # noqa: E731
        memory = self.param('prototypes', init, (self.num_prototypes, q.shape[-1]))
        return hopfield_retrieve(q, memory, self.beta)


class DeviationClassifier(nn.Module):
    """Small CNN on stacked deviation maps (B, h, w, S) -> one logit per image."""
    hidden: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(self.hidden, (3, 3), padding=1, name='conv1')(x))
        x = nn.relu(nn.Conv(self.hidden, (3, 3), (2, 2), padding=1, name='conv2')(x))
        pooled = jnp.concatenate([jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2))], -1)
        return nn.Dense(1, name='out')(pooled)[:, 0]


def classifier_input(dev_maps, scales):
    """log1p of the deviation maps, bilinearly up-sampled to the finest scale: (B, h, w, S)."""
    size = max((dev_maps[s].shape[1:3] for s in scales), key=lambda hw: hw[0] * hw[1])
    ups = [jax.image.resize(dev_maps[s], dev_maps[s].shape[:1] + tuple(size), 'bilinear')
           for s in scales]
    return jnp.log1p(jnp.maximum(jnp.stack(ups, axis=-1), 0.0))


class AnoMemNet(nn.Module):
    """Encoder with memories at `scales`, projection head, optional deviation classifier.

    Returns float32 {'query': {s: (B, h, w, C)}, 'dev': {s: (B, h, w)}, 'pooled', 'proj'}
    (+ 'cls_logit' (B,) when cls_hidden > 0; its inputs are stop-gradient).
    """
    encoder_kwargs: Any
    scales: Sequence[str] = ('layer2', 'layer3', 'layer4')
    num_prototypes: int = 64
    beta: float = 16.0
    memory_mix: str = 'replace'
    deviation: str = 'l2'
    proj_dim: int = 128
    proj_hidden: int = 0
    cls_hidden: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train):
        encoder = StagedResNet(**dict(self.encoder_kwargs), name='encoder')
        h = encoder(x, train, 0)
        queries, devs = {}, {}
        for stage in range(1, 5):
            h = encoder(h, train, stage)
            name = f'layer{stage}'
            if name in self.scales:
                q = h.astype(jnp.float32)
                r = HopfieldMemory(self.num_prototypes, self.beta, name=f'memory_{name}')(q)
                queries[name], devs[name] = q, deviation(q, r, self.deviation)
                h = (r if self.memory_mix == 'replace' else q + r).astype(self.dtype)
        pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        out = {'query': queries, 'dev': devs, 'pooled': pooled}
        if self.proj_dim:
            z = nn.Dense(self.proj_hidden or pooled.shape[-1], dtype=self.dtype,
                         name='proj_hidden')(pooled)
            out['proj'] = nn.Dense(self.proj_dim, dtype=self.dtype,
                                   name='proj_out')(nn.relu(z)).astype(jnp.float32)
        if self.cls_hidden:
            maps = classifier_input(jax.lax.stop_gradient(devs), self.scales)
            out['cls_logit'] = DeviationClassifier(self.cls_hidden, name='classifier')(
                maps).astype(jnp.float32)
        return out


def build_model(config):
    """AnoMemNet from `config.model` and `config.anomem`."""
    m = config.model
    # resnet.build_model validates the model fields; its encoder settings are reused.
    ref = resnet.build_model(m, num_shifts=0)
    encoder_kwargs = dict(depth=ref.depth, stem=ref.stem, width=ref.width, dtype=ref.dtype,
                          bn_mode=ref.bn_mode, bn_groups=ref.bn_groups,
                          width_per_group=ref.width_per_group, input_norm=ref.input_norm,
                          conv_impl=ref.conv_impl)
    a = config.anomem
    return AnoMemNet(encoder_kwargs=tuple(sorted(encoder_kwargs.items())),
                     scales=tuple(a.scales), num_prototypes=a.num_prototypes, beta=a.beta,
                     memory_mix=a.memory_mix, deviation=a.deviation, proj_dim=m.proj_dim,
                     proj_hidden=m.get('proj_hidden', 0),
                     cls_hidden=a.cls_hidden if a.few_anomalies else 0, dtype=ref.dtype)


def default_config():
    """`config.anomem`'s defaults. [inferred] = a guess, not from the paper (no code,
    equations not recovered): see the module docstring."""
    c = ml_collections.ConfigDict()
    c.scales = ('layer2', 'layer3', 'layer4')  # memory after these stages [inferred]
    c.num_prototypes = 64  # N_s, every scale [inferred]
    c.beta = 16.0  # Hopfield inverse temperature on cosines [inferred]
    c.memory_mix = 'replace'  # next stage sees r | 'residual': q + r [inferred]
    c.deviation = 'l2'  # D = ||q - r||^2 | 'cos': 1 - cos(q, r)
    c.temperature = 0.5  # NT-Xent tau (SimCLR CIFAR) [inferred]
    c.eps = 1e-8  # eps inside NT-Xent (CSI's form)
    c.var_gamma = 0.5  # VICReg variance hinge target std [inferred]
    c.var_weight = 1.0  # [inferred]
    c.pull_weight = 1.0  # pull memory to normal features (y=1 of Eqs. 2-4) [inferred]
    c.pull_stop_grad = True  # pull/hinge move the memory only [inferred]
    c.few_anomalies = False  # outlier-exposure mode: classifier on deviation maps
    c.cls_hidden = 16  # classifier CNN channels [inferred]
    c.cls_weight = 1.0  # BCE weight, trained jointly (stop-gradient maps) [inferred]
    c.hinge_weight = 0.0  # anomalies' deviation hinge (y=0 of Eqs. 2-4); 0 = off
    c.hinge_margin = 2.0  # anomaly mean deviation >= margin x normal batch mean
    return c


def validate(config):
    """ConfigError for a bad `config.anomem` (`AnoMem.validate`: jaxad.config.validate_config
    and the constructor)."""
    a = config.anomem
    scales = tuple(a.scales)
    if not scales or any(s not in SCALES for s in scales) or len(set(scales)) != len(scales):
        raise ConfigError(f'anomem.scales must be distinct names among {SCALES}, got {scales}')
    if list(scales) != sorted(scales):
        raise ConfigError(f'anomem.scales must be in stage order, got {scales}')
    if a.memory_mix not in MEMORY_MIXES:
        raise ConfigError(f'unknown anomem.memory_mix {a.memory_mix!r}; choose from '
                          f'{MEMORY_MIXES}')
    if a.deviation not in DEVIATIONS:
        raise ConfigError(f'unknown anomem.deviation {a.deviation!r}; choose from {DEVIATIONS}')
    for name in ('num_prototypes', 'beta', 'temperature'):
        if a[name] <= 0:
            raise ConfigError(f'anomem.{name} must be > 0, got {a[name]}')
    if a.num_prototypes < 2:
        raise ConfigError('anomem.num_prototypes must be >= 2 (the variance term needs an '
                          f'unbiased std), got {a.num_prototypes}')
    for name in ('var_gamma', 'var_weight', 'pull_weight', 'cls_weight', 'hinge_weight',
                 'hinge_margin', 'eps'):
        if a[name] < 0:
            raise ConfigError(f'anomem.{name} must be >= 0, got {a[name]}')
    if config.model.proj_dim <= 0:
        raise ConfigError('anomem trains with NT-Xent on the projection: model.proj_dim > 0')
    if a.few_anomalies:
        if a.cls_hidden <= 0:
            raise ConfigError(f'anomem.cls_hidden must be > 0, got {a.cls_hidden}')
        if not config.oe.source:
            raise ConfigError('anomem.few_anomalies needs labelled anomalies: set oe.source '
                              '(e.g. other_classes) and oe.max_images')


class AnoMem(Method):
    """The AnoMem method object for the shared trainer and evaluator."""
    config_section = 'anomem'

    @classmethod
    def default_config(cls):
        return default_config()

    @classmethod
    def validate(cls, config):
        validate(config)

    def __init__(self, config, budget=None):
        super().__init__(config, budget)
        self.cfg = config.anomem
        self.loss_cfg = config.loss
        self.scales = tuple(self.cfg.scales)
        self.few_anomalies = bool(self.cfg.few_anomalies)
        self.model = build_model(config)
        self.init_from = config.model.get('init_from', '')
        self.aug = augment_kwargs(config.augment, config.augment.crop_scale)
        self.image_size = (config.data.image_size, config.data.image_size)
        self.headline_score = 'classifier' if self.few_anomalies else 'anomem'
        self.inputs = ('outlier',) if self.few_anomalies else ()

    def paper_one_class(self, class_names):
        """None: no AnoMem per-class or mean numbers were recovered (docs/methods.md §7.1)."""
        del class_names
        return None

    def density_features(self, features):
        """The pooled last-stage features (after its memory) for eval.density."""
        return features['pooled']

    def init_variables(self, key, image_shape):
        from jaxad.models.convert import init_variables
        return init_variables(self.model, key, image_shape, self.init_from)

    def _memory_deviation(self, params, scale, q):
        """Deviation of (stop-gradient) q from its retrieval with the live memory of `scale`."""
        if self.cfg.pull_stop_grad:
            q = jax.lax.stop_gradient(q)
        r = hopfield_retrieve(q, params[f'memory_{scale}']['prototypes'], self.cfg.beta)
        d = deviation(q, r, self.cfg.deviation)
        return d / q.shape[-1] if self.cfg.deviation == 'l2' else d

    def loss(self, params, batch_stats, consts, batch, key):
        """(loss, (metrics, new_batch_stats)); batch: image (+ outlier in few-anomaly mode)."""
        from jaxad.data import augment
        del consts
        view_key, flip_key = jax.random.split(key)
        images = batch['image']
        views = train_views(view_key, images, (0,), self.aug)  # [v1; v2]
        out, mutated = self.model.apply({'params': params, 'batch_stats': batch_stats}, views,
                                        train=True, mutable=['batch_stats'])
        cfg = self.cfg
        loss_con = losses.nt_xent_by_name(self.loss_cfg.nt_xent, out['proj'],
                                          positive_index(views.shape[0]), cfg.temperature,
                                          eps=cfg.eps, block_size=self.loss_cfg.key_block)
        loss_var = sum(variance_term(params[f'memory_{s}']['prototypes'], cfg.var_gamma)
                       for s in self.scales)
        loss_pull = sum(jnp.mean(self._memory_deviation(params, s, out['query'][s]))
                        for s in self.scales)
        loss = loss_con + cfg.var_weight * loss_var + cfg.pull_weight * loss_pull
        metrics = {'loss_con': loss_con, 'loss_var': loss_var, 'loss_pull': loss_pull}
        for s in self.scales:
            metrics[f'dev_{s}'] = jnp.mean(out['dev'][s])
        if self.few_anomalies:
            b = images.shape[0]
            clean = jnp.concatenate([images, batch['outlier']], axis=0)
            keys = jax.random.split(flip_key, clean.shape[0])
            x = jax.vmap(lambda k, im: augment.random_hflip(k, augment.to_float(im)))(keys, clean)
            # Eval-mode forward: the maps the test images will give (module docstring).
            ev = self.model.apply({'params': params, 'batch_stats': batch_stats}, x,
                                  train=False)
            logit = ev['cls_logit']
            loss_cls = classifier_bce(logit[:b], logit[b:])
            hinge = 0.0
            for s in self.scales:
                m = jnp.mean(self._memory_deviation(params, s, ev['query'][s]), axis=(1, 2))
                ratio = m[b:] / jax.lax.stop_gradient(jnp.maximum(jnp.mean(m[:b]), 1e-12))
                hinge = hinge + jnp.mean(jax.nn.relu(cfg.hinge_margin - ratio))
            loss = loss + cfg.cls_weight * loss_cls + cfg.hinge_weight * hinge
            metrics.update(loss_cls=loss_cls, loss_hinge=hinge,
                           cls_acc=0.5 * (jnp.mean(logit[:b] < 0) + jnp.mean(logit[b:] > 0)))
        metrics['loss'] = loss
        return loss, (metrics, mutated['batch_stats'])

    def features(self, variables, images, indices, key):
        """Deviation maps, pooled features (+ classifier logit) of the clean images, BN eval."""
        from jaxad.data import augment
        del indices, key
        x = jax.vmap(augment.to_float)(images)
        out = self.model.apply(variables, x, train=False)
        feats = {'dev': out['dev'], 'pooled': out['pooled']}
        if self.few_anomalies:
            feats['cls_logit'] = out['cls_logit']
        return feats

    def fit_scoring(self, train_features):
        return fit_scoring(train_features['dev'], self.scales)

    def score(self, scoring, test_features):
        out = scores(scoring, test_features['dev'], self.scales, self.image_size)
        if self.few_anomalies:
            out['classifier'] = test_features['cls_logit']
        return out
