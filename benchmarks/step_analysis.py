"""FLOPs and memory of the compiled train step, from abstract shapes (nothing is run).

python benchmarks/step_analysis.py --config=configs/csi_cifar.py --batch_sizes=32,512 \
    --conv_impls=xla,auto --stack_k=10 --stack_batch_sizes=32,128

The step is the trainer's own: `jaxad.loop.make_train_step` jitted by
`jaxad.loop.jit_train_step` on a one-device mesh (`--num_devices`), lowered with
`jax.ShapeDtypeStruct` arguments (state shapes from `jax.eval_shape` of the trainer's
init function), so no state or batch is ever materialised; `.compile()` then gives
XLA's `cost_analysis()` and `memory_analysis()`. One JSON line per result:

  kind=step   per (batch, conv_impl): XLA's FLOPs of the whole step (after and before
              XLA's optimisations), the analytic count (`benchmarks/flops.py`: 3 x the
              forward's convolution and dense FLOPs over B x 2 x K views) in both of its
              conventions ('dense': padding taps counted, the usual convention; 'valid':
              XLA's own convention for convolutions), their ratios, and the compiled
              program's memory (argument, output, alias, temp, generated code; total =
              argument + output - alias + temp + generated code) against one 80 GiB H100
              and one 16 GiB TPU v5e.
  kind=piece  (--breakdown, CSI-family methods) the same step compiled in pieces:
              augmentation, network forward, network forward + backward (with the loss),
              the loss alone (forward, and forward + backward), the optimiser update;
              each piece's XLA FLOPs and its share of the whole step.
  kind=stack  (--stack_k > 0) the one-class table's stacked step (`jaxad.table.
              jit_stacked_step`, `--stack_mode`, default vmap as on accelerators) at K=1 and
              K=stack_k members: memory, the per-member slope and the largest K that fits
              each device (`largest_stack`).

Memory from XLA:CPU's buffer assignment approximates an accelerator's: the GPU and TPU
compilers fuse, lay out and schedule differently, so treat the bytes as an estimate of
the order of magnitude to check before a device is lent, not as the device's figure.
Never part of the test pass/fail (tests/test_benchmark_scripts.py only checks it runs).
"""
import json
import os
import platform
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from jaxad import loop, optim, sharding, stacking
from jaxad.methods import csi, get_method
from jaxad.models.resnet import ARCHS, STAGE_SIZES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flops as flops_lib  # noqa: E402  benchmarks/flops.py
from flops import largest_stack  # noqa: E402,F401  (the memory rule lives there too)

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/csi_cifar.py', 'Config file.')
_BATCHES = flags.DEFINE_list('batch_sizes', ['32', '512'], 'Images per step (one device).')
_IMPLS = flags.DEFINE_list('conv_impls', ['xla', 'auto'], 'model.conv_impl values to compile.')
_BREAKDOWN = flags.DEFINE_bool('breakdown', True, 'Also compile the step in pieces.')
_STACK_K = flags.DEFINE_integer('stack_k', 10, 'Members of the stacked table step (0: skip).')
_STACK_BATCHES = flags.DEFINE_list('stack_batch_sizes', ['32'],
                                   'Images per member per step for the stacked step.')
_STACK_MODE = flags.DEFINE_enum('stack_mode', 'vmap', ['vmap', 'unroll'],
                                'Stacking mode of the table step (vmap: the accelerators\').')
_STACK_IMPL = flags.DEFINE_string('stack_conv_impl', 'xla', 'model.conv_impl of the stack.')
_NUM_DEVICES = flags.DEFINE_integer('num_devices', 1, 'Devices of the mesh.')

GIB = 2 ** 30
# Per-device memory: H100 80GB (80 GiB HBM3) and TPU v5e (16 GiB HBM2e).
DEVICES = {'h100_80GiB': 80 * GIB, 'tpu_v5e_16GiB': 16 * GIB}
# JAX on a GPU preallocates this fraction of the memory (XLA_PYTHON_CLIENT_MEM_FRACTION).
GPU_USABLE_FRACTION = 0.75


