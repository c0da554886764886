"""SIGTERM / SIGINT during training (jaxad/preemption.py): the real command line, signalled
mid-run, then rerun.

Each run is `python -m jaxad.main --config=<file> --workdir=<dir>` in a subprocess on the tiny
synthetic data of tests/test_kill.py (6 steps, a line in metrics.jsonl per step, no periodic
checkpoint before step 100, so the only checkpoint of a signalled run is the one the signal
made). A signalled run must finish the step in flight, commit a checkpoint of exactly that
step, print one line saying so, and exit 143 (SIGTERM) or 130 (SIGINT); the rerun of the
same command resumes there and its results.json equals an uninterrupted run's exactly.
Without jaxad's handlers the first signal ends the process at once (exit -15 / -2 here,
no checkpoint), which every test below would catch.

The command runs through a wrapper that, only when test environment variables ask for it,
slows each logged step (so the signal lands mid-run) or holds Orbax's async commit of the
first checkpoint after its arrays are written and before the rename that makes it a step
(so a second signal lands inside the save). Two real processes on loopback stopping at the
same step are tested in tests/test_multihost.py, where their results are also checked
against one process; in-process tests check what notebooks get (`Preempted`, the
handlers restored), the last-step case, and the multi-process logic against a faked JAX
preemption sync point (its call ids, Orbax kept off it, a table stopped between groups).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback

import pytest

from jaxad import preemption, train
from jaxad.errors import Preempted
from tests.helpers import CHILD_CACHE_ENV, CHILD_XLA_FLAGS, make_npz, tiny_config
from tests.test_kill import STEPS, assert_same_results, committed_steps, run_to_end, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = '''
from tests.helpers import tiny_config


def get_config(arg=''):
    options = set((arg or '').split('+'))
    # no plots: they are not under test here and cost a matplotlib import per run
    c = tiny_config({npz!r}, total_steps={steps}, log_every=1,
                    **{{'checkpoint.every_steps': 100, 'checkpoint.use_async': 'async' in options,
                        'eval.plots': False}})
    if 'table' in options:  # classes 0, 1, 2 as three groups of one
        c.table.classes, c.table.stack_size, c.data.normal_classes = '0,1,2', 1, ()
    return c
'''

WRAPPER = r'''
"""`python -m jaxad.main` with the test hooks of tests/test_preemption.py."""
import os
import runpy
import time

step_sleep = float(os.environ.get('JAXAD_TEST_STEP_SLEEP', '0'))
if step_sleep:  # every logged step sleeps: time to signal the run between steps
    from jaxad import writers
    real_write = writers.MetricWriter.write

    def write(self, step, metrics):
        real_write(self, step, metrics)
        time.sleep(step_sleep)
    writers.MetricWriter.write = write

hold = os.environ.get('JAXAD_TEST_HOLD_FIRST_COMMIT')
if hold:  # 'MARKER:RELEASE': the first step's commit waits before its rename until RELEASE
    marker, release = hold.split(':', 1)
    from orbax.checkpoint._src.path import atomicity
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        is_step = os.path.basename(str(self._final_path)).isdigit()  # not an item's
        if is_step and not os.path.exists(marker):
            with open(marker + '.part', 'w') as f:  # renamed: never seen empty
                f.write(str(self.get()))
            os.replace(marker + '.part', marker)
            deadline = time.time() + 300
            while not os.path.exists(release) and time.time() < deadline:
                time.sleep(0.02)
        return await real_finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize

runpy.run_module('jaxad.main', run_name='__main__', alter_sys=True)
'''

LINE = re.compile(r'^jaxad: preempted .*$', re.M)


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    """The data, config file and hook wrapper shared by this module's runs."""
    base = tmp_path_factory.mktemp('preempt')
    npz = make_npz(base / 'tiny.npz')
    (base / 'tiny_config.py').write_text(CONFIG.format(npz=str(npz), steps=STEPS))
    (base / 'jaxad_main_with_hooks.py').write_text(WRAPPER)
    return base


