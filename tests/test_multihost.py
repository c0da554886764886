"""Two CPU processes (jax.distributed on localhost, Gloo collectives) == one process, 2 devices.

Each run is `python -m jaxad.main` in a subprocess with its own device count
(XLA_FLAGS here would be the 8 devices conftest sets). The two-process run
shares one workdir, as hosts share a file system; it must log the same losses,
write one set of files (process 0), stop at one step on both processes when one of
them gets SIGTERM (tests/test_preemption.py for one process), and save a checkpoint that a
second two-process run resumes from.
"""
import json
import operator
import os
import re
import socket
import subprocess
import sys
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import orbax.checkpoint as ocp

from tests.helpers import XLA_CACHE_DIR, tiny_config
from tests.test_kill import committed_steps, wait_for
from tests.test_preemption import WRAPPER, logged_steps, the_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Room for the first run to stop mid-way (signal to exit takes up to ~5 of its 1.5 s steps),
# and few enough steps that the two runs' float32 sums (Gloo's against XLA's all-reduce)
# stay within 1e-5: at 12 steps (quickstart's width 16, batch 32) the gradient norm had
# drifted 1e-4 apart by step 9.
STEPS = 8
# Quickstart's digits with the tests' tiny network and batch (tests/helpers.py: tiny_config:
# ResNet-10, width 4, 8x8 images, digits' own size): a process took 20 CPU-s at quickstart's
# width 16 and batch 32, 7 CPU-s at these.
_TINY = tiny_config('unused.npz')
CONFIG = ['--config=configs/quickstart.py:epochs=2', f'--config.total_steps={STEPS}',
          '--config.log_every=1', '--config.checkpoint.every_steps=4',
          '--config.eval.num_samples=1', '--config.eval.batch_size=64',
          *(f'--config.{field}={operator.attrgetter(field)(_TINY)}' for field in (
              'model.name', 'model.width', 'model.proj_dim', 'data.image_size', 'batch_size'))]
TIMEOUT_S = 420  # generous: a loaded 2-core CI machine compiles every program of three runs
COMPARED = ('loss', 'loss_cls', 'loss_con', 'grad_norm', 'lr')


def free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def child_env(num_devices, cache_dir, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith('JAXAD_')}
    xla = re.sub(r'--xla_force_host_platform_device_count=\S+', '', env.get('XLA_FLAGS', ''))
    env.update(
        JAX_PLATFORMS='cpu',
        XLA_FLAGS=f'{xla} --xla_force_host_platform_device_count={num_devices}'.strip(),
        # One cache for every run (the pytest run's): the resumed run compiles nothing.
        # (Not JAX_SHARE_BINARY_BETWEEN_HOSTS: on CPU each process's cache key
        # differs, so process 1 would wait forever for process 0's binary.)
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
        PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p), **extra)
    return env


class Run:
    """A `jaxad.main` subprocess whose stdout/stderr go to files (no pipe deadlocks)."""

    def __init__(self, name, args, env, log_dir, program=('-m', 'jaxad.main')):
        self.name = name
        self.out_path = os.path.join(log_dir, f'{name}.out')
        self.err_path = os.path.join(log_dir, f'{name}.err')
        with open(self.out_path, 'w') as out, open(self.err_path, 'w') as err:
            self.proc = subprocess.Popen([sys.executable, *program, *args], cwd=REPO,
                                         env=env, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)

    def stdout(self):
        with open(self.out_path) as f:
            return f.read()

    def stderr(self):
        with open(self.err_path) as f:
            return f.read()

    def report(self):
        return (f'--- {self.name}: exit {self.proc.returncode}\n--- stdout:\n{self.stdout()[-3000:]}'
                f'\n--- stderr:\n{self.stderr()[-6000:]}')


