"""Optimisers and learning-rate schedules, built from `config.optim`.

The default reproduces CSI: torchlars 0.1.2 `LARS(SGD(lr, momentum=0.9, weight_decay=1e-6))`
under `GradualWarmupScheduler(multiplier=10, total_epoch=10)` + `CosineAnnealingLR(T_max=epochs)`,
stepped every iteration (docs/methods.md §1.5, §2.4). `optax.lars` is not used: its trust ratio
divides by ||g + wd*p|| instead of torchlars' ||g|| + wd*||p|| + eps.

Large-batch knobs (docs/jax-stack.md §3, SimCLR's recipe): `optim.lr_rule` scales the base rate
with the global batch, `optim.exclude_bn_bias` keeps BN parameters and biases out of weight
decay and out of the LARS adaptation, `optim.warmup_steps` gives the warm-up in steps
instead of epochs, and the 'warmup_cosine' schedule is SimCLR's linear warm-up from 0 then
cosine to 0.
"""
import math
import re

import jax
import jax.numpy as jnp
import optax

from jaxad.errors import ConfigError

OPTIMIZERS = ('lars', 'sgd', 'adam', 'adamw')
SCHEDULES = ('csi_warmup_cosine', 'warmup_cosine', 'cosine', 'constant')
# The schedules that start with a warm-up (`warmup_length`); the others have none.
WARMUP_SCHEDULES = ('csi_warmup_cosine', 'warmup_cosine')
LR_RULES = ('none', 'linear', 'sqrt')


def scaled_lr(base_lr, global_batch, rule, base_batch=256):
    """The peak rate for a global batch: 'linear' base*B/base_batch (Goyal et al.),
    'sqrt' base*sqrt(B/base_batch), 'none' base. Both rules agree at B = base_batch;
    SimCLR's sqrt form 0.075*sqrt(B) is 'sqrt' with base = 0.075*sqrt(base_batch)."""
    if rule not in LR_RULES:
        raise ConfigError(f'unknown optim.lr_rule {rule!r}; choose one of {", ".join(LR_RULES)}')
    if rule != 'none' and (not global_batch or global_batch <= 0 or base_batch <= 0):
        raise ConfigError(f'optim.lr_rule={rule!r} needs a global batch and optim.lr_base_batch '
                          f'> 0, got {global_batch} and {base_batch}')
    if rule == 'linear':
        return base_lr * global_batch / base_batch
    if rule == 'sqrt':
        return base_lr * math.sqrt(global_batch / base_batch)
    return base_lr


def decay_mask(params):
    """True for weight matrices and conv kernels, False for BN scales/offsets and biases:
    the tensors with one dimension (SimCLR and BYOL exclude exactly these)."""
    return jax.tree_util.tree_map(lambda p: jnp.ndim(p) > 1, params)


def scale_by_torchlars(weight_decay, trust_coef=1e-3, eps=1e-8, mask=None):
    """torchlars' gradient rewrite, per parameter tensor: g' = (g + wd*p) * a.

    a = trust_coef*||p|| / (||g|| + wd*||p|| + eps) when both norms are positive, else 1, so a
    zero-initialised tensor or a dead gradient falls back to plain SGD (torchlars'
    `adaptive_lr.cc`). CSI applies it to every tensor, BN and biases included, hence the default.
    `mask` (a pytree of bools or a callable on params; True = apply, optax's convention) leaves
    the other gradients untouched, without decay or adaptation, for large-batch recipes.
    """
    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError('scale_by_torchlars needs params: call update(grads, state, params)')

        def one(g, p):
            p_norm = jnp.linalg.norm(p.ravel())
            g_norm = jnp.linalg.norm(g.ravel())
            ratio = trust_coef * p_norm / (g_norm + weight_decay * p_norm + eps)
            a = jnp.where((p_norm > 0) & (g_norm > 0), ratio, 1.0)
            return ((g + weight_decay * p) * a).astype(g.dtype)

        return jax.tree_util.tree_map(one, updates, params), state

    tx = optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
    return tx if mask is None else optax.masked(tx, mask)


def torchlars_sgd(learning_rate, momentum=0.9, weight_decay=1e-6, trust_coef=1e-3, eps=1e-8,
                  mask=None):
    """torchlars LARS around torch SGD: the LARS rewrite, then buf = m*buf + g' (buf = g' on the
    first step, which optax.trace's zero init gives), then p -= lr*buf."""
    return optax.chain(
        scale_by_torchlars(weight_decay, trust_coef, eps, mask),
        optax.trace(decay=momentum),
        optax.scale_by_learning_rate(learning_rate))