@pytest.fixture(scope='module')
def cli(base):
    """Starts the command line (through the hook wrapper) on tiny data, one device."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('JAXAD_', 'XLA_', 'JAX_', 'PYTEST_'))}
    env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=CHILD_XLA_FLAGS,
               PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p),
               # the runs of this module (and of test_kill, test_gcs) compile the same
               # programs: compile once per pytest run
               **CHILD_CACHE_ENV)

    def start(workdir, log, arg='sync', **hooks):
        with open(log, 'w') as log_file:
            return subprocess.Popen(
                [sys.executable, str(base / 'jaxad_main_with_hooks.py'),
                 f'--config={base / "tiny_config.py"}:{arg}', f'--workdir={workdir}'],
                cwd=REPO, env=dict(env, **hooks), stdout=log_file, stderr=subprocess.STDOUT)
    return start


@pytest.fixture(scope='module')
def reference(cli, tmp_path_factory):
    """results.json of an uninterrupted run."""
    base = tmp_path_factory.mktemp('reference')
    return run_to_end(cli, base / 'run', base / 'run.log')


def logged_steps(path):
    if not os.path.exists(path):
        return []
    return [json.loads(line)['step'] for line in open(path).read().splitlines()]


def the_line(log):
    """The one 'jaxad: preempted ...' line of a run's output."""
    lines = LINE.findall(log.read_text())
    assert len(lines) == 1, log.read_text()[-3000:]
    return lines[0]


def stopped_step(line, signal_name, directory):
    match = re.fullmatch(
        rf'jaxad: preempted \({signal_name}\) at step (\d) of {STEPS}; saved checkpoint step '
        rf'(\d) in {re.escape(str(directory))}\. Rerun the same command to resume\.', line)
    assert match and match.group(1) == match.group(2), line
    return int(match.group(1))


def test_sigterm_checkpoints_the_step_in_flight_and_rerun_equals_uninterrupted(
        cli, reference, tmp_path):
    """SIGTERM after step 2 is logged: exit 143 with one line, a committed checkpoint of the
    step it stopped at (not a periodic one: there is none before step 100), metrics.jsonl
    written up to that step, no results.json; the rerun resumes there and equals an
    uninterrupted run exactly. Signal to exit took 2.0 and 3.3 s here (the 2-core CPU shared
    with other test runs, load average 7; each logged step sleeps 0.5 s): bound 60 s."""
    workdir, log = tmp_path / 'run', tmp_path / 'first.log'
    proc = cli(workdir, log, JAXAD_TEST_STEP_SLEEP='0.5')
    wait_for(lambda: 2 in logged_steps(workdir / 'metrics.jsonl'), proc, log, 'step 2')
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    seconds = time.time() - t0
    print(f'one process: SIGTERM to exit {seconds:.1f} s')
    step = stopped_step(the_line(log), 'SIGTERM', workdir / 'checkpoints')
    assert 2 < step < STEPS
    assert committed_steps(workdir) == [step]
    assert logged_steps(workdir / 'metrics.jsonl') == list(range(1, step + 1))
    assert not (workdir / 'results.json').exists()
    assert seconds < 60, seconds

    rerun = tmp_path / 'rerun.log'
    results = run_to_end(cli, workdir, rerun)
    assert f'resuming from {workdir / "checkpoints"} step {step}' in rerun.read_text()
    assert_same_results(results, reference)
    assert logged_steps(workdir / 'metrics.jsonl') == [*range(1, step + 1),
                                                       *range(step + 1, STEPS + 1)]