def wait_all(runs, timeout=TIMEOUT_S):
    """Waits for every run; one failing ends the others (its peer would hang in a collective)."""
    deadline = time.time() + timeout
    while any(r.proc.poll() is None for r in runs):
        failed = any(r.proc.returncode not in (None, 0) for r in runs)
        if failed or time.time() > deadline:
            for r in runs:
                if r.proc.poll() is None:
                    r.proc.kill()
                    r.proc.wait()
            why = 'a run failed' if failed else f'timed out after {timeout} s'
            raise AssertionError(f'{why}\n' + '\n'.join(r.report() for r in runs))
        time.sleep(0.2)
    assert all(r.proc.returncode == 0 for r in runs), '\n'.join(r.report() for r in runs)


def start_two_processes(name, workdir, env, log_dir, extra=(), program=('-m', 'jaxad.main')):
    address = f'localhost:{free_port()}'
    return [Run(f'{name}_p{pid}', [*CONFIG, *extra, f'--workdir={workdir}',
                                   f'--coordinator_address={address}', '--num_processes=2',
                                   f'--process_id={pid}'], env, log_dir, program)
            for pid in (0, 1)]


def read_metrics(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def read_results(workdir):
    with open(os.path.join(workdir, 'results.json')) as f:
        return json.load(f)


def assert_same_metrics(got, want):
    assert [r['step'] for r in got] == [r['step'] for r in want]
    for g, w in zip(got, want):
        for key in COMPARED:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-7,
                                       err_msg=f'step {w["step"]} {key}')


def assert_same_results(got, want):
    assert got['step'] == want['step']
    for name, metrics in want['scores'].items():
        for key, value in metrics.items():
            np.testing.assert_allclose(got['scores'][name][key], value, atol=1e-4,
                                       err_msg=f'{name} {key}')


def load_state(path):
    """A checkpoint's train state as host arrays, whatever the mesh that saved it."""
    ckpt = ocp.StandardCheckpointer()
    tree = ckpt.metadata(path).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return jax.device_get(ckpt.restore(path, abstract))


