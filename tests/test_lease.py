"""One writer per workdir (jaxad.lease): refuse a live holder, take over a dead one.

The holder records are written as a run on another machine would write them (another host
name, an old renewal), so the rules are checked without waiting out real timeouts; the
same rules are checked on gs:// against a real GCS server (tests/gcs.py). The command-line
refusal of a second run beside a live one is in tests/test_gcs.py (kill -9 test).
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from jaxad import lease, storage
from jaxad.errors import TrainingError
from tests.gcs import FakeGcs


@pytest.fixture(params=['local', 'gcs'])
def workdir(request, tmp_path, monkeypatch):
    if request.param == 'local':
        yield str(tmp_path / 'run')
        return
    server = FakeGcs()
    try:
        for k, v in server.env.items():
            monkeypatch.setenv(k, v)
        yield server.make_bucket('lease-tests') + '/run'
    finally:
        server.stop()


def holder(workdir, host='tpu-vm-7', pid=4242, renewed_ago=0.0):
    now = time.time()
    record = {'host': host, 'pid': pid, 'run_id': 'other', 'started': now - 3600,
              'renewed': now - renewed_ago}
    storage.makedirs(workdir)
    storage.write_json(storage.join(workdir, lease.LEASE_FILE), record)
    return record


def test_a_live_lease_of_another_host_is_refused_in_one_line(workdir):
    holder(workdir, renewed_ago=5)
    with pytest.raises(TrainingError) as e:
        lease.Lease(workdir).acquire()
    message = str(e.value)
    assert '\n' not in message
    assert 'in use by another run (host tpu-vm-7, pid 4242, since' in message
    assert json.loads(storage.read_text(storage.join(workdir, lease.LEASE_FILE)))[
        'run_id'] == 'other'  # nothing changed


def test_a_stale_lease_is_taken_over_and_released_at_the_end(workdir, monkeypatch, capfd):
    monkeypatch.setenv(lease.STALE_ENV, '30')
    holder(workdir, renewed_ago=31)
    with lease.Lease(workdir) as held:
        record = json.loads(storage.read_text(held.path))
        assert (record['host'], record['pid']) == (socket.gethostname(), os.getpid())
    assert 'took over' in capfd.readouterr().err
    assert not storage.exists(storage.join(workdir, lease.LEASE_FILE))


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(workdir):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    holder(workdir, host=socket.gethostname(), pid=dead.pid, renewed_ago=0)
    with lease.Lease(workdir):
        pass


def test_the_same_process_may_lease_its_workdir_again(workdir):
    """A notebook that calls train_and_evaluate twice on one workdir (same host and pid)."""
    with lease.Lease(workdir):
        with lease.Lease(workdir):
            pass


def test_a_run_whose_lease_was_taken_over_stops_without_writing(tmp_path):
    """A holder that stalled past the stale time finds another run id at its renewal and
    exits (status 1) with one line; the new holder's record is left as it is."""
    workdir = tmp_path / 'run'
    script = (
        'import json, os, time\n'
        'from jaxad import lease\n'
        f'l = lease.Lease({str(workdir)!r}).acquire()\n'
        'record = dict(l.record, run_id="newer", host="tpu-vm-8")\n'
        'open(l.path, "w").write(json.dumps(record))\n'
        'time.sleep(30)\n'
        'print("still running")\n')
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, **{lease.STALE_ENV: '2'}))
    assert proc.returncode == 1, proc.stderr
    assert 'was taken over by host tpu-vm-8' in proc.stderr
    assert 'still running' not in proc.stdout
    assert json.loads((workdir / lease.LEASE_FILE).read_text())['run_id'] == 'newer'
