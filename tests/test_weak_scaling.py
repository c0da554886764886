"""benchmarks/weak_scaling.py: the sweep path over emulated devices (not a timing test)."""
import importlib.util
import json
import math
import os
import subprocess
import sys

from tests.helpers import CHILD_XLA_FLAGS

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PATH = os.path.join(_ROOT, 'benchmarks', 'weak_scaling.py')
_spec = importlib.util.spec_from_file_location('weak_scaling', _PATH)
weak_scaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(weak_scaling)


def test_child_env_forces_the_device_count(monkeypatch):
    monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_foo=1')
    env = weak_scaling.child_env(2, emulate=True)
    assert env['XLA_FLAGS'].split() == ['--xla_foo=1', '--xla_force_host_platform_device_count=2']
    assert env['JAX_PLATFORMS'] == 'cpu'
    env = weak_scaling.child_env(2, emulate=False)
    assert env['XLA_FLAGS'] == os.environ['XLA_FLAGS']


def test_sweep_over_one_and_two_emulated_devices():
    # Quickstart with a smaller net and images, and XLA:CPU's cheap compile mode: the test
    # checks that every device count runs and reports, not how fast.
    env = dict(os.environ, XLA_FLAGS=CHILD_XLA_FLAGS + ' --xla_llvm_disable_expensive_passes=true')
    cmd = [sys.executable, _PATH, '--config=configs/quickstart.py', '--device_counts=1,2',
           '--per_device_batch=2', '--steps=2', '--warmup=1',
           '--override=model.width=4', '--override=model.name=resnet10',
           '--override=data.image_size=8']
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'nothing about real scaling' in proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r['num_devices'] for r in lines] == [1, 2], proc.stdout
    for n, r in zip((1, 2), lines):
        assert 'error' not in r, r
        assert r['global_batch'] == 2 * n and r['views_per_step'] == 2 * n * 2 * 4
        assert r['view_shape_nhwc'] == [2 * n * 8, 8, 8, 3] and r['width'] == 4
        assert r['emulated'] is True and 'nothing about real scaling' in r['note']
        for key in ('median_step_s', 'images_per_s', 'efficiency_vs_1'):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert lines[0]['efficiency_vs_1'] == 1.0 and lines[1]['efficiency_base_devices'] == 1
