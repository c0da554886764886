"""kill -9 regression tests: the real command line, killed mid-run, then rerun.

Each run is `python -m jaxad.main --config=<file> --workdir=<dir>` in a subprocess on
the tiny synthetic data; the killed run is rerun with the same command and its
results.json must equal an uninterrupted run's exactly (resume is exact: the step is
folded into the augmentation key and the data order restarts at the step).

The command runs through a small wrapper that, only when test environment variables ask
for it, slows each logged step (so the kill lands between checkpoints, not after the
end) or holds Orbax's async commit of one step after its arrays are written and before
the rename that makes it a checkpoint (so the kill lands inside the save).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxad import checkpoint as ckpt_lib
from tests.helpers import CHILD_CACHE_ENV, CHILD_XLA_FLAGS, make_npz

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6

CONFIG = '''
from tests.helpers import tiny_config


def get_config(arg=None):
    # no plots: they are not under test here and cost a matplotlib import per run
    return tiny_config({npz!r}, total_steps={steps}, log_every=1,
                       **{{'checkpoint.use_async': arg == 'async', 'eval.plots': False}})
'''

WRAPPER = r'''
"""`python -m jaxad.main` with the test hooks of tests/test_kill.py."""
import os
import runpy
import time

step_sleep = float(os.environ.get('JAXAD_TEST_STEP_SLEEP', '0'))
if step_sleep:  # every logged step sleeps: time to kill the run between checkpoints
    from jaxad import writers
    real_write = writers.MetricWriter.write

    def write(self, step, metrics):
        real_write(self, step, metrics)
        time.sleep(step_sleep)
    writers.MetricWriter.write = write

hold = os.environ.get('JAXAD_TEST_HOLD_COMMIT')
if hold:  # 'STEP:MARKER': the async commit of STEP stops before its final rename
    hold_step, marker = hold.split(':', 1)
    from orbax.checkpoint._src.path import atomicity
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if os.path.basename(str(self._final_path)) == hold_step:
            with open(marker + '.part', 'w') as f:  # renamed: never seen empty
                f.write(str(self.get()))
            os.replace(marker + '.part', marker)
            time.sleep(3600)  # until killed
        return await real_finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize

runpy.run_module('jaxad.main', run_name='__main__', alter_sys=True)
'''


@pytest.fixture(scope='module')
def cli(tmp_path_factory):
    """Starts the command line (through the hook wrapper) on tiny data."""
    base = tmp_path_factory.mktemp('kill')
    npz = make_npz(base / 'tiny.npz')
    config = base / 'tiny_config.py'
    config.write_text(CONFIG.format(npz=str(npz), steps=STEPS))
    wrapper = base / 'jaxad_main_with_hooks.py'
    wrapper.write_text(WRAPPER)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('JAXAD_', 'XLA_', 'JAX_', 'PYTEST_'))}
    env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=CHILD_XLA_FLAGS,
               PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p),
               # the runs of this module (and of test_preemption, test_gcs) compile the
               # same programs: compile once per pytest run
               **CHILD_CACHE_ENV)

    def start(workdir, log, arg='sync', **hooks):
        log_file = open(log, 'w')
        proc = subprocess.Popen(
            [sys.executable, str(wrapper), f'--config={config}:{arg}', f'--workdir={workdir}'],
            cwd=REPO, env=dict(env, **hooks), stdout=log_file, stderr=subprocess.STDOUT)
        log_file.close()
        return proc
    return start


def run_to_end(cli, workdir, log, arg='sync'):
    proc = cli(workdir, log, arg)
    try:
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, f'{workdir}: exit status {rc}:\n{log.read_text()[-3000:]}'
    return json.loads((workdir / 'results.json').read_text())


@pytest.fixture(scope='module')
def reference(cli, tmp_path_factory):
    """results.json of an uninterrupted run."""
    base = tmp_path_factory.mktemp('reference')
    return run_to_end(cli, base / 'run', base / 'run.log')


def committed_steps(workdir):
    """Steps Orbax sees: directories named by a number (an unfinished save is not one)."""
    directory = workdir / 'checkpoints'
    if not directory.is_dir():
        return []
    return sorted(int(n) for n in os.listdir(directory)
                  if n.isdigit() and (directory / n).is_dir())


def wait_for(condition, proc, log, what, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f'the run exited ({proc.returncode}) before {what}:\n'
                        f'{log.read_text()[-3000:]}')
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f'timed out waiting for {what}')


def kill_9(proc):
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def assert_same_results(results, reference):
    assert results['step'] == reference['step'] == STEPS
    for key in ('image_AUROC', 'image_AUPR', 'FPR@95TPR', 'scores', 'per_class_image_AUROC'):
        assert results[key] == reference[key], key


def test_kill_9_between_checkpoints_then_rerun_equals_uninterrupted(cli, reference, tmp_path):
    workdir = tmp_path / 'run'
    proc = cli(workdir, tmp_path / 'killed.log', JAXAD_TEST_STEP_SLEEP='0.5')
    wait_for(lambda: any(s >= 2 for s in committed_steps(workdir)), proc,
             tmp_path / 'killed.log', 'a checkpoint of step >= 2')
    kill_9(proc)
    steps = committed_steps(workdir)
    assert steps and max(steps) < STEPS, steps  # killed mid-run
    assert not (workdir / 'results.json').exists()

    log = tmp_path / 'rerun.log'
    results = run_to_end(cli, workdir, log)
    assert f'resuming from {workdir / "checkpoints"} step {max(steps)}' in log.read_text()
    assert_same_results(results, reference)


def test_kill_9_during_an_async_save_never_makes_it_latest(cli, reference, tmp_path):
    workdir = tmp_path / 'run'
    marker = tmp_path / 'step4_written'
    proc = cli(workdir, tmp_path / 'killed.log', 'async',
               JAXAD_TEST_HOLD_COMMIT=f'4:{marker}')
    wait_for(marker.exists, proc, tmp_path / 'killed.log',
             'the async save of step 4 to write its arrays')
    kill_9(proc)
    directory = workdir / 'checkpoints'
    # Step 4 is on disk, whole but uncommitted (its temporary directory); step 2 is latest.
    assert [n for n in os.listdir(directory) if n.startswith('4.')] == \
        [os.path.basename(marker.read_text())]
    assert committed_steps(workdir) == [2]
    checkpoints = ckpt_lib.Checkpoints(directory, read_only=True)
    assert checkpoints.latest_step() == 2
    checkpoints.close()

    log = tmp_path / 'rerun.log'
    results = run_to_end(cli, workdir, log, 'async')
    assert f'resuming from {directory} step 2' in log.read_text()
    assert_same_results(results, reference)
    assert committed_steps(workdir) == [2, 4, 6]
    assert sorted(os.listdir(directory)) == ['2', '4', '6']  # the leftover was replaced