def test_signals_during_the_save_wait_for_its_commit(cli, reference, tmp_path):
    """SIGINT, then while the checkpoint of its step is written (held before Orbax's rename)
    SIGTERM and SIGINT again: the process neither dies nor commits anything until the save is
    released, then commits exactly that step and exits 130 (the first signal's) with one
    line; the rerun resumes from that step and equals an uninterrupted run."""
    workdir, log = tmp_path / 'run', tmp_path / 'first.log'
    marker, release = tmp_path / 'held', tmp_path / 'release'
    proc = cli(workdir, log, 'async', JAXAD_TEST_STEP_SLEEP='0.5',
               JAXAD_TEST_HOLD_FIRST_COMMIT=f'{marker}:{release}')
    wait_for(lambda: 2 in logged_steps(workdir / 'metrics.jsonl'), proc, log, 'step 2')
    proc.send_signal(signal.SIGINT)
    wait_for(marker.exists, proc, log, 'the checkpoint of the stopped step to be written')
    held = os.path.basename(marker.read_text())  # '<step>.orbax-checkpoint-tmp-...'
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    assert proc.poll() is None, log.read_text()[-3000:]  # not ended by the second signal
    assert committed_steps(workdir) == []  # the held step is not a step yet
    release.write_text('')
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    step = stopped_step(the_line(log), 'SIGINT', workdir / 'checkpoints')
    assert held.split('.')[0] == str(step)
    assert committed_steps(workdir) == [step]
    assert sorted(os.listdir(workdir / 'checkpoints')) == [str(step)]  # no temporary left

    rerun = tmp_path / 'rerun.log'
    results = run_to_end(cli, workdir, rerun, 'async')
    assert f'resuming from {workdir / "checkpoints"} step {step}' in rerun.read_text()
    assert_same_results(results, reference)


def test_table_stops_in_its_group_and_resumes_there(cli, tmp_path):
    """A one-class table of classes 0, 1, 2 (three groups of one), SIGTERM while the second
    group trains: its step is checkpointed, the third group never starts, exit 143; the rerun
    reuses the first group (not retrained), resumes the second at its step, and the table
    equals an uninterrupted one exactly."""
    full = tmp_path / 'full'
    run_to_end_table = cli(full, tmp_path / 'full.log', 'table')
    assert run_to_end_table.wait(timeout=600) == 0, (tmp_path / 'full.log').read_text()[-3000:]
    reference = json.loads((full / 'results.json').read_text())

    workdir, log = tmp_path / 'run', tmp_path / 'first.log'
    groups = workdir / 'groups'
    proc = cli(workdir, log, 'table', JAXAD_TEST_STEP_SLEEP='0.5')
    wait_for(lambda: 2 in logged_steps(groups / 'classes_1' / 'metrics.jsonl'), proc, log,
             'step 2 of the second group')
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    line = the_line(log)
    directory = groups / 'classes_1' / 'checkpoints'
    match = re.fullmatch(
        rf'jaxad: preempted \(SIGTERM\) at step (\d) of {STEPS} of group classes_1 \(1 of 3 '
        rf'groups finished\); saved checkpoint step \1 in {re.escape(str(directory))}\. '
        r'Rerun the same command to resume\.', line)
    assert match, line
    step = int(match.group(1))
    assert 2 < step < STEPS
    assert committed_steps(groups / 'classes_1') == [step]
    assert committed_steps(groups / 'classes_2') == []
    assert not (groups / 'classes_2' / 'metrics.jsonl').exists()  # never started
    assert (groups / 'classes_0' / 'results.json').exists()
    first_group_log = (groups / 'classes_0' / 'metrics.jsonl').read_text()
    assert not (workdir / 'results.json').exists()

    rerun = tmp_path / 'rerun.log'
    proc = cli(workdir, rerun, 'table')
    assert proc.wait(timeout=600) == 0, rerun.read_text()[-3000:]
    text = rerun.read_text()
    assert f'resuming from {directory} step {step}' in text
    assert 'group classes_0 finished at step 6; reusing its results' in text
    assert (groups / 'classes_0' / 'metrics.jsonl').read_text() == first_group_log
    results = json.loads((workdir / 'results.json').read_text())
    for key in ('image_AUROC', 'image_AUPR', 'FPR@95TPR', 'scores', 'step'):
        assert [r[key] for r in results['classes']] == \
            [r[key] for r in reference['classes']], key
    assert results['mean'] == reference['mean']


# ---------------------------------------------------------------------------- in process


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp('data') / 'tiny.npz')


