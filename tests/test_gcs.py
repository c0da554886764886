"""gs:// workdirs and inputs against a real GCS server (fake-gcs-server on loopback).

Every run is the real command line, `python -m jaxad.main`, in a subprocess whose GCS
clients (gcsfs for jaxad's files, TensorStore for Orbax's arrays) are pointed at the server
(tests/gcs.py); nothing in jaxad is mocked. A run on gs:// must give exactly what the same
run gives in a local folder, resume exactly after kill -9, fall back from a damaged newest
checkpoint, and refuse a bad URL in one line within the storage timeout, writing nothing.
"""
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.gcs import FakeGcs, client_env
from tests.helpers import CHILD_CACHE_ENV, CHILD_XLA_FLAGS, make_npz
from tests.test_kill import WRAPPER, assert_same_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
BUCKET = 'jaxad-bars'

CONFIG = '''
from tests.helpers import tiny_config


def get_config(arg):
    npz, _, modes = arg.partition('|')
    modes = set(modes.split('+'))
    # plots only where a test looks for them: they cost a matplotlib import and two figures,
    # about 0.8 CPU-s per run
    c = tiny_config(npz, total_steps={steps}, log_every=1, tensorboard=True,
                    **{{'eval.plots': 'plots' in modes}})
    if 'table' in modes:  # classes 0 and 1: one stack of two detectors
        c.table.classes, c.table.stack_size, c.data.normal_classes = '0,1', 2, ()
    return c
'''


class Cli:
    """Runs `python -m jaxad.main` (through test_kill's hook wrapper) against the server."""

    def __init__(self, base, server):
        self.base, self.server = base, server
        self.npz = make_npz(base / 'tiny.npz')
        self.config = base / 'tiny_config.py'
        self.config.write_text(CONFIG.format(steps=STEPS))
        self.wrapper = base / 'jaxad_main_with_hooks.py'
        self.wrapper.write_text(WRAPPER)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(('JAXAD_', 'XLA_', 'JAX_', 'PYTEST_', 'STORAGE_',
                                    'TENSORSTORE_', 'GOOGLE_'))}
        env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=CHILD_XLA_FLAGS,
                   PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p),
                   **CHILD_CACHE_ENV,  # the run-wide cache: compiled once per pytest run
                   JAXAD_CACHE_DIR=str(base / 'input-cache'), **server.env)
        self.env = env

    def start(self, *args, log, npz=None, **env):
        log_file = open(log, 'w')
        argv = [sys.executable, str(self.wrapper), *args]
        if not any(a.startswith('--mode=') for a in args) or '--mode=eval' in args:
            argv.append(f'--config={self.config}:{npz or self.npz}')
        proc = subprocess.Popen(argv, cwd=self.base, env=dict(self.env, **env),
                                stdout=log_file, stderr=subprocess.STDOUT)
        log_file.close()
        return proc

    def run(self, *args, log, timeout=300, expect=0, **kwargs):
        proc = self.start(*args, log=log, **kwargs)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
        text = log.read_text()
        assert rc == expect, f'exit status {rc} (expected {expect}):\n{text[-3000:]}'
        return text

    def read(self, url):
        """Bytes of object `url` through the server's own API (not jaxad's code)."""
        return self.server.read(*url[len('gs://'):].split('/', 1))

    def write(self, url, data):
        bucket, name = url[len('gs://'):].split('/', 1)
        from urllib.parse import quote
        import urllib.request
        request = urllib.request.Request(
            f'{self.server.url}/upload/storage/v1/b/{bucket}/o?uploadType=media&'
            f'name={quote(name, safe="")}', data=data, method='POST')
        with urllib.request.urlopen(request, timeout=10) as r:
            r.read()


@pytest.fixture(scope='module')
def gcs():
    server = FakeGcs()
    server.make_bucket(BUCKET)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope='module')
def cli(gcs, tmp_path_factory):
    cli = Cli(tmp_path_factory.mktemp('gcs'), gcs)
    cli.write(f'gs://{BUCKET}/data/tiny.npz', cli.npz.read_bytes())
    # Four test images as PNG files, in a local folder and on gs://, for predict/calibrate.
    test_images = np.load(cli.npz)['test_images'][::6]
    (cli.base / 'inputs').mkdir()
    for i, image in enumerate(test_images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format='PNG')
        (cli.base / 'inputs' / f'{i}.png').write_bytes(buffer.getvalue())
        cli.write(f'gs://{BUCKET}/inputs/{i}.png', buffer.getvalue())
    return cli


@pytest.fixture(scope='module')
def local_run(cli):
    """The reference: the same run, its data and workdir in local folders."""
    workdir = cli.base / 'local'
    cli.run(f'--workdir={workdir}', log=cli.base / 'local.log')
    return workdir