def csi_warmup_cosine(base_lr, steps_per_epoch, total_epochs, warmup_epochs=10, multiplier=10.0):
    """CSI's per-iteration learning rate at fractional epoch e = step / steps_per_epoch.

    e <= warmup: base*((multiplier-1)*e/warmup + 1), from base up to base*multiplier; at
    e = warmup exactly the warm-up branch applies (GradualWarmupScheduler tests
    `last_epoch > total_epoch`), and both branches give base*multiplier there. multiplier == 1
    follows the scheduler's special case, base*e/warmup, a ramp from 0.
    e > warmup: base*multiplier*(1 + cos(pi*(e - warmup)/total_epochs))/2. T_max is
    total_epochs, not total_epochs - warmup, so the last rate is still
    base*multiplier*(1 + cos(pi*(1 - warmup/total_epochs)))/2 (2.5e-4 with CSI's defaults).
    warmup_epochs=0, which makes the torch scheduler divide by zero, means pure cosine from
    base*multiplier.

    CSI differs by at most one iteration or float32 resolution: torch's first post-warm-up call
    returns base*multiplier instead of the cosine at 1/steps_per_epoch, and CSI calls
    `scheduler.step(epoch - 1 + n/len(loader))` after `optimizer.step()`, so its iteration i uses
    the rate at e = (i-1)/steps_per_epoch (iterations 0 and 1 both use base).
    """
    if steps_per_epoch <= 0 or total_epochs <= 0:
        raise ConfigError(f'csi_warmup_cosine needs steps_per_epoch > 0 and epochs > 0, '
                          f'got {steps_per_epoch} and {total_epochs}')
    if warmup_epochs < 0:
        raise ConfigError(f'warmup_epochs must be >= 0, got {warmup_epochs}')
    if multiplier < 1.0:
        raise ConfigError(f'warmup multiplier must be >= 1 (GradualWarmupScheduler), '
                          f'got {multiplier}')
    peak = base_lr * multiplier

    def schedule(step):
        e = jnp.asarray(step, jnp.float32) / steps_per_epoch
        # (1 + cos x)/2 as cos(x/2)^2 keeps float32 precision where the rate is small.
        lr = peak * jnp.cos(math.pi * (e - warmup_epochs) / (2 * total_epochs)) ** 2
        if warmup_epochs > 0:
            if multiplier == 1.0:
                warm = base_lr * e / warmup_epochs
            else:
                warm = base_lr * ((multiplier - 1.0) * e / warmup_epochs + 1.0)
            lr = jnp.where(e <= warmup_epochs, warm, lr)
        return lr.astype(jnp.float32)

    return schedule


def warmup_steps(optim_cfg, steps_per_epoch):
    """Warm-up length in steps: optim.warmup_steps when > 0, else warmup_epochs epochs."""
    steps = optim_cfg.get('warmup_steps', 0)
    if steps < 0:
        raise ConfigError(f'optim.warmup_steps must be >= 0, got {steps}')
    return steps if steps > 0 else round(optim_cfg.warmup_epochs * steps_per_epoch)


def warmup_length(optim_cfg, steps_per_epoch):
    """The warm-up length in steps of the schedule `optim_cfg.schedule` names (`warmup_steps`),
    or None for a schedule without a warm-up."""
    if optim_cfg.schedule not in WARMUP_SCHEDULES:
        return None
    return warmup_steps(optim_cfg, steps_per_epoch)


def describe_schedule(optim_cfg, schedule, steps_per_epoch):
    """One line on the learning rate of `schedule` (made from `optim_cfg` by `make_schedule`)
    for the run's log: the lr rule, the base rate, the rate at step 0 and, for a schedule with
    a warm-up, the rate once it is over."""
    text = (f'lr rule {optim_cfg.get("lr_rule", "none")}: base lr {optim_cfg.lr:g} -> '
            f'{float(schedule(0)):g} at step 0')
    warm = warmup_length(optim_cfg, steps_per_epoch)
    if warm is not None:
        text += f', {float(schedule(warm)):g} after warm-up'
    return text


