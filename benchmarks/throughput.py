"""Train-step throughput of a config on the local devices; prints one JSON line per batch size.

python benchmarks/throughput.py --config=configs/csi_cifar.py --batch_sizes=32,128 --steps=20

Synthetic uint8 images of the config's size (the step's cost does not depend on
pixel values); timing follows the usual protocol: compile, warm up, then the
median of `--steps` timed steps, each ended with block_until_ready.
Never part of the test pass/fail.
"""
import json
import platform
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxad import optim, sharding, train
from jaxad.methods import get_method

import timing  # benchmarks/timing.py (the script's own directory is on sys.path)

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/csi_cifar.py', 'Config file.')
_BATCHES = flags.DEFINE_list('batch_sizes', ['32'], 'Global batch sizes (images per step).')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per batch size.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')


def measure(config, batch_size, steps, warmup):
    config.batch_size = batch_size
    mesh = sharding.make_mesh(config.num_devices)
    method = get_method(config)
    tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=100, total_steps=10_000)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    state = train.init_state(method, tx, jax.random.key(0), shape, mesh)
    step_fn = train.jit_train_step(train.make_train_step(method, tx, schedule), mesh)
    images = np.random.default_rng(0).integers(0, 256, (batch_size,) + shape, dtype=np.uint8)
    batch = sharding.to_global({'image': images}, mesh)
    rng = jax.random.key(1)

    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    step_s = timing.median_step_seconds(compiled, state, batch, rng, steps, warmup)
    views = batch_size * 2 * config.csi.num_shifts
    return {'config': _CONFIG.value.method, 'global_batch': batch_size, 'views_per_step': views,
            'image_size': config.data.image_size, 'width': config.model.width,
            'dtype': config.model.dtype, 'compile_s': round(compile_s, 2),
            'median_step_s': round(step_s, 4), 'images_per_s': round(batch_size / step_s, 2),
            'views_per_s': round(views / step_s, 1), 'steps_timed': steps,
            'device': jax.devices()[0].device_kind, 'num_devices': mesh.devices.size,
            'jax': jax.__version__, 'host': platform.processor() or platform.machine()}


def main(argv):
    del argv
    for b in _BATCHES.value:
        print(json.dumps(measure(_CONFIG.value, int(b), _STEPS.value, _WARMUP.value)), flush=True)


if __name__ == '__main__':
    app.run(main)
