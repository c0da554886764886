"""Throughput of K stacked detectors vs one: the one-class table's train step.

python benchmarks/stacked_throughput.py --config=configs/quickstart.py --ks=1,10 --modes=unroll,vmap
python benchmarks/stacked_throughput.py --ks=10 --modes=vmap --single=false  # K lines only

For each K and stacking mode, K models of the config (each with its own
batch of `batch_size` images, as in `jaxad.table`) take one jitted step;
prints one JSON line per (K, mode): compile time, median step time over
`--steps` timed steps after `--warmup`, images/s over all models, the ratio
to the single-model step (K=1 through the ordinary trainer), XLA's FLOP count
of the compiled step and, where the device's peak is known (or given with
--peak_tflops), MFU, and the peak device memory (`peak_bytes_in_use`, a
high-water mark of the process, so the largest so far; null on the CPU).
Synthetic uint8 images: the cost does not depend on pixel values. Never part
of the test pass/fail.
"""
import json
import platform
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxad import loop, optim, sharding, stacking
from jaxad.methods import get_method

import timing  # benchmarks/timing.py (the script's own directory is on sys.path)

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/csi_cifar.py', 'Config file.')
_KS = flags.DEFINE_list('ks', ['1', '10'], 'Stack sizes K to time.')
_MODES = flags.DEFINE_list('modes', ['vmap', 'unroll'], 'Stacking modes (table.stack_mode).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per setting.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_PEAK = flags.DEFINE_float('peak_tflops', 0.0, 'Device peak TFLOP/s for MFU (0: by device kind).')
_SINGLE = flags.DEFINE_bool('single', True, 'Also time K = 1 through the ordinary trainer '
                            '(the base of throughput_vs_single; false: only the K lines).')


def measure(config, k, mode, steps, warmup):
    method = get_method(config)
    tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=100, total_steps=10_000,
                                        global_batch=config.batch_size)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    b = config.batch_size
    images = np.random.default_rng(0).integers(0, 256, (k, b) + shape, dtype=np.uint8)
    step = loop.make_train_step(method, tx, schedule)
    if mode == 'single':
        mesh = sharding.make_mesh(config.num_devices)
        state = loop.init_state(method, tx, jax.random.key(0), shape, mesh)
        step_fn = loop.jit_train_step(step, mesh)
        batch = sharding.to_global({'image': images[0]}, mesh)
        rng = jax.random.key(1)
    else:
        mesh = sharding.make_mesh(config.num_devices, num_models=k if mode == 'vmap' else 1)
        init = stacking.stacked(loop.make_init_fn(method, tx, shape), mode)
        keys = jax.vmap(jax.random.key)(np.arange(k, dtype=np.uint32))
        state = jax.jit(init, out_shardings=sharding.model_sharding(mesh))(keys)
        step_fn = loop.jit_stacked_step(step, mesh, mode)
        batch = sharding.to_global({'image': images}, mesh, sharding.stacked_data_sharding(mesh))
        rng = jax.device_put(keys, sharding.model_sharding(mesh))
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    step_s = timing.median_step_seconds(compiled, state, batch, rng, steps, warmup)
    flops = timing.compiled_flops(compiled)
    device = jax.devices()[0].device_kind
    peak = timing.peak_tflops(device, config.model.dtype, _PEAK.value)
    return {'config': config.method, 'k': k, 'mode': mode, 'batch_per_model': b,
            'image_size': config.data.image_size, 'width': config.model.width,
            'dtype': config.model.dtype, 'compile_s': round(compile_s, 2),
            'median_step_s': round(step_s, 4), 'images_per_s': round(k * b / step_s, 2),
            'flops_per_step': flops,
            'tflops_per_s': round(flops / step_s / 1e12, 4) if flops else None,
            'mfu': round(flops / step_s / (peak * 1e12), 4) if flops and peak else None,
            'steps_timed': steps,
            'peak_memory_bytes': timing.peak_memory_bytes(list(mesh.devices.flat)),
            'device': device, 'num_devices': mesh.devices.size,
            'mesh': dict(mesh.shape), 'jax': jax.__version__,
            'host': platform.processor() or platform.machine()}


def main(argv):
    del argv
    config = _CONFIG.value
    single = None
    if _SINGLE.value:
        single = measure(config, 1, 'single', _STEPS.value, _WARMUP.value)
        print(json.dumps(single), flush=True)
    for k in (int(x) for x in _KS.value):
        for mode in _MODES.value:
            if k == 1 and mode == 'unroll':
                continue  # one unrolled model is the single step
            r = measure(config, k, mode, _STEPS.value, _WARMUP.value)
            if single:
                r['throughput_vs_single'] = round(r['images_per_s'] / single['images_per_s'], 3)
            print(json.dumps(r), flush=True)


if __name__ == '__main__':
    app.run(main)