def make_schedule(optim_cfg, steps_per_epoch, total_steps, global_batch=None):
    """The learning-rate schedule named by `optim_cfg.schedule`, a function of the update count.

    Its base rate is `optim.lr` scaled by `optim.lr_rule` for `global_batch`.
    """
    lr = scaled_lr(optim_cfg.lr, global_batch, optim_cfg.get('lr_rule', 'none'),
                   optim_cfg.get('lr_base_batch', 256))
    if optim_cfg.schedule == 'csi_warmup_cosine':
        # T_max comes from optim.epochs as in CSI, so a shorter total_steps truncates the curve.
        warmup = optim_cfg.warmup_epochs
        if optim_cfg.get('warmup_steps', 0) > 0:
            warmup = optim_cfg.warmup_steps / steps_per_epoch
        return csi_warmup_cosine(lr, steps_per_epoch, optim_cfg.epochs, warmup,
                                 optim_cfg.warmup_multiplier)
    if optim_cfg.schedule == 'warmup_cosine':
        total = max(total_steps, 1)
        warmup = min(warmup_steps(optim_cfg, steps_per_epoch), total)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=0.0)
    if optim_cfg.schedule == 'cosine':
        # MCL: per-step cosine down to lr * final_lr_fraction (5e-4 there).
        return optax.cosine_decay_schedule(lr, max(total_steps, 1),
                                           alpha=optim_cfg.get('final_lr_fraction', 0.0))
    if optim_cfg.schedule == 'constant':
        return optax.constant_schedule(lr)
    raise ConfigError(f'unknown optim.schedule {optim_cfg.schedule!r}; '
                      f'choose one of {", ".join(SCHEDULES)}')


def param_path(path):
    """'encoder/layer1_0/conv1/kernel' for a tree_util key path."""
    return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def param_labels(params, freeze, groups):
    """Per-parameter optimiser labels: 'frozen' where a `freeze` regex matches (re.search),
    else 'group{i}' for the first `groups` regex that matches, else 'train'. A pattern
    that matches nothing is a typo, not a no-op: ConfigError."""
    def compile_all(patterns, what):
        try:
            return [re.compile(p) for p in patterns]
        except re.error as e:
            raise ConfigError(f'{what}: bad regular expression: {e}') from e
    frozen = compile_all(freeze, 'optim.freeze')
    grouped = compile_all(groups, 'optim.group_lr')
    paths = [param_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for what, compiled in (('optim.freeze', frozen), ('optim.group_lr', grouped)):
        for c in compiled:
            if not any(c.search(p) for p in paths):
                raise ConfigError(f'{what} pattern {c.pattern!r} matches no parameter '
                                  f'(paths look like {paths[0]!r})')

    def label(path, _):
        name = param_path(path)
        if any(c.search(name) for c in frozen):
            return 'frozen'
        return next((f'group{i}' for i, c in enumerate(grouped) if c.search(name)), 'train')
    return jax.tree_util.tree_map_with_path(label, params)


def with_groups(txs, freeze, groups):
    """One optimiser per label of `param_labels`: txs['train'] and txs['group{i}'];
    'frozen' params get exact zero updates (no decay, no optimiser state)."""
    if not freeze and not groups:
        return txs['train']
    return optax.multi_transform(dict(txs, frozen=optax.set_to_zero()),
                                 lambda params: param_labels(params, freeze, groups))


def _base_tx(optim_cfg, schedule, mask):
    """The optimiser named by optim.name at learning rate `schedule`."""
    name, nesterov = optim_cfg.name, optim_cfg.get('nesterov', False)
    if name == 'lars':
        return torchlars_sgd(schedule, optim_cfg.momentum, optim_cfg.weight_decay,
                             optim_cfg.trust_coef, optim_cfg.eps, mask=mask)
    if name == 'sgd':
        # torch: buf = m*buf + g; nesterov steps along g + m*buf (optax.trace's nesterov).
        return optax.chain(optax.add_decayed_weights(optim_cfg.weight_decay, mask=mask),
                           optax.trace(decay=optim_cfg.momentum, nesterov=nesterov),
                           optax.scale_by_learning_rate(schedule))
    if name == 'adamw':
        # torch AdamW: p -= lr * (adam(g) + wd * p), decay decoupled from the moments.
        b1, b2 = optim_cfg.get('betas', (0.9, 0.999))
        return optax.adamw(schedule, b1=b1, b2=b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay, mask=mask)
    return optax.chain(optax.add_decayed_weights(optim_cfg.weight_decay, mask=mask),
                       optax.scale_by_adam(eps=optim_cfg.eps),
                       optax.scale_by_learning_rate(schedule))


def check_config(optim_cfg, global_batch=None):
    """ConfigError for a `config.optim` no optimiser or schedule can be built from: the
    optimiser, schedule and lr rule names, the warm-up, the group rates and the regexes.
    Called by `jaxad.config.validate_config` before any data is read (what needs the data,
    steps per epoch and the parameter paths, is checked by `make_optimizer`)."""
    if optim_cfg.name not in OPTIMIZERS:
        raise ConfigError(f'unknown optim.name {optim_cfg.name!r}; '
                          f'choose one of {", ".join(OPTIMIZERS)}')
    if optim_cfg.get('nesterov', False) and optim_cfg.name != 'sgd':
        raise ConfigError(f'optim.nesterov needs optim.name=sgd, not {optim_cfg.name!r}')
    if optim_cfg.schedule not in SCHEDULES:
        raise ConfigError(f'unknown optim.schedule {optim_cfg.schedule!r}; '
                          f'choose one of {", ".join(SCHEDULES)}')
    scaled_lr(optim_cfg.lr, global_batch, optim_cfg.get('lr_rule', 'none'),
              optim_cfg.get('lr_base_batch', 256))
    if optim_cfg.get('warmup_steps', 0) < 0:
        raise ConfigError(f'optim.warmup_steps must be >= 0, got {optim_cfg.warmup_steps}')
    if optim_cfg.schedule == 'csi_warmup_cosine':
        if optim_cfg.epochs <= 0:
            raise ConfigError(f'csi_warmup_cosine needs optim.epochs > 0, got {optim_cfg.epochs}')
        if optim_cfg.warmup_epochs < 0:
            raise ConfigError(f'warmup_epochs must be >= 0, got {optim_cfg.warmup_epochs}')
        if optim_cfg.warmup_multiplier < 1.0:
            raise ConfigError(f'warmup multiplier must be >= 1 (GradualWarmupScheduler), '
                              f'got {optim_cfg.warmup_multiplier}')
    groups = tuple(optim_cfg.get('group_lr', ()))
    for group in groups:
        if len(group) != 2 or not isinstance(group[0], str):
            raise ConfigError(f'optim.group_lr entries are (regex, lr) pairs, got {group!r}')
    for what, patterns in (('optim.freeze', tuple(optim_cfg.get('freeze', ()))),
                           ('optim.group_lr', tuple(g[0] for g in groups))):
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f'{what}: bad regular expression: {e}') from e