def test_two_processes_match_one_process_two_devices_through_a_preemption(tmp_path):
    """One workdir, two processes (one device each) against one process with two devices,
    with a SIGTERM to process 1 in between.

    * JAX's preemption sync point makes both processes stop after the same step, both save
      it (one checkpoint), both print the line with that step and exit 143. Signal to exit
      took 5.4 and 7.2 s here (load average 7; JAX's notifier polls every second): bound
      120 s. Each step of the first run sleeps 1.5 s, so the stop lands before the last.
    * A two-process rerun resumes from that step on both processes and finishes. It keeps the
      training images on the devices (data.on_device, each process placing its devices'
      copy) where the first run sent them from the host: the same batches.
    * Every logged step (before and after the stop) equals the one-process run's; so do the
      results and the final train state; process 0 alone wrote the files and the results
      table; the periodic checkpoints (every 4 steps) were saved by both processes.
    """
    logs, cache = tmp_path / 'logs', XLA_CACHE_DIR  # the run-wide compilation cache
    logs.mkdir()
    wrapper = tmp_path / 'jaxad_main_with_hooks.py'
    wrapper.write_text(WRAPPER)  # STEP_SLEEP: time to signal the first run mid-way
    single_dir, multi_dir = tmp_path / 'single', tmp_path / 'multi'

    # The reference and the two-process run side by side (different programs to compile).
    single = Run('single', [*CONFIG, f'--workdir={single_dir}'], child_env(2, cache), logs)
    multi = start_two_processes('multi', multi_dir,
                                child_env(1, cache, JAXAD_TEST_STEP_SLEEP='1.5'), logs,
                                program=[str(wrapper)])
    try:
        wait_for(lambda: 2 in logged_steps(multi_dir / 'metrics.jsonl'), multi[0].proc,
                 Path(multi[0].err_path), 'step 2', timeout=TIMEOUT_S)
    except BaseException:
        for r in multi + [single]:
            r.proc.kill()
        raise
    t0 = time.time()
    multi[1].proc.send_signal(signal.SIGTERM)
    codes = [r.proc.wait(timeout=300) for r in multi]
    seconds = time.time() - t0
    print(f'two processes: SIGTERM to exit {seconds:.1f} s')
    reports = '\n'.join(r.report() for r in multi)
    assert codes == [143, 143], reports
    directory = multi_dir / 'checkpoints'
    stopped = []
    for r in multi:
        match = re.fullmatch(
            rf'jaxad: preempted \(SIGTERM to a process of this 2-process run\) at step (\d+) '
            rf'of {STEPS}; saved checkpoint step \1 in {re.escape(str(directory))}\. Rerun '
            r'the same command to resume\.', the_line(Path(r.err_path)))
        assert match, reports
        stopped.append(int(match.group(1)))
    step = stopped[0]
    assert stopped[0] == stopped[1] and 2 < step < STEPS, (stopped, reports)
    assert committed_steps(multi_dir) == sorted({*range(4, step + 1, 4), step})
    assert 'Reached preemption sync point' not in reports  # Orbax's log: it never calls it
    assert seconds < 120, seconds
    assert not (multi_dir / 'results.json').exists()

    wait_all([single])
    want = read_metrics(single_dir)
    assert [r['step'] for r in want] == list(range(1, STEPS + 1))
    assert_same_metrics(read_metrics(multi_dir), want[:step])  # one line per step: process 0's

    resumed = start_two_processes('resumed', multi_dir, child_env(1, cache), logs,
                                  extra=['--config.data.on_device=true'], program=[str(wrapper)])
    wait_all(resumed)
    for r in resumed:
        assert f'resuming from {directory} step {step}' in r.stderr(), r.report()
        assert 'training images on the devices' in r.stderr(), r.report()
    assert_same_metrics(read_metrics(multi_dir), want)
    assert_same_results(read_results(multi_dir), read_results(single_dir))
    assert sorted(os.listdir(multi_dir)) == ['checkpoints', 'config.json', 'fingerprint.json',
                                             'metrics.jsonl', 'plots', 'results.json',
                                             'scoring_settings.json']
    assert sorted(os.listdir(multi_dir / 'plots')) == ['roc.png', 'score_hist.png']
    assert 'image_AUROC' in resumed[0].stdout() and 'image_AUROC' not in resumed[1].stdout()
    assert f'train {STEPS}/{STEPS}' in resumed[0].stderr()
    assert f'train {STEPS}/{STEPS}' not in resumed[1].stderr()

    state_1p = load_state(str(single_dir / 'checkpoints' / str(STEPS) / 'state'))
    state_2p = load_state(str(directory / str(STEPS) / 'state'))
    leaves_1p, leaves_2p = jax.tree_util.tree_leaves(state_1p), jax.tree_util.tree_leaves(state_2p)
    assert len(leaves_1p) == len(leaves_2p)
    for a, b in zip(leaves_1p, leaves_2p):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_initialize_checks_values_before_starting(monkeypatch):
    from jaxad import distributed
    from jaxad.errors import ConfigError
    for key in distributed.ENV.values():
        monkeypatch.delenv(key, raising=False)
    assert distributed.initialize() is False  # nothing asked: one process
    assert distributed.initialize('localhost:1234', 1, 0) is False  # one process: nothing to join
    assert distributed.initialize('localhost:1234', 2, 0, mode='off') is False
    bad = [(dict(coordinator_address='localhost:1234'), 'also set --num_processes'),
           (dict(coordinator_address='localhost', num_processes=2, process_id=0), 'host:port'),
           (dict(coordinator_address='h:1', num_processes=2, process_id=2), r'in 0\.\.1'),
           (dict(coordinator_address='h:1', num_processes=0, process_id=0), '>= 1'),
           (dict(mode='sometimes'), 'expected one of')]
    for kwargs, message in bad:
        with pytest.raises(ConfigError, match=message):
            distributed.initialize(**kwargs)
    monkeypatch.setenv('JAXAD_COORDINATOR_ADDRESS', 'h:1')
    monkeypatch.setenv('JAXAD_NUM_PROCESSES', 'two')
    monkeypatch.setenv('JAXAD_PROCESS_ID', '0')
    with pytest.raises(ConfigError, match=r"num_processes='two' \(env JAXAD_NUM_PROCESSES\)"):
        distributed.initialize()