def signal_after_step(monkeypatch, step, signum):
    """The next run sends `signum` to this process right after logging `step`, once jaxad's
    handler is installed (else the hook raises instead: the signal would end the test)."""
    from jaxad import writers
    real_write = writers.MetricWriter.write

    def write_then_signal(self, at, metrics):
        real_write(self, at, metrics)
        if at == step:
            handler = signal.getsignal(signum)
            assert getattr(handler, '__self__', None).__class__ is preemption.Watch, handler
            signal.raise_signal(signum)  # to this thread: handled at once
    monkeypatch.setattr(writers.MetricWriter, 'write', write_then_signal)
    return lambda: monkeypatch.setattr(writers.MetricWriter, 'write', real_write)


def test_train_and_evaluate_raises_preempted_and_restores_the_handlers(npz, tmp_path,
                                                                        monkeypatch):
    """From Python (a notebook): SIGINT after step 2 is logged raises Preempted (exit code
    130, the step, the directory), not SystemExit, and the previous handlers are back."""
    before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    undo = signal_after_step(monkeypatch, 2, signal.SIGINT)
    workdir = tmp_path / 'run'
    config = tiny_config(npz, log_every=1, num_devices=1, **{'checkpoint.every_steps': 100})
    with pytest.raises(Preempted) as raised:
        train.train_and_evaluate(config, str(workdir))
    undo()
    e = raised.value
    assert (e.signal_name, e.exit_code, e.total_steps) == ('SIGINT', 130, 4)
    assert e.directory == str(workdir / 'checkpoints')
    assert committed_steps(workdir) == [e.step] and 2 < e.step < 4
    assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before


def test_signal_in_the_last_step_saves_the_final_checkpoint(npz, tmp_path, monkeypatch):
    """SIGTERM while the last step is read: training is done, so the final checkpoint (with
    the scoring state) is saved before stopping; nothing is evaluated, and the rerun only
    evaluates."""
    undo = signal_after_step(monkeypatch, 4, signal.SIGTERM)
    workdir = tmp_path / 'run'
    config = lambda: tiny_config(npz, log_every=1, num_devices=1)  # noqa: E731
    with pytest.raises(Preempted, match=r'at step 4 of 4; saved the final checkpoint step 4 '
                       r'in .*\(training done, not yet evaluated\)') as raised:
        train.train_and_evaluate(config(), str(workdir))
    undo()
    assert raised.value.exit_code == 143
    assert committed_steps(workdir) == [2, 4]
    assert (workdir / 'checkpoints' / '4' / 'scoring').is_dir()
    assert not (workdir / 'results.json').exists()
    results = train.train_and_evaluate(config(), str(workdir))
    assert results['step'] == 4 and (workdir / 'results.json').exists()


def test_several_processes_stop_where_the_sync_point_says(npz, tmp_path, monkeypatch):
    """The multi-process path in one process, with JAX's preemption sync point faked (True at
    its third call): the run stops at that step with its checkpoint; only jaxad calls the sync
    point, once per step with increasing ids (Orbax, which saves here at every step, would
    call it with the saved step: `preemption.keep_orbax_off`), and SIGTERM keeps its handler
    (a Python one would replace JAX's C++ notifier)."""
    from jax.experimental import multihost_utils
    sigterm = signal.getsignal(signal.SIGTERM)
    calls = []

    def sync_point(n):
        calls.append((n, traceback.extract_stack()[-2].filename))
        assert signal.getsignal(signal.SIGTERM) == sigterm
        return len(calls) == 3
    monkeypatch.setattr(multihost_utils, 'reached_preemption_sync_point', sync_point)
    monkeypatch.setattr(preemption, '_distributed', lambda: True)
    workdir = tmp_path / 'run'
    config = tiny_config(npz, log_every=1, num_devices=1, **{'checkpoint.every_steps': 1})
    with pytest.raises(Preempted, match=r'^preempted \(SIGTERM to a process of this '
                       r'1-process run\) at step 3 of 4; saved checkpoint step 3 in') as raised:
        train.train_and_evaluate(config, str(workdir))
    assert (raised.value.step, raised.value.exit_code) == (3, 143)
    ids = [n for n, _ in calls]
    assert ids == list(range(ids[0], ids[0] + 3)), calls
    assert all(f == preemption.__file__ for _, f in calls), calls
    assert committed_steps(workdir) == [1, 2, 3]