def test_run_on_gcs_equals_local_then_eval_predict_calibrate_export(cli, local_run, gcs):
    """Training data, workdir and predict inputs on gs://: the local run's results exactly;
    every file a run writes is an object in the bucket; eval, predict, calibrate and export
    work from the gs:// workdir alone and score as the local run does."""
    url = f'gs://{BUCKET}/run'
    log = cli.base / 'gcs.log'
    data = f'gs://{BUCKET}/data/tiny.npz|plots'  # the one run whose plots are checked
    cli.run(f'--workdir={url}', log=log, npz=data)
    reference = json.loads((local_run / 'results.json').read_text())
    assert_same_results(json.loads(cli.read(f'{url}/results.json')), reference)
    assert not (cli.base / 'gs:').exists()  # nothing taken for a relative local path
    objects = gcs.objects(BUCKET, 'run/')
    for name in ('fingerprint.json', 'config.json', 'metrics.jsonl', 'results.json',
                 'scoring_settings.json', 'plots/roc.png', 'plots/score_hist.png',
                 f'checkpoints/{STEPS}/commit_success.txt'):
        assert f'run/{name}' in objects, name
    assert any(o.startswith('run/tensorboard/events.out.tfevents') for o in objects)
    assert 'run/lease.json' not in objects  # released at the end
    local_metrics = (local_run / 'metrics.jsonl').read_text().splitlines()
    gcs_metrics = cli.read(f'{url}/metrics.jsonl').decode().splitlines()
    assert [json.loads(x)['loss'] for x in gcs_metrics] == \
        [json.loads(x)['loss'] for x in local_metrics]

    cli.run('--mode=eval', f'--workdir={url}', log=log, npz=data)
    assert_same_results(json.loads(cli.read(f'{url}/results.json')), reference)

    # gs:// through the command line; the local reference through the same functions in one
    # process set up as the command line's (the CLI modes call exactly these).
    cli.run('--mode=predict', f'--workdir={url}', f'--input=gs://{BUCKET}/inputs', log=log)
    cli.run('--mode=calibrate', f'--workdir={url}', f'--input=gs://{BUCKET}/inputs', log=log)
    cli.run('--mode=export', f'--workdir={url}', log=log)
    assert f'run/export/export_meta.json' in gcs.objects(BUCKET, 'run/export/')
    score = ('import json, sys, numpy as np; from jaxad import export; '
             'a = export.load(sys.argv[1]); x = np.load(sys.argv[2])["test_images"]; '
             'print(json.dumps(a.score(x)[a.headline_score].tolist()))')
    remote = subprocess.run([sys.executable, '-c', score, f'{url}/export', str(cli.npz)],
                            env=cli.env, capture_output=True, text=True, timeout=300)
    assert remote.returncode == 0, remote.stderr[-3000:]
    local = subprocess.run([sys.executable, '-c', LOCAL_REFERENCE, str(local_run),
                            str(cli.base / 'inputs'), str(cli.npz)],
                           env=cli.env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    local = json.loads(local.stdout.splitlines()[-1])

    predictions = json.loads(cli.read(f'{url}/predictions/predictions.json'))
    assert [r['pred_score'] for r in predictions['images']] == local['pred_score']
    assert len(predictions['images']) == 4
    assert cli.read(f'{url}/predictions/predictions.csv').decode().count('\n') == 5
    assert json.loads(cli.read(f'{url}/threshold.json'))['value'] == local['threshold']
    assert json.loads(remote.stdout.splitlines()[-1]) == local['exported']


# The local side of the test above in one process: predict, calibrate, export and the
# exported scorer, as `--mode=predict|calibrate|export` and the scoring command run them.
LOCAL_REFERENCE = """
import json, sys
import numpy as np
from jaxad import export, predict
workdir, inputs, npz = sys.argv[1:]
prediction = predict.predict(workdir, inputs)
predict.calibrate(workdir, inputs)
export.export_run(workdir)
artifact = export.load(workdir + '/export')
exported = artifact.score(np.load(npz)['test_images'])[artifact.headline_score]
with open(workdir + '/threshold.json') as f:
    threshold = json.load(f)['value']
print(json.dumps({'pred_score': [r['pred_score'] for r in prediction['images']],
                  'threshold': threshold, 'exported': np.asarray(exported).tolist()}))
"""


def _wait_for_object(gcs, name, proc, log, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if name in gcs.objects(BUCKET, name.rsplit('/', 1)[0]):
            return
        if proc.poll() is not None:
            pytest.fail(f'the run exited ({proc.returncode}) before {name}:\n'
                        f'{log.read_text()[-3000:]}')
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f'timed out waiting for {name}')


def test_kill_9_on_gcs_resumes_exactly_and_a_damaged_newest_step_falls_back(
        cli, local_run, gcs):
    """kill -9 between checkpoints on gs://, a second command refused while the first is
    live (one writer per workdir), the rerun equal to the uninterrupted local run; then the
    newest step's array files cut to half: the rerun sets it aside under
    checkpoints_damaged/ and retrains from the step before, to the same results."""
    url = f'gs://{BUCKET}/killed'
    log = cli.base / 'killed.log'
    proc = cli.start(f'--workdir={url}', log=log, JAXAD_TEST_STEP_SLEEP='1.5')
    try:
        _wait_for_object(gcs, 'killed/checkpoints/2/commit_success.txt', proc, log)
        second = cli.run(f'--workdir={url}', log=cli.base / 'second.log', expect=75,
                         timeout=120)
        assert 'is in use by another run' in second and f'pid {proc.pid}' in second
    finally:
        proc.kill()
        proc.wait()
    assert 'killed/results.json' not in gcs.objects(BUCKET, 'killed/')
    cli.run(f'--workdir={url}', log=log)
    reference = json.loads((local_run / 'results.json').read_text())
    assert_same_results(json.loads(cli.read(f'{url}/results.json')), reference)

    # As tests/test_checkpoint_recovery.py damages a local step: every OCDBT data file of
    # the item cut to half its length (a crash mid-upload).
    data = [o for o in gcs.objects(BUCKET, f'killed/checkpoints/{STEPS}/state/')
            if '/d/' in o]
    assert data
    for name in data:
        content = cli.read(f'gs://{BUCKET}/{name}')
        cli.write(f'gs://{BUCKET}/{name}', content[:len(content) // 2])
    cli.run(f'--workdir={url}', log=log)
    text = log.read_text()
    assert 'damaged' in text and 'checkpoints_damaged' in text, text[-3000:]
    assert gcs.objects(BUCKET, f'killed/checkpoints_damaged/{STEPS}/')
    assert_same_results(json.loads(cli.read(f'{url}/results.json')), reference)


@pytest.mark.parametrize('case', ['no_bucket', 'no_server', 'no_credentials'])
def test_an_unusable_store_is_one_line_in_bounded_time_and_nothing_is_written(cli, gcs, case):
    """A missing bucket, a server that does not answer (a closed loopback port) and missing
    credentials each stop the run before anything is written: exit status 1, one
    `jaxad: error:` line naming the URL, within the storage timeout plus start-up. The
    timeout is 10 s where the server answers, 3 s where nothing does (the run waits it out)."""
    url = f'gs://{BUCKET}/{case}'
    env = {'JAXAD_STORAGE_TIMEOUT': '10'}
    if case == 'no_bucket':
        url = 'gs://no-such-bucket/run'
    elif case == 'no_server':
        env.update(client_env('http://127.0.0.1:9'), JAXAD_STORAGE_TIMEOUT='3')
    else:
        env.update(GOOGLE_AUTH_TOKEN_FOR_TESTING='',
                   GOOGLE_APPLICATION_CREDENTIALS=str(cli.base / 'no-such-key.json'))
    log = cli.base / f'{case}.log'
    t0 = time.time()
    text = cli.run(f'--workdir={url}', log=log, expect=1, timeout=120, **env)
    elapsed = time.time() - t0
    errors = [line for line in text.splitlines() if line.startswith('jaxad: error:')]
    assert len(errors) == 1 and url in errors[0], text[-3000:]
    assert {'no_bucket': 'does not exist', 'no_server': 'no answer within 3 s',
            'no_credentials': 'no Google Cloud credentials'}[case] in errors[0]
    assert 'Traceback' not in text
    assert elapsed < 60, elapsed
    assert not gcs.objects(BUCKET, f'{case}/')
    assert not (cli.base / 'gs:').exists()


def test_sigterm_on_gcs_saves_the_step_in_flight_and_the_rerun_equals_the_local_run(
        cli, local_run, gcs):
    """SIGTERM between checkpoints of a gs:// run: exit 143, one line naming the step, that
    step committed in the bucket (and no results.json), the lease released; the rerun
    resumes there and gives the uninterrupted local run's results."""
    import re
    import signal
    url = f'gs://{BUCKET}/preempted'
    log = cli.base / 'preempted.log'
    proc = cli.start(f'--workdir={url}', log=log, JAXAD_TEST_STEP_SLEEP='1.5')
    try:
        _wait_for_object(gcs, 'preempted/checkpoints/2/commit_success.txt', proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = re.findall(r'jaxad: preempted \(SIGTERM\) at step (\d+) of (\d+); saved checkpoint '
                       rf'step (\d+) in {re.escape(url)}/checkpoints\.', log.read_text())
    assert len(lines) == 1, log.read_text()[-3000:]
    step = int(lines[0][0])
    assert lines[0] == (str(step), str(STEPS), str(step)) and 2 <= step < STEPS
    objects = gcs.objects(BUCKET, 'preempted/')
    assert f'preempted/checkpoints/{step}/commit_success.txt' in objects
    assert 'preempted/results.json' not in objects and 'preempted/lease.json' not in objects
    cli.run(f'--workdir={url}', log=log)
    assert f'resuming from {url}/checkpoints step {step}' in log.read_text()
    reference = json.loads((local_run / 'results.json').read_text())
    assert_same_results(json.loads(cli.read(f'{url}/results.json')), reference)


def test_a_one_class_table_on_gcs_equals_the_local_table(cli, gcs):
    """A table (two detectors as one stack) in a gs:// workdir reading its data from gs://:
    the same per-class results as the table in a local folder; results.md, the group's
    checkpoints and metrics are objects in the bucket."""
    local = cli.base / 'local_table'
    cli.run(f'--workdir={local}', log=cli.base / 'local_table.log', npz=f'{cli.npz}|table')
    url = f'gs://{BUCKET}/table'
    cli.run(f'--workdir={url}', log=cli.base / 'gcs_table.log',
            npz=f'gs://{BUCKET}/data/tiny.npz|table')
    remote = json.loads(cli.read(f'{url}/results.json'))
    reference = json.loads((local / 'results.json').read_text())
    assert [c['image_AUROC'] for c in remote['classes']] == \
        [c['image_AUROC'] for c in reference['classes']]
    assert remote['mean'] == reference['mean']
    objects = gcs.objects(BUCKET, 'table/')
    assert 'table/results.md' in objects
    assert any(o.startswith('table/groups/') and o.endswith('metrics.jsonl') for o in objects)
    assert any(o.startswith('table/groups/') and '/checkpoints/' in o for o in objects)


def test_two_processes_on_gcs_sigterm_to_one_both_save_the_same_step(cli, gcs):
    """Two CPU processes (jax.distributed on loopback, one device each) training into one
    gs:// workdir; SIGTERM to process 1 only: both stop after the same step, both exit 143,
    that step is committed in the bucket (every process wrote its shards there); the
    two-process rerun resumes from it on both and finishes."""
    import re
    import signal
    import socket
    url = f'gs://{BUCKET}/two_processes'

    def start(name, sleep):
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            address = f'127.0.0.1:{s.getsockname()[1]}'
        return [(cli.start(f'--workdir={url}', f'--coordinator_address={address}',
                           '--num_processes=2', f'--process_id={pid}',
                           log=cli.base / f'{name}_p{pid}.log', JAXAD_TEST_STEP_SLEEP=sleep),
                 cli.base / f'{name}_p{pid}.log') for pid in (0, 1)]

    def wait_all(procs, timeout):
        try:
            return [p.wait(timeout=timeout) for p, _ in procs]
        finally:
            for p, _ in procs:
                if p.poll() is None:
                    p.kill()

    procs = start('first', '1.5')
    try:
        _wait_for_object(gcs, 'two_processes/checkpoints/2/commit_success.txt', *procs[0],
                         timeout=420)
    except BaseException:
        wait_all(procs, 1)
        raise
    procs[1][0].send_signal(signal.SIGTERM)
    codes = wait_all(procs, 300)
    reports = '\n'.join(f'--- {log.name}\n{log.read_text()[-3000:]}' for _, log in procs)
    assert codes == [143, 143], reports
    stopped = [re.findall(r'jaxad: preempted \(SIGTERM to a process of this 2-process run\) '
                          r'at step (\d+) of', log.read_text()) for _, log in procs]
    assert all(len(s) == 1 for s in stopped) and stopped[0] == stopped[1], reports
    step = int(stopped[0][0])
    assert f'two_processes/checkpoints/{step}/commit_success.txt' in \
        gcs.objects(BUCKET, f'two_processes/checkpoints/{step}/')
    assert 'two_processes/results.json' not in gcs.objects(BUCKET, 'two_processes/')

    procs = start('rerun', '0')
    codes = wait_all(procs, 420)
    reports = '\n'.join(f'--- {log.name}\n{log.read_text()[-3000:]}' for _, log in procs)
    assert codes == [0, 0], reports
    for _, log in procs:
        assert f'resuming from {url}/checkpoints step {step}' in log.read_text(), reports
    assert json.loads(cli.read(f'{url}/results.json'))['step'] == STEPS
