"""Optimisers against NumPy written from torchlars 0.1.2 and torch SGD/Adam; CSI's schedule."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxad import optim
from jaxad.errors import ConfigError

WD, TRUST, EPS, MOMENTUM = 1e-2, 1e-3, 1e-8, 0.9
LRS = (0.5, 0.3, 0.1)


def torch_reference(params, grads_per_step, lrs, lars, apply_lars=None):
    """torchlars LARS(SGD(momentum, wd)) when lars, else plain torch SGD(momentum, wd); float64.

    torchlars hides wd from SGD and rewrites each grad: if ||p|| > 0 and ||g|| > 0,
    a = trust*||p|| / (||g|| + wd*||p|| + eps), else a = 1; g <- (g + wd*p)*a.
    torch SGD: d = g (+ wd*p if not LARS); buf = d on the first step, then momentum*buf + d;
    p -= lr*buf.
    """
    params = {k: v.astype(np.float64) for k, v in params.items()}
    bufs = {}
    for grads, lr in zip(grads_per_step, lrs):
        for k, p in params.items():
            g = grads[k].astype(np.float64)
            if lars and (apply_lars is None or apply_lars[k]):
                p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
                a = 1.0
                if p_norm > 0 and g_norm > 0:
                    a = TRUST * p_norm / (g_norm + WD * p_norm + EPS)
                g = (g + WD * p) * a
            elif not lars:
                g = g + WD * p
            bufs[k] = g if k not in bufs else MOMENTUM * bufs[k] + g
            params[k] = p - lr * bufs[k]
    return params


def make_problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {'kernel': rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
              'bias': rng.normal(size=(4,)).astype(np.float32),
              'zero_init': np.zeros((5,), np.float32),    # ||p|| = 0 on the first step -> a = 1
              'dead': rng.normal(size=(2, 3)).astype(np.float32)}  # ||g|| = 0 -> a = 1
    grads = []
    for _ in LRS:
        g = {k: (0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
        g['dead'] = np.zeros_like(g['dead'])
        grads.append(g)
    return params, grads


def run_optax(tx, params, grads_per_step):
    params = jax.tree_util.tree_map(jnp.asarray, params)
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for grads in grads_per_step:
        params, state = step(params, state, grads)
    return params


def lr_schedule(count):
    return jnp.asarray(LRS)[count]


def assert_trees_close(got, want, atol=1e-7):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=atol, err_msg=k)


def test_torchlars_sgd_matches_reference():
    params, grads = make_problem()
    got = run_optax(optim.torchlars_sgd(lr_schedule, MOMENTUM, WD, TRUST, EPS), params, grads)
    assert_trees_close(got, torch_reference(params, grads, LRS, lars=True))
    # The trust ratio matters: plain SGD ends elsewhere.
    plain = torch_reference(params, grads, LRS, lars=False)
    assert not np.allclose(got['kernel'], plain['kernel'])


def test_torchlars_sgd_constant_lr():
    params, grads = make_problem(1)
    got = run_optax(optim.torchlars_sgd(0.2, MOMENTUM, WD, TRUST, EPS), params, grads)
    assert_trees_close(got, torch_reference(params, grads, (0.2,) * 3, lars=True))


def test_mask_leaves_excluded_gradients_plain():
    params, grads = make_problem(2)
    apply = {'kernel': True, 'bias': False, 'zero_init': True, 'dead': False}
    want = torch_reference(params, grads, LRS, lars=True, apply_lars=apply)
    by_tree = optim.torchlars_sgd(lr_schedule, MOMENTUM, WD, TRUST, EPS, mask=apply)
    assert_trees_close(run_optax(by_tree, params, grads), want)
    by_fn = optim.torchlars_sgd(lr_schedule, MOMENTUM, WD, TRUST, EPS,
                                mask=lambda p: {k: k in ('kernel', 'zero_init') for k in p})
    assert_trees_close(run_optax(by_fn, params, grads), want)


def test_scale_by_torchlars_needs_params():
    tx = optim.scale_by_torchlars(WD)
    g = {'w': jnp.ones(3)}
    with pytest.raises(ValueError, match='needs params'):
        tx.update(g, tx.init(g))


def csi_lr(step, base, steps, total, warmup, mult):
    """GradualWarmupScheduler + CosineAnnealingLR at e = step/steps (docs/methods.md §2.4)."""
    e = step / steps
    if warmup > 0 and e <= warmup:
        return base * e / warmup if mult == 1.0 else base * ((mult - 1) * e / warmup + 1)
    return base * mult * (1 + math.cos(math.pi * (e - warmup) / total)) / 2


@pytest.mark.parametrize('warmup,mult', [(10, 10.0), (3, 2.5), (0, 10.0), (4, 1.0)])
def test_csi_warmup_cosine_formula(warmup, mult):
    base, steps, total = 0.1, 7, 50
    sched = optim.csi_warmup_cosine(base, steps, total, warmup, mult)
    jitted = jax.jit(sched)
    for step in [0, 1, 3, 6, 7, 13, warmup * steps - 1, warmup * steps, warmup * steps + 1,
                 200, total * steps - 1, total * steps]:
        step = max(step, 0)
        want = csi_lr(step, base, steps, total, warmup, mult)
        got = jitted(jnp.int32(step))
        assert got.dtype == jnp.float32
        for value in (got, sched(step)):
            np.testing.assert_allclose(float(value), want, rtol=1e-5, atol=1e-8,
                                       err_msg=f'step {step}')


def test_csi_warmup_cosine_landmarks():
    base, steps, total, warmup, mult = 0.1, 390, 1000, 10, 10.0
    sched = optim.csi_warmup_cosine(base, steps, total, warmup, mult)
    assert float(sched(0)) == pytest.approx(base)
    assert float(sched(warmup * steps)) == pytest.approx(base * mult)  # the peak, 1.0 for CSI
    assert float(sched(warmup * steps + 1)) == pytest.approx(base * mult, rel=1e-6)  # continuous
    end = base * mult * (1 + math.cos(math.pi * (total - warmup) / total)) / 2
    assert float(sched(total * steps)) == pytest.approx(end, rel=1e-3)
    assert 2e-4 < end < 3e-4  # never 0: T_max = epochs, evaluated at e - warmup
    no_warmup = optim.csi_warmup_cosine(base, steps, total, 0, mult)
    assert float(no_warmup(0)) == pytest.approx(base * mult)
    assert float(optim.csi_warmup_cosine(base, steps, total, warmup, 1.0)(0)) == 0.0


@pytest.mark.parametrize('args,match', [((0.1, 0, 10), 'steps_per_epoch'),
                                        ((0.1, 5, 10, -1), 'warmup_epochs'),
                                        ((0.1, 5, 10, 2, 0.5), 'multiplier')])
def test_csi_warmup_cosine_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        optim.csi_warmup_cosine(*args)


def optim_cfg(**overrides):
    c = ml_collections.ConfigDict(dict(
        name='lars', lr=0.1, momentum=MOMENTUM, weight_decay=WD, trust_coef=TRUST, eps=EPS,
        schedule='constant', warmup_epochs=10, warmup_multiplier=10.0, epochs=100))
    c.update(overrides)
    return c


def test_make_optimizer_lars_and_sgd():
    params, grads = make_problem(3)
    tx, sched = optim.make_optimizer(optim_cfg(name='lars'), 10, 1000)
    assert float(sched(5)) == pytest.approx(0.1)
    assert_trees_close(run_optax(tx, params, grads),
                       torch_reference(params, grads, (0.1,) * 3, lars=True))
    tx, _ = optim.make_optimizer(optim_cfg(name='sgd'), 10, 1000)
    assert_trees_close(run_optax(tx, params, grads),
                       torch_reference(params, grads, (0.1,) * 3, lars=False))


def test_make_optimizer_schedules():
    _, sched = optim.make_optimizer(optim_cfg(schedule='csi_warmup_cosine'), 10, 1000)
    assert float(sched(100)) == pytest.approx(1.0)  # e = warmup = 10 -> base * multiplier
    _, sched = optim.make_optimizer(optim_cfg(schedule='cosine', name='adam'), 10, 1000)
    assert float(sched(0)) == pytest.approx(0.1)
    assert float(sched(500)) == pytest.approx(0.05)
    assert float(sched(1000)) == pytest.approx(0.0, abs=1e-9)


def test_adam_is_torch_adam_with_l2():
    """torch Adam(weight_decay): g += wd*p; p -= lr*m_hat/(sqrt(v_hat) + eps)."""
    params, grads = make_problem(4)
    tx, _ = optim.make_optimizer(optim_cfg(name='adam'), 10, 1000)
    want = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: 0.0 for k in want}
    v = {k: 0.0 for k in want}
    for t, g_step in enumerate(grads, start=1):
        for k in want:
            g = g_step[k] + WD * want[k]
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.999 * v[k] + 0.001 * g * g
            m_hat, v_hat = m[k] / (1 - 0.9 ** t), v[k] / (1 - 0.999 ** t)
            want[k] = want[k] - 0.1 * m_hat / (np.sqrt(v_hat) + EPS)
    # Adam's first steps are ~lr*sign(g): float32 rounding shows at 1e-6 absolute.
    assert_trees_close(run_optax(tx, params, grads), want, atol=1e-5)


def test_adamw_groups_and_method_freeze_match_torch_adamw():
    """torch AdamW with two param groups (ReContrast: decoder 2e-3, encoder 1e-5):
    p -= lr*wd*p; p -= lr*m_hat/(sqrt(v_hat) + eps); frozen params exactly unchanged."""
    params, grads = make_problem(5)
    cfg = optim_cfg(name='adamw', lr=0.1, betas=(0.8, 0.99),
                    group_lr=(('^(kernel|zero)', 0.003),))
    tx, sched = optim.make_optimizer(cfg, 10, 1000, freeze=('^dead$',))
    assert float(sched(3)) == pytest.approx(0.1)
    lrs = {'kernel': 0.003, 'zero_init': 0.003, 'bias': 0.1}
    want = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: 0.0 for k in lrs}
    v = {k: 0.0 for k in lrs}
    for t, g_step in enumerate(grads, start=1):
        for k, lr in lrs.items():
            g = g_step[k].astype(np.float64)
            want[k] = want[k] * (1 - lr * WD)
            m[k] = 0.8 * m[k] + 0.2 * g
            v[k] = 0.99 * v[k] + 0.01 * g * g
            m_hat, v_hat = m[k] / (1 - 0.8 ** t), v[k] / (1 - 0.99 ** t)
            want[k] = want[k] - lr * m_hat / (np.sqrt(v_hat) + EPS)
    got = run_optax(tx, params, grads)
    assert_trees_close(got, want, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got['dead']), params['dead'])
    # The frozen tensor has no optimiser state; the two groups have their own moments.
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(tx.init(params)) if x.ndim)
    assert n_state == 2 * sum(params[k].size for k in lrs)
    with pytest.raises(ConfigError, match=r"optim.group_lr pattern '\^decoder' matches no"):
        optim.make_optimizer(optim_cfg(name='adamw', group_lr=(('^decoder', 1.0),)),
                             10, 1000)[0].init(params)
    with pytest.raises(ConfigError, match='optim.group_lr entries are'):
        optim.make_optimizer(optim_cfg(name='adamw', group_lr=(('^kernel',),)), 10, 1000)


@pytest.mark.parametrize('field,value,choices', [
    ('name', 'lamb', 'lars, sgd, adam, adamw'),
    ('schedule', 'step', 'csi_warmup_cosine, warmup_cosine, cosine, constant')])
def test_make_optimizer_unknown_choice(field, value, choices):
    with pytest.raises(ConfigError, match=f"optim.{field} '{value}'.*{choices}"):
        optim.make_optimizer(optim_cfg(**{field: value}), 10, 1000)


@pytest.mark.parametrize('rule,batch,want', [('none', 4096, 0.3), ('linear', 256, 0.3),
                                             ('linear', 4096, 0.3 * 16), ('sqrt', 4096, 0.3 * 4),
                                             ('sqrt', 64, 0.3 / 2), ('linear', 128, 0.15)])
def test_lr_rules(rule, batch, want):
    assert optim.scaled_lr(0.3, batch, rule) == pytest.approx(want)
    _, sched = optim.make_optimizer(optim_cfg(lr=0.3, lr_rule=rule, lr_base_batch=256), 10, 100,
                                    global_batch=batch)
    assert float(sched(7)) == pytest.approx(want)


def test_lr_rule_errors():
    with pytest.raises(ConfigError, match='lr_rule'):
        optim.scaled_lr(0.1, 256, 'cubic')
    with pytest.raises(ConfigError, match='global batch'):
        optim.make_optimizer(optim_cfg(lr_rule='linear', lr_base_batch=256), 10, 100)


def test_exclude_bn_bias_masks_decay_and_lars():
    """exclude_bn_bias: 1-d tensors take the plain momentum step (no wd, no trust ratio)."""
    params, grads = make_problem(5)
    cfg = optim_cfg(name='lars', exclude_bn_bias=True)
    tx, _ = optim.make_optimizer(cfg, 10, 1000)
    got = run_optax(tx, params, grads)
    apply = {k: v.ndim > 1 for k, v in params.items()}
    assert apply == {'kernel': True, 'bias': False, 'zero_init': False, 'dead': True}
    want = torch_reference(params, grads, (0.1,) * 3, lars=True, apply_lars=apply)
    assert_trees_close(got, want)
    # Without the flag the bias gets the LARS rewrite: a different end point.
    tx_all, _ = optim.make_optimizer(optim_cfg(name='lars'), 10, 1000)
    assert not np.allclose(run_optax(tx_all, params, grads)['bias'], want['bias'])
    # SGD: the bias is not decayed; the kernel is.
    tx, _ = optim.make_optimizer(optim_cfg(name='sgd', exclude_bn_bias=True), 10, 1000)
    got = run_optax(tx, params, grads)
    ref = {k: v.astype(np.float64) for k, v in params.items()}
    bufs = {}
    for g_step in grads:
        for k in ref:
            g = g_step[k] + (WD * ref[k] if apply[k] else 0.0)
            bufs[k] = g if k not in bufs else MOMENTUM * bufs[k] + g
            ref[k] = ref[k] - 0.1 * bufs[k]
    assert_trees_close(got, ref)


def test_decay_mask_on_resnet_params():
    from jaxad.config import csi_base
    from jaxad.methods import get_method
    c = csi_base()
    c.model.width = 4
    variables = get_method(c).init_variables(jax.random.key(0), (8, 8, 3))
    mask = jax.tree_util.tree_leaves_with_path(optim.decay_mask(variables['params']))
    names = {jax.tree_util.keystr(path): m for path, m in mask}
    assert all(m for n, m in names.items() if n.endswith("['kernel']"))
    assert not any(m for n, m in names.items() if n.endswith("['bias']") or
                   n.endswith("['scale']"))


def test_warmup_steps_override_epochs():
    # csi_warmup_cosine: 25 warm-up steps at 10 steps/epoch = 2.5 epochs.
    cfg = optim_cfg(schedule='csi_warmup_cosine', warmup_steps=25, warmup_epochs=10)
    _, sched = optim.make_optimizer(cfg, 10, 1000)
    ref = optim.csi_warmup_cosine(0.1, 10, 100, 2.5, 10.0)
    for step in (0, 10, 24, 25, 26, 300):
        assert float(sched(step)) == pytest.approx(float(ref(step)), rel=1e-6)
    assert float(sched(25)) == pytest.approx(1.0)
    assert optim.warmup_steps(cfg, 10) == 25
    assert optim.warmup_steps(optim_cfg(warmup_epochs=3), 10) == 30


def test_warmup_length_and_schedule_description():
    """What the loop logs of a run's schedule comes from optim: the warm-up length of the
    schedules that have one (None otherwise) and the rates at step 0 and after it."""
    assert optim.warmup_length(optim_cfg(schedule='csi_warmup_cosine', warmup_epochs=3), 10) == 30
    assert optim.warmup_length(optim_cfg(schedule='warmup_cosine', warmup_steps=7), 10) == 7
    assert optim.warmup_length(optim_cfg(schedule='cosine'), 10) is None
    assert optim.warmup_length(optim_cfg(schedule='constant'), 10) is None
    cfg = optim_cfg(schedule='csi_warmup_cosine', warmup_epochs=2, lr_rule='none')
    _, sched = optim.make_optimizer(cfg, 10, 1000)
    assert optim.describe_schedule(cfg, sched, 10) == \
        'lr rule none: base lr 0.1 -> 0.1 at step 0, 1 after warm-up'
    cfg = optim_cfg(schedule='constant', lr_rule='none')
    _, sched = optim.make_optimizer(cfg, 10, 1000)
    assert optim.describe_schedule(cfg, sched, 10) == 'lr rule none: base lr 0.1 -> 0.1 at step 0'


def test_warmup_cosine_schedule():
    """SimCLR: linear 0 -> peak over the warm-up, then cosine to 0 at the last step."""
    cfg = optim_cfg(schedule='warmup_cosine', lr=0.2, warmup_steps=10, lr_rule='linear',
                    lr_base_batch=256)
    _, sched = optim.make_optimizer(cfg, 5, 110, global_batch=512)
    peak = 0.4
    assert float(sched(0)) == pytest.approx(0.0, abs=1e-9)
    assert float(sched(5)) == pytest.approx(peak / 2)
    assert float(sched(10)) == pytest.approx(peak)
    assert float(sched(60)) == pytest.approx(peak * (1 + math.cos(math.pi * 0.5)) / 2, rel=1e-5)
    assert float(sched(110)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ConfigError, match='warmup_steps'):
        optim.make_optimizer(optim_cfg(schedule='warmup_cosine', warmup_steps=-1), 5, 10)