def test_table_notice_between_groups_starts_no_further_group(npz, tmp_path, monkeypatch):
    """Several processes (sync point faked): a notice that arrives while the first group is
    evaluated (no jaxad call there) is agreed at the next call, before the second group
    starts: the table stops there, the first group finished and saved, the second untouched."""
    from jax.experimental import multihost_utils
    calls = []

    def sync_point(n):
        calls.append(n)
        # 4 steps, 1 after the first group's final save, 1 before the second (none before
        # the first group: a notice there is acted on at its first step, as in a single run)
        return len(calls) == 6
    monkeypatch.setattr(multihost_utils, 'reached_preemption_sync_point', sync_point)
    monkeypatch.setattr(preemption, '_distributed', lambda: True)
    workdir = tmp_path / 'table'
    config = tiny_config(npz, log_every=1, num_devices=1)
    config.table.classes, config.table.stack_size, config.data.normal_classes = '0,1', 1, ()
    with pytest.raises(Preempted) as raised:
        train.train_and_evaluate(config, str(workdir))
    assert str(raised.value) == (
        'preempted (SIGTERM to a process of this 1-process run) before group classes_1 '
        f'started (1 of 2 groups finished; checkpoints in {workdir / "groups"}). Rerun the '
        'same command to resume.')
    assert len(calls) == 6
    assert committed_steps(workdir / 'groups' / 'classes_0') == [2, 4]
    assert (workdir / 'groups' / 'classes_0' / 'results.json').exists()
    assert committed_steps(workdir / 'groups' / 'classes_1') == []
    assert not (workdir / 'groups' / 'classes_1' / 'metrics.jsonl').exists()


def test_watch_records_signals_without_acting_on_them():
    """One process: the handlers only record (the first signal and a count of the others);
    `reached` says stop from then on; disarm puts the previous handlers back."""
    before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    with preemption.Watch() as watch:
        assert not watch.multi and not watch.reached()
        assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before  # not armed
        watch.arm()
        for signum in preemption.SIGNALS:  # (else the signals below would end the test run)
            assert signal.getsignal(signum) == watch._record  # pylint: disable=protected-access
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        assert watch.reached() and watch.reached()
        assert (watch.signal_name, watch.repeats) == ('SIGTERM', 2)
        e = watch.preempted(3, 6, '/w/checkpoints')
        assert str(e) == ('preempted (SIGTERM) at step 3 of 6; saved checkpoint step 3 in '
                          '/w/checkpoints. Rerun the same command to resume.')
        assert (e.exit_code, e.step, e.signal_name) == (143, 3, 'SIGTERM')
    assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before
    assert preemption.exit_code('SIGINT') == 130


def test_benchmark_script_reports_the_stop(tmp_path):
    """benchmarks/preemption.py at tiny sizes: one JSON line with the step it stopped at
    (the committed one) and the signal-to-exit time."""
    env = dict(os.environ, XLA_FLAGS=CHILD_XLA_FLAGS, JAX_PLATFORMS='cpu', **CHILD_CACHE_ENV,
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p))
    proc = subprocess.run(
        [sys.executable, 'benchmarks/preemption.py', '--config=configs/quickstart.py:epochs=3',
         '--at_step=2', '--log_every=1', f'--workdir={tmp_path}', '--',
         '--config.model.name=resnet10', '--config.model.width=4',
         '--config.data.image_size=8', '--config.eval.num_samples=1'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{')]
    assert line['exit_codes'] == [143] and line['total_steps'] == 6
    assert line['committed_steps'] == line['stopped_at_step']
    assert 2 <= line['stopped_at_step'][0] < 6
    assert 0 < line['signal_to_exit_s'] < 60
