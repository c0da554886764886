"""Where a CSI train step's time goes, and what XLA options change it (CPU or any device).

python benchmarks/profile_cpu.py --config=configs/csi_cifar.py --batch_size=128 --steps=5 \
    --variants=default,onednn,fast_math

For each variant (a set of XLA_FLAGS / jax options, each run in a fresh process because
XLA reads its flags once) it times, compiled and then as the median of `--steps` runs:
  augment   the views alone (B images -> B x 2 x K augmented views, `csi.train_views`)
  fwd       the network forward in training mode on ready-made views
  fwd_bwd   forward + backward (loss and gradients) on ready-made views
  step      the whole train step (augmentation, forward, backward, LARS update)
and prints one JSON line per variant with each part's seconds and share of the step.
`--trace_dir` also writes a jax.profiler trace of a few steps (open with Perfetto/XProf).
Never part of the test pass/fail.
"""
import json
import os
import subprocess
import sys

VARIANTS = {
    'default': '',
    # oneDNN convolutions/matmuls through XLA's custom calls where this jaxlib has them.
    'onednn': '--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true',
    'xnnpack': '--xla_cpu_use_xnnpack=true',
    'fast_math': '--xla_cpu_enable_fast_math=true',
    'no_thunks': '--xla_cpu_use_thunk_runtime=false',
}


def child(args):
    """Runs in the fresh process: time the parts of one step."""
    import statistics
    import time

    import jax
    import numpy as np

    from jaxad import loop, optim
    from jaxad.methods import csi, get_method
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import importlib.util
    spec = importlib.util.spec_from_file_location('cfg', args['config'].split(':')[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    arg = args['config'].split(':', 1)[1] if ':' in args['config'] else None
    config = module.get_config(arg) if arg else module.get_config()
    for key, value in args['overrides'].items():
        target = config
        *parents, leaf = key.split('.')
        for p in parents:
            target = target[p]
        target[leaf] = type(target[leaf])(value)
    b = args['batch_size']
    config.batch_size = b
    method = get_method(config)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    tx, schedule = optim.make_optimizer(config.optim, 100, 10_000, global_batch=b)
    state = jax.jit(loop.make_init_fn(method, tx, shape))(jax.random.key(0))
    images = np.random.default_rng(0).integers(0, 256, (b,) + shape, dtype=np.uint8)
    key = jax.random.key(1)

    augment = jax.jit(lambda k, x: csi.train_views(k, x, method.num_shifts, method.train_aug))
    views = augment(key, images)

    def forward(params, stats, views):
        return method.model.apply({'params': params, 'batch_stats': stats}, views, train=True,
                                  mutable=['batch_stats'])[0]['proj']

    def loss(params, stats, views):
        out, _ = method.model.apply({'params': params, 'batch_stats': stats}, views,
                                    train=True, mutable=['batch_stats'])
        return csi.loss_and_aux(out, b, method.num_shifts, 0.5, 1.0)[0]

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.value_and_grad(loss))
    step = jax.jit(loop.make_train_step(method, tx, schedule))
    parts = {'augment': (augment, (key, images)),
             'fwd': (fwd, (state.params, state.batch_stats, views)),
             'fwd_bwd': (fwd_bwd, (state.params, state.batch_stats, views)),
             'step': (step, (state, {'image': images}, key))}
    out = {'variant': args['variant'], 'xla_flags': os.environ.get('XLA_FLAGS', ''),
           'batch_size': b, 'views': int(views.shape[0]), 'image_size': shape[0],
           'width': config.model.width, 'dtype': config.model.dtype,
           'device': jax.devices()[0].device_kind, 'jax': jax.__version__}
    for name, (fn, fn_args) in parts.items():
        t0 = time.perf_counter()
        compiled = fn.lower(*fn_args).compile()
        out[f'{name}_compile_s'] = round(time.perf_counter() - t0, 2)
        jax.block_until_ready(compiled(*fn_args))  # warm-up
        times = []
        for _ in range(args['steps']):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*fn_args))
            times.append(time.perf_counter() - t0)
        out[f'{name}_s'] = round(statistics.median(times), 4)
    for name in ('augment', 'fwd', 'fwd_bwd'):
        out[f'{name}_share'] = round(out[f'{name}_s'] / out['step_s'], 3)
    out['images_per_s'] = round(b / out['step_s'], 2)
    if args.get('trace_dir'):
        with jax.profiler.trace(os.path.join(args['trace_dir'], args['variant'])):
            for _ in range(3):
                jax.block_until_ready(parts['step'][0](*parts['step'][1]))
    print(json.dumps(out), flush=True)


def main():
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', default='configs/csi_cifar.py')
    p.add_argument('--batch_size', type=int, default=128)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--variants', default='default')
    p.add_argument('--override', action='append', default=[],
                   help='config field=value, e.g. model.width=16 (repeatable)')
    p.add_argument('--trace_dir', default='')
    p.add_argument('--_child', default='', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        return child(json.loads(a._child))
    for variant in a.variants.split(','):
        flags = VARIANTS[variant] if variant in VARIANTS else variant
        env = dict(os.environ, XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') + ' ' + flags).strip())
        spec = dict(config=a.config, batch_size=a.batch_size, steps=a.steps, variant=variant,
                    trace_dir=a.trace_dir,
                    overrides=dict(o.split('=', 1) for o in a.override))
        proc = subprocess.run([sys.executable, __file__, '--_child', json.dumps(spec)], env=env,
                              capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith('{')]
        if proc.returncode or not lines:
            print(json.dumps({'variant': variant, 'xla_flags': flags,
                              'error': (proc.stderr.strip().splitlines() or ['?'])[-1]}),
                  flush=True)
        else:
            print(lines[-1], flush=True)


if __name__ == '__main__':
    main()
