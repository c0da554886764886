"""Train-step throughput of a config on the local devices; prints one JSON line per batch size.

python benchmarks/throughput.py --config=configs/csi_cifar.py --batch_sizes=32,128 --steps=20
python benchmarks/throughput.py --config=configs/csi_cifar.py --config.model.dtype=bfloat16 \
    --batch_sizes=128,512 --torch=true

Synthetic uint8 images of the config's size (the step's cost does not depend on
pixel values); timing follows the usual protocol: compile, warm up, then the
median of `--steps` timed steps, each ended with block_until_ready.

Each line: compile time, median step time, source images/s and augmented views/s
(B x 2 views x K rotations), XLA's FLOP count of the compiled step (one device's
share: the cost analysis of an SPMD program is per partition), the achieved TFLOP/s
per device and the MFU (FLOPs / step time / one device's peak, from
`timing.PEAK_TFLOPS` by device kind and model dtype, or --peak_tflops), and the
peak device memory (`peak_bytes_in_use`; null where the backend keeps no stats,
e.g. the CPU; a high-water mark of the process, so with several batch sizes it
is the largest so far).

--torch (auto: when torch is importable) also times `torch_reference.py`, the same
CSI step in plain PyTorch (bf16 autocast + channels_last on CUDA), at the same
batch, image size, width, shifts and loss/optimiser settings, and adds its
images/s and the ratio jaxad/PyTorch. PyTorch runs in a child process *before*
JAX touches the device: JAX preallocates most of a GPU's memory, and one process
loading both frameworks' CUDA libraries can fail on mismatched cuDNN versions.
Never part of the test pass/fail.
"""
import importlib.util
import json
import os
import platform
import subprocess
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from jaxad.methods import csi

import timing  # benchmarks/timing.py (the script's own directory is on sys.path)

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/csi_cifar.py', 'Config file.')
_BATCHES = flags.DEFINE_list('batch_sizes', ['32'], 'Global batch sizes (images per step).')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per batch size.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_PEAK = flags.DEFINE_float('peak_tflops', 0.0, 'Peak TFLOP/s of one device for the MFU '
                           '(0: timing.PEAK_TFLOPS by device kind and model dtype).')
_TORCH = flags.DEFINE_enum('torch', 'auto', ['auto', 'true', 'false'],
                           'Also time benchmarks/torch_reference.py (auto: if torch imports).')
_TORCH_DEVICE = flags.DEFINE_string('torch_device', '', 'torch device (default: cuda if '
                                    'available, else cpu).')

_HERE = os.path.dirname(os.path.abspath(__file__))


def measure(config, batch_size, steps, warmup):
    built = timing.compiled_train_step(config, batch_size)
    mesh, method, state, images = built.mesh, built.method, built.state, built.images
    batch, rng, compiled, compile_s = built.batch, built.rng, built.compiled, built.compile_s
    num_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(state.params))
    shape = images.shape[1:]
    step_s = timing.median_step_seconds(compiled, state, batch, rng, steps, warmup)
    flops = timing.compiled_flops(compiled)
    views = batch_size * 2 * config.csi.num_shifts
    view_shape = jax.eval_shape(
        lambda k, x: csi.train_views(k, x, method.num_shifts, method.train_aug),
        rng, jax.ShapeDtypeStruct(images.shape, images.dtype)).shape
    assert view_shape == (views,) + shape, (view_shape, views, shape)
    devices = list(mesh.devices.flat)
    device = devices[0].device_kind
    peak = timing.peak_tflops(device, config.model.dtype, _PEAK.value)
    # XLA's cost analysis of an SPMD program counts one device's share of the work
    # (one partition's HLO), so the MFU is per device.
    mfu = timing.mfu(flops, step_s, peak)
    return {'config': config.method, 'global_batch': batch_size, 'views_per_step': views,
            'view_shape_nhwc': list(view_shape),
            'num_params': num_params,
            'image_size': config.data.image_size, 'width': config.model.width,
            'num_shifts': config.csi.num_shifts, 'dtype': config.model.dtype,
            'compile_s': round(compile_s, 2),
            'median_step_s': round(step_s, 4), 'images_per_s': round(batch_size / step_s, 2),
            'views_per_s': round(views / step_s, 1), 'steps_timed': steps,
            'flops_per_step': flops,
            'tflops_per_s': round(flops / step_s / 1e12, 4) if flops else None,
            'peak_tflops': peak, 'mfu': round(mfu, 4) if mfu is not None else None,
            'peak_memory_bytes': timing.peak_memory_bytes(devices),
            'device': device, 'num_devices': mesh.devices.size,
            'jax': jax.__version__, 'host': platform.processor() or platform.machine()}


def torch_measure(config, batch_size, steps, warmup, device=''):
    """torch_reference.measure(...) for the config's step, in a child process.

    Returns its dict, or {'error': ...} when it failed (e.g. out of memory).
    """
    spec = json.dumps({'batch_size': batch_size, 'steps': steps, 'warmup': warmup,
                       'device': device or None, 'config': json.loads(config.to_json())})
    code = ('import json, sys; sys.path.insert(0, %r); import torch_reference as t; '
            'print(json.dumps(t.measure_json(sys.argv[1])))' % _HERE)
    proc = subprocess.run([sys.executable, '-c', code, spec], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        return {'error': (proc.stderr.strip().splitlines() or ['no output'])[-1]}
    return json.loads(lines[-1])


def want_torch(value):
    if value == 'auto':
        return importlib.util.find_spec('torch') is not None
    return value == 'true'


def main(argv):
    del argv
    config = _CONFIG.value
    batches = [int(b) for b in _BATCHES.value]
    torch_results = {}
    if want_torch(_TORCH.value):  # before JAX initialises (and fills) the device
        for b in batches:
            torch_results[b] = torch_measure(config, b, _STEPS.value, _WARMUP.value,
                                             _TORCH_DEVICE.value)
    for b in batches:
        result = measure(config, b, _STEPS.value, _WARMUP.value)
        if b in torch_results:
            ref = torch_results[b]
            if 'error' in ref:
                result['torch_error'] = ref['error']
            else:
                # Same views and the same network (parameter count) on both sides.
                assert ref['views_per_step'] == result['views_per_step'], (ref, result)
                assert ref['num_params'] == result['num_params'], (ref, result)
                result.update(torch_images_per_s=ref['images_per_s'],
                              torch_median_step_s=ref['median_step_s'],
                              torch_device=ref['device'], torch_amp=ref['amp'],
                              torch_channels_last=ref['channels_last'],
                              torch=ref['torch'],
                              jaxad_over_torch=round(result['images_per_s']
                                                     / ref['images_per_s'], 3))
        print(json.dumps(result), flush=True)


if __name__ == '__main__':
    app.run(main)
