"""Weak scaling of the train step: a fixed batch per device over 1, 2, 4, 8 devices.

python benchmarks/weak_scaling.py --config=configs/quickstart.py --per_device_batch=8 --steps=5
python benchmarks/weak_scaling.py --emulate=false --device_counts=1,2,4,8 --steps=20  # real devices

Each device count runs `benchmarks/throughput.py` in a fresh process with
`--config.num_devices=N` (the mesh of `jaxad.sharding.make_mesh`) and a global batch of
N x --per_device_batch, and prints its JSON line plus `efficiency_vs_1`: the step time at
one device over the step time at N (1.0 = perfect weak scaling; the same as images/s per
device relative to one device).

By default (--emulate=true) the N devices are *emulated CPU devices*
(XLA_FLAGS=--xla_force_host_platform_device_count=N, JAX_PLATFORMS=cpu). They share the
same few host cores, so the sweep only checks that the sharded step runs at every
device count: emulated devices say NOTHING about real scaling, and the efficiency is
expected to fall roughly as 1/N. With --emulate=false the children see the machine's
real devices (a multi-GPU host); a device count the host does not have gives an error
line. Never part of the test pass/fail.
"""
import json
import os
import subprocess
import sys

from absl import app, flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
EMULATED_NOTE = ('emulated CPU devices share the same host cores: this checks the sharded '
                 'step runs, it says nothing about real scaling')

_CONFIG = flags.DEFINE_string('config', 'configs/quickstart.py', 'Config file (path[:args]).')
_COUNTS = flags.DEFINE_list('device_counts', ['1', '2', '4', '8'], 'Device counts N.')
_PER_DEVICE = flags.DEFINE_integer('per_device_batch', 8, 'Images per device per step.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per device count.')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed steps after compilation.')
_EMULATE = flags.DEFINE_bool('emulate', True, 'Emulate N CPU devices (see the docstring).')
_EXTRA = flags.DEFINE_multi_string('override', [], 'Extra config overrides for throughput.py, '
                                   'e.g. --override=model.width=8.')


def child_env(num_devices, emulate):
    """The environment of a child: N forced host devices on the CPU, or untouched."""
    env = dict(os.environ)
    if emulate:
        flags_ = [f for f in env.get('XLA_FLAGS', '').split()
                  if not f.startswith('--xla_force_host_platform_device_count')]
        env['XLA_FLAGS'] = ' '.join(
            flags_ + [f'--xla_force_host_platform_device_count={num_devices}'])
        env['JAX_PLATFORMS'] = 'cpu'
    env['PYTHONPATH'] = os.pathsep.join(p for p in (_ROOT, env.get('PYTHONPATH')) if p)
    return env


def _config_path(spec):
    path, sep, arg = spec.partition(':')
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(_ROOT, path)
    return os.path.abspath(path) + sep + arg


def run_one(num_devices, *, config='configs/quickstart.py', per_device_batch=8, steps=5,
            warmup=1, emulate=True, overrides=(), timeout=None):
    """throughput.py at N devices in a fresh process; its JSON dict, or {'error': ...}."""
    cmd = [sys.executable, os.path.join(_HERE, 'throughput.py'),
           f'--config={_config_path(config)}', f'--config.num_devices={num_devices}',
           f'--batch_sizes={num_devices * per_device_batch}', f'--steps={steps}',
           f'--warmup={warmup}', '--torch=false']
    cmd += [f'--config.{o}' for o in overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_ROOT,
                          env=child_env(num_devices, emulate), timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
        return {'num_devices': num_devices, 'error': tail}
    return json.loads(lines[-1])


def sweep(device_counts, *, emulate=True, **kwargs):
    """run_one for each N, with efficiency_vs_1 (step time at the first N / at N) added."""
    base = None
    for n in device_counts:
        r = run_one(n, emulate=emulate, **kwargs)
        r.update(per_device_batch=kwargs.get('per_device_batch', 8), emulated=emulate)
        if emulate:
            r['note'] = EMULATED_NOTE
        if 'error' not in r:
            base = base or (n, r['median_step_s'])
            # Weak scaling: the work per device is fixed, so ideal step time is constant.
            r['efficiency_vs_1'] = round(base[1] / r['median_step_s'], 3)
            r['efficiency_base_devices'] = base[0]
            r['images_per_s_per_device'] = round(r['images_per_s'] / n, 2)
        yield r


def main(argv):
    del argv
    if _EMULATE.value:
        print(f'# {EMULATED_NOTE}', file=sys.stderr, flush=True)
    for r in sweep([int(n) for n in _COUNTS.value], emulate=_EMULATE.value,
                   config=_CONFIG.value, per_device_batch=_PER_DEVICE.value,
                   steps=_STEPS.value, warmup=_WARMUP.value, overrides=_EXTRA.value):
        print(json.dumps(r), flush=True)


if __name__ == '__main__':
    app.run(main)