def make_optimizer(optim_cfg, steps_per_epoch, total_steps, global_batch=None, freeze=()):
    """(optax transformation, schedule) from `config.optim`.

    'lars' is CSI's torchlars SGD. 'sgd' and 'adam' mirror torch's SGD(momentum, nesterov,
    weight_decay) and Adam(weight_decay), which add wd*p to the gradient (coupled L2);
    'adamw' is torch's AdamW (decoupled decay, optim.betas). `eps` is LARS's or Adam's
    epsilon. `global_batch` feeds `optim.lr_rule`. With `optim.exclude_bn_bias` the
    one-dimensional tensors get neither weight decay nor the LARS trust ratio (their update
    is the plain momentum step). `optim.freeze` (regexes on 'encoder/layer1_0/conv1/kernel'-
    style paths) plus the method's own `freeze` patterns fix the matching parameters.
    `optim.group_lr` = ((regex, lr), ...) gives the matching parameters their own optimiser
    of the same kind at base rate lr, under the same schedule shape (ReContrast: the encoder
    at 1e-5 beside the decoder at 2e-3). The returned schedule is the main group's.
    """
    check_config(optim_cfg, global_batch)
    mask = decay_mask if optim_cfg.get('exclude_bn_bias', False) else None
    schedule = make_schedule(optim_cfg, steps_per_epoch, total_steps, global_batch)
    txs = {'train': _base_tx(optim_cfg, schedule, mask)}
    groups = tuple(optim_cfg.get('group_lr', ()))
    for i, group in enumerate(groups):
        if len(group) != 2 or not isinstance(group[0], str):
            raise ConfigError(f'optim.group_lr entries are (regex, lr) pairs, got {group!r}')
        group_cfg = optim_cfg.copy_and_resolve_references()
        group_cfg.lr = float(group[1])
        txs[f'group{i}'] = _base_tx(group_cfg, make_schedule(
            group_cfg, steps_per_epoch, total_steps, global_batch), mask)
    freeze = tuple(optim_cfg.get('freeze', ())) + tuple(freeze)
    return with_groups(txs, freeze, tuple(g[0] for g in groups)), schedule