def versions():
    from importlib.metadata import version
    return {'device': jax.devices()[0].device_kind, 'platform': jax.default_backend(),
            'jax': jax.__version__, 'jaxlib': version('jaxlib'), 'flax': flax.__version__,
            'grain': version('grain'),
            'host': platform.processor() or platform.machine(),
            'cpu_count': len(os.sched_getaffinity(0))}


def memory(compiled):
    """Bytes of a compiled program (`memory_analysis()`), with a total and device fits."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {'memory_error': 'no memory_analysis on this backend'}
    names = ('argument', 'output', 'alias', 'temp', 'generated_code')
    out = {f'{n}_bytes': int(getattr(stats, f'{n}_size_in_bytes', 0) or 0) for n in names}
    out['total_bytes'] = (out['argument_bytes'] + out['output_bytes'] - out['alias_bytes']
                          + out['temp_bytes'] + out['generated_code_bytes'])
    out['total_GiB'] = round(out['total_bytes'] / GIB, 3)
    for name, cap in DEVICES.items():
        out[f'fits_{name}'] = out['total_bytes'] <= cap
    out['fits_h100_80GiB_at_75pct'] = out['total_bytes'] <= GPU_USABLE_FRACTION * DEVICES[
        'h100_80GiB']
    return out


def xla_flops(compiled_or_lowered):
    try:
        cost = compiled_or_lowered.cost_analysis()
    except Exception:  # best effort on some backends
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost:
        return None
    return float(cost.get('flops', 0.0)) or None


def image_shape(config):
    return (config.data.image_size, config.data.image_size, config.data.channels)


def build(config, batch_size, conv_impl):
    """(method, tx, schedule) as `loop.Run._build` makes them, for `batch_size` images."""
    config = config.copy_and_resolve_references()
    config.batch_size = batch_size
    config.model.conv_impl = conv_impl
    config.num_devices = _NUM_DEVICES.value
    method = get_method(config)
    tx, schedule = optim.make_optimizer(config.optim, 100, 10_000, batch_size,
                                        freeze=method.frozen_params)
    return config, method, tx, schedule


def abstract(tree, where):
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where), tree)


def batch_shapes(method, lead, shape, where):
    """Abstract training batch of the method's inputs, leading dims `lead`."""
    batch = {'image': jax.ShapeDtypeStruct(lead + shape, jnp.uint8, sharding=where)}
    if 'label' in method.inputs:
        batch['label'] = jax.ShapeDtypeStruct(lead, jnp.int32, sharding=where)
    if 'outlier' in method.inputs:
        batch['outlier'] = jax.ShapeDtypeStruct(lead + shape, jnp.uint8, sharding=where)
    return batch


def compile_step(method, tx, schedule, config, batch_size):
    """The trainer's jitted step lowered and compiled on abstract arguments."""
    mesh = sharding.make_mesh(config.num_devices)
    shape = image_shape(config)
    repl = sharding.replicated(mesh)
    state = abstract(jax.eval_shape(loop.make_init_fn(method, tx, shape),
                                    loop.init_key(config.seed)), repl)
    batch = batch_shapes(method, (batch_size,), shape, sharding.data_sharding(mesh))
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
    step = loop.jit_train_step(loop.make_train_step(method, tx, schedule), mesh)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch, rng)
    compiled = lowered.compile()
    return lowered, compiled, time.perf_counter() - t0, state


def analytic(config, batch_size):
    """flops.csi_step_flops for the config's network, or None for a network it does not
    count (Bottleneck ResNets, the ImageNet stem)."""
    depth, _ = ARCHS.get(config.model.name, (None, None))
    if depth not in STAGE_SIZES or config.model.stem != 'cifar':
        return None
    kw = dict(num_shifts=config.csi.num_shifts, depth=depth, width=config.model.width,
              image_size=config.data.image_size, in_channels=config.data.channels,
              proj_dim=config.model.proj_dim)
    dense = flops_lib.csi_step_flops(batch_size, count='dense', **kw)
    valid = flops_lib.csi_step_flops(batch_size, count='valid', **kw)
    return dense, valid


