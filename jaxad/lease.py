"""One writer per workdir: a lease file that a live run renews and a second run respects.

A run that trains or evaluates writes `WORKDIR/lease.json` (host, pid, a random run id, when
it started, when it last renewed) before it writes anything else, renews it every
`stale_after / 4` seconds from a background thread, and deletes it when it ends (finished,
failed or preempted). A second run on the same workdir:

* refuses with one line naming the holder (host, pid, since when) while the lease is live
  (`WorkdirBusy`: exit status 75, which launchers retry);
* takes the lease over, saying so, when the holder is gone: a process of this host that no
  longer exists (at once), or a lease not renewed for `stale_after` seconds (a run that was
  killed with -9, or whose machine vanished: a preempted VM). Default 120 s,
  `JAXAD_LEASE_STALE_SECS` sets it.

Object stores have no exclusive create, so taking a lease is write-then-confirm: the run
writes its record, waits `CONFIRM_SECS`, and reads it back; when two runs race, the later
write wins and the earlier run sees another id and refuses. A run whose lease is taken
over while it is still alive (it stalled for longer than `stale_after`) finds another id at
its next renewal and stops at once, writing nothing more: the workdir is no longer its own.

Only process 0 of a multi-process run holds the lease; it speaks for the whole run.
"""
import functools
import json
import os
import socket
import sys
import threading
import time
import uuid

import jax
from absl import logging

from jaxad import storage
from jaxad.errors import TrainingError, WorkdirBusy

LEASE_FILE = 'lease.json'
STALE_ENV = 'JAXAD_LEASE_STALE_SECS'
CONFIRM_SECS = 1.0


def _stale_after():
    try:
        return float(os.environ.get(STALE_ENV, 120))
    except ValueError as e:
        raise TrainingError(f'{STALE_ENV} must be a number of seconds') from e


def _when(t):
    return time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(t))


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class Lease:
    """The lease of `workdir` while this run writes there (`with Lease(workdir): ...`)."""

    def __init__(self, workdir):
        self.workdir = storage.normalize(workdir)
        self.path = storage.join(self.workdir, LEASE_FILE)
        self.stale_after = _stale_after()
        self.record = None
        self._stop = threading.Event()
        self._thread = None

    # ------------------------------------------------------------------ records

    def _read(self):
        try:
            value = json.loads(storage.read_text(self.path))
            return value if isinstance(value, dict) and 'run_id' in value else None
        except (OSError, ValueError):
            return None  # no lease, or one half-written by a local writer long gone

    def _write(self):
        self.record['renewed'] = time.time()
        storage.write_json(self.path, self.record, indent=2)

    def _holder_is_gone(self, other, now):
        if other['host'] == socket.gethostname() and not _pid_alive(int(other['pid'])):
            return f'its process {other["pid"]} no longer exists'
        age = now - float(other.get('renewed', 0))
        if age > self.stale_after:
            return f'it was last renewed {age:.0f} s ago (over {self.stale_after:g} s)'
        return None

    def _refuse(self, other, now):
        age = now - float(other.get('renewed', 0))
        return WorkdirBusy(
            f'workdir {self.workdir} is in use by another run (host {other["host"]}, pid '
            f'{other["pid"]}, since {_when(float(other["started"]))}, lease renewed {age:.0f} s '
            f'ago): stop that run or wait for it; a lease not renewed for '
            f'{self.stale_after:g} s is taken over ({STALE_ENV}). Nothing was changed')

    # ------------------------------------------------------------------ acquire

    def acquire(self):
        if jax.process_index() != 0:
            return self
        me = {'host': socket.gethostname(), 'pid': os.getpid()}
        other = self._read()
        now = time.time()
        if other is not None and {k: other.get(k) for k in me} != me:
            gone = self._holder_is_gone(other, now)
            if gone is None:
                raise self._refuse(other, now)
            logging.warning('taking over the lease of %s from host %s pid %s (started %s): %s',
                            self.workdir, other['host'], other['pid'],
                            _when(float(other['started'])), gone)
            print(f'jaxad: took over {self.path} from host {other["host"]} pid {other["pid"]} '
                  f'({gone})', file=sys.stderr, flush=True)
        storage.makedirs(self.workdir)
        self.record = dict(me, run_id=uuid.uuid4().hex, started=now, argv=sys.argv[:8])
        self._write()
        if storage.is_url(self.path):
            time.sleep(CONFIRM_SECS)  # a racing writer's record lands in this window
        held = self._read()
        if held is None or held.get('run_id') != self.record['run_id']:
            self.record = None
            if held is None:
                raise TrainingError(f'cannot confirm the lease {self.path} (it vanished after '
                                    'it was written): is another run starting here?')
            raise self._refuse(held, time.time())
        self._thread = threading.Thread(target=self._renew, daemon=True,
                                        name='jaxad-lease')
        self._thread.start()
        return self

    def _renew(self):
        while not self._stop.wait(self.stale_after / 4):
            held = self._read()
            mine = (self.record['host'], self.record['pid'])
            if held is not None and (held.get('host'), held.get('pid')) != mine:
                # Another run took the workdir over while this one stalled: writing on would
                # mix two runs' files. Stop now, without a word more to the workdir.
                print(f'jaxad: error: the lease of {self.workdir} was taken over by host '
                      f'{held.get("host")} pid {held.get("pid")} (this run stalled for over '
                      f'{self.stale_after:g} s); stopping without writing', file=sys.stderr,
                      flush=True)
                os._exit(1)
            try:
                self._write()
            except Exception as e:  # pylint: disable=broad-except  (a passing store error)
                logging.warning('renewing the lease %s failed (%s); retrying', self.path, e)

    def release(self):
        """Stops renewing and deletes the lease (when it is still this run's)."""
        if self.record is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self._read()
        if held is not None and held.get('run_id') == self.record['run_id']:
            try:
                storage.remove(self.path)
            except OSError:
                pass
        self.record = None

    def __enter__(self):
        return self if self.record is not None else self.acquire()

    def __exit__(self, *exc):
        self.release()


def holds_workdir(run):
    """`run(config, workdir)` with the workdir checked (`storage.check_url`: a URL's bucket,
    server and credentials, one line in bounded time) and leased while it runs. In a
    multi-process run process 0 takes the lease and tells the others whether it got it, so
    that a refused run stops on every process (instead of the others waiting for process 0
    in their first collective)."""
    @functools.wraps(run)
    def leased(config, workdir):
        workdir = storage.normalize(workdir)
        storage.check_url(workdir)
        lease = Lease(workdir)
        refused = None
        try:
            lease.acquire()
        except WorkdirBusy as e:
            refused = e
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils
            held = bool(multihost_utils.broadcast_one_to_all(np.int32(refused is None)))
            if not held and refused is None:
                refused = WorkdirBusy(f'workdir {workdir} is in use by another run (process 0 '
                                      'of this run was refused its lease; see its output)')
        if refused is not None:
            raise refused
        with lease:
            return run(config, workdir)
    return leased