def step_line(config, method, tx, schedule, batch_size, conv_impl):
    lowered, compiled, compile_s, state = compile_step(method, tx, schedule, config,
                                                       batch_size)
    flops = xla_flops(compiled)
    out = {'kind': 'step', 'config': config.method, 'batch_size': batch_size,
           'conv_impl': conv_impl,
           'conv_impl_resolved': ('matmul_dw' if conv_impl == 'matmul_dw' or (
               conv_impl == 'auto' and jax.default_backend() == 'cpu') else 'xla'),
           'views': batch_size * 2 * config.csi.num_shifts, 'model': config.model.name,
           'width': config.model.width, 'image_size': config.data.image_size,
           'dtype': config.model.dtype, 'compile_s': round(compile_s, 2),
           'xla_flops': flops, 'xla_flops_unoptimised_hlo': xla_flops(lowered),
           'num_params': int(sum(np.prod(x.shape) for x in
                                 jax.tree_util.tree_leaves(state.params)))}
    counts = analytic(config, batch_size)
    if counts is not None:
        dense, valid = counts
        out.update(analytic_forward_per_view_dense=dense['forward_per_view'],
                   analytic_forward_per_view_valid=valid['forward_per_view'],
                   analytic_step_dense=dense['step_3x_forward'],
                   analytic_step_valid=valid['step_3x_forward'],
                   analytic_first_layer_dx_dense=dense['first_layer_dx'],
                   analytic_elementwise_forward_estimate=dense['elementwise_forward_estimate'])
        if flops:
            out['ratio_xla_over_analytic_dense'] = round(flops / dense['step_3x_forward'], 4)
            out['ratio_xla_over_analytic_valid'] = round(flops / valid['step_3x_forward'], 4)
    out.update(memory(compiled))
    return out, compiled


def piece_lines(config, method, tx, batch_size, step_flops):
    """The step compiled in pieces (CSI-family methods: `csi.train_views` + CSINet)."""
    shape = image_shape(config)
    k = method.num_shifts
    n = batch_size * 2 * k
    init = loop.make_init_fn(method, tx, shape)
    state = jax.eval_shape(init, loop.init_key(config.seed))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    images = jax.ShapeDtypeStruct((batch_size,) + shape, jnp.uint8)
    views = jax.ShapeDtypeStruct((n,) + shape, jnp.float32)
    out_shapes = jax.eval_shape(
        lambda p, s, v: method.model.apply({'params': p, 'batch_stats': s}, v, train=True,
                                           mutable=['batch_stats'])[0],
        state.params, state.batch_stats, views)
    cfg, lcfg = config.csi, config.loss

    def augment(key, images):
        return csi.train_views(key, images, k, method.train_aug)

    def forward(params, stats, views):
        return method.model.apply({'params': params, 'batch_stats': stats}, views,
                                  train=True, mutable=['batch_stats'])

    def loss_from_outputs(proj, logits):
        return csi.loss_and_aux({'proj': proj, 'shift_logits': logits}, batch_size, k,
                                cfg.temperature, cfg.shift_weight, cfg.eps, lcfg.nt_xent,
                                lcfg.key_block)[0]

    def net_loss(params, stats, views):
        out, mutated = forward(params, stats, views)
        return loss_from_outputs(out['proj'], out['shift_logits']), mutated

    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)

    proj, logits = out_shapes['proj'], out_shapes['shift_logits']
    pieces = {
        'augment': (augment, (key, images)),
        'forward': (forward, (state.params, state.batch_stats, views)),
        'forward_backward_with_loss': (jax.value_and_grad(net_loss, has_aux=True),
                                       (state.params, state.batch_stats, views)),
        'loss_forward': (loss_from_outputs, (proj, logits)),
        'loss_forward_backward': (jax.value_and_grad(loss_from_outputs, argnums=(0, 1)),
                                  (proj, logits)),
        'optimizer_update': (update, (state.params, state.opt_state, state.params)),
    }
    lines = []
    for name, (fn, args) in pieces.items():
        compiled = jax.jit(fn).lower(*args).compile()
        f = xla_flops(compiled)
        lines.append({'kind': 'piece', 'piece': name, 'batch_size': batch_size,
                      'conv_impl': config.model.conv_impl, 'views': n, 'xla_flops': f,
                      'share_of_step': round(f / step_flops, 5) if f and step_flops else None})
    by = {r['piece']: r['xla_flops'] or 0.0 for r in lines}
    total = by['augment'] + by['forward_backward_with_loss'] + by['optimizer_update']
    lines.append({'kind': 'piece', 'piece': 'sum(augment, forward_backward_with_loss, '
                  'optimizer_update)', 'batch_size': batch_size,
                  'conv_impl': config.model.conv_impl, 'xla_flops': total,
                  'share_of_step': round(total / step_flops, 5) if step_flops else None,
                  'network_backward_over_forward': round(
                      (by['forward_backward_with_loss'] - by['loss_forward_backward']
                       - by['forward']) / by['forward'], 4) if by['forward'] else None})
    return lines


def stack_memory(config, method, tx, schedule, k, batch_size, mode):
    """memory() of the table's stacked step with k members of `batch_size` images."""
    mesh = sharding.make_mesh(config.num_devices, num_models=k if mode == 'vmap' else 1)
    shape = image_shape(config)
    models = sharding.model_sharding(mesh)
    keys = jax.vmap(loop.init_key)(np.full(k, config.seed, np.uint32))
    init = stacking.stacked(loop.make_init_fn(method, tx, shape), mode)
    state = abstract(jax.eval_shape(init, keys), models)
    batch = batch_shapes(method, (k, batch_size), shape, sharding.stacked_data_sharding(mesh))
    rng = jax.ShapeDtypeStruct((k,), jax.random.key(0).dtype, sharding=models)
    step = loop.jit_stacked_step(loop.make_train_step(method, tx, schedule), mesh, mode)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    return dict(memory(compiled), compile_s=round(time.perf_counter() - t0, 2),
                xla_flops=xla_flops(compiled))


def stack_lines(config, k, batch_size, mode, conv_impl):
    config, method, tx, schedule = build(config, batch_size, conv_impl)
    one = stack_memory(config, method, tx, schedule, 1, batch_size, mode)
    many = stack_memory(config, method, tx, schedule, k, batch_size, mode)
    slope = (many['total_bytes'] - one['total_bytes']) / (k - 1) if k > 1 else \
        one['total_bytes']
    fixed = max(0.0, one['total_bytes'] - slope)
    line = {'kind': 'stack', 'config': config.method, 'mode': mode, 'conv_impl': conv_impl,
            'batch_per_member': batch_size, 'k': k, 'k1': one, f'k{k}': many,
            'per_member_bytes': int(slope), 'fixed_bytes': int(fixed),
            'per_member_GiB': round(slope / GIB, 3)}
    for name, cap in DEVICES.items():
        line[f'largest_k_{name}'] = largest_stack(slope, cap, fixed)
    line['largest_k_h100_80GiB_at_75pct'] = largest_stack(slope, DEVICES['h100_80GiB'], fixed,
                                                          GPU_USABLE_FRACTION)
    return line


def main(argv):
    del argv
    base = _CONFIG.value
    meta = versions()
    for b in (int(x) for x in _BATCHES.value):
        for impl in _IMPLS.value:
            config, method, tx, schedule = build(base, b, impl)
            line, _ = step_line(config, method, tx, schedule, b, impl)
            print(json.dumps(dict(line, **meta)), flush=True)
            if _BREAKDOWN.value and isinstance(method, csi.CSI):
                for piece in piece_lines(config, method, tx, b, line['xla_flops']):
                    print(json.dumps(dict(piece, **meta)), flush=True)
    if _STACK_K.value > 0:
        for b in (int(x) for x in _STACK_BATCHES.value):
            line = stack_lines(base, _STACK_K.value, b, _STACK_MODE.value, _STACK_IMPL.value)
            print(json.dumps(dict(line, **meta)), flush=True)


if __name__ == '__main__':
    app.run(main)
