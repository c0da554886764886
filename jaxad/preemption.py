"""Preemption-safe training: SIGTERM or SIGINT stops a run at a step boundary, with a
checkpoint of that step.

A `Watch` is armed while a run has training that is not yet in a checkpoint: from the
moment `jaxad.loop.Run.train` has dispatched its first step until the run's (or a table
group's) final checkpoint is committed. On a signal the step in flight is finished, a
checkpoint of *that* step is saved and committed, metrics.jsonl and TensorBoard are flushed,
and `jaxad.errors.Preempted` is raised: `jaxad.main` prints it as one line and exits
128 + the signal number (143 for SIGTERM, 130 for SIGINT); notebooks get the exception.
Rerunning the same command resumes from that step. A signal during the last step or the
scoring fit after it is acted on once the final checkpoint (with the scoring state) is
committed: the rerun then only evaluates. Outside that window nothing is unsaved and a
signal acts as without jaxad (SIGTERM ends the process at once: while loading data, during
the first compile of the step, which can take a minute on a CPU, and while evaluating).

One process. Python handlers for SIGTERM and SIGINT only record the signal (no I/O: a
handler runs between two bytecodes of the main thread, possibly inside a print); the loop
reads the record once per step, after dispatching the step (no device sync). A second
signal while the checkpoint is being saved is recorded and ignored, so the save is never
cut short; the process exits once the step is committed.

Several processes (`jax.distributed` initialized). Every process must stop at, and save,
the same step, so no process may act on its own signal. JAX's coordination service has a
preemption sync protocol for this: `jax.distributed.initialize` creates a
PreemptionSyncManager whose notifier installs a C++ SIGTERM handler (xla's
preemption_notifier.cc: `std::signal(SIGTERM, ...)` sets a flag that a listener thread
polls every second). On a SIGTERM to any process, each process publishes how far it got,
they meet at a barrier, and the sync point is set to the furthest process's counter + 1;
`multihost_utils.reached_preemption_sync_point(n)` then returns True on every process at
the same `n`. This works on CPU with jax/jaxlib 0.10.2 (Gloo; tests/test_preemption.py
runs it with two processes). A Python `signal.signal(SIGTERM, ...)` would replace that C++
handler (the sync point is then never reached: checked in jax 0.10.2), so with several
processes this module installs no SIGTERM handler; SIGINT, which JAX does not watch, is
forwarded to the process itself as a SIGTERM so that it too becomes a preemption notice.
The `n` passed is a process-wide count of `Watch.reached` calls, not the training step:
every process makes the same calls in the same order (one per step, one after a final
save, one before each table group after the first), and the count never repeats when a
table's next group starts again from step 1. Orbax's CheckpointManager calls the same sync point with the
step being saved (for its own logs and metrics, at the start of a save and again from its
finalize thread), which would move the counter the protocol publishes (backwards, to a step
jaxad's count has passed, so the notice would never be acted on); `keep_orbax_off` turns
those calls off on the managers the loop saves with. JAX's handler is there from
`jax.distributed.initialize` to the exit, so with several processes SIGTERM never ends a
process at once: a notice before the first step is acted on at the first step, and one after
a process's last call (during the final evaluation) is never acted on: the run finishes
normally.
"""
import itertools
import os
import signal
import threading

import jax
from absl import logging

from jaxad.errors import Preempted

SIGNALS = (signal.SIGTERM, signal.SIGINT)

# Process-wide ids for `reached_preemption_sync_point` (see the module docstring).
_sync_ids = itertools.count(1)


def _distributed():
    """Whether jax.distributed runs (its preemption sync point and SIGTERM handler exist)."""
    return jax.distributed.is_initialized()


def keep_orbax_off(manager):
    """Stops the Orbax CheckpointManager `manager` from calling JAX's preemption sync point
    (see the module docstring). Orbax 0.12 calls `manager.reached_preemption(step)` in
    `should_save` (not used: jaxad saves with force=True) and to log and time a preemption
    save; the answer is then always False, which changes nothing but those logs."""
    manager.reached_preemption = lambda step: False


def exit_code(signal_name):
    """The exit status of a run preempted by `signal_name`: 128 + its number (the shell's
    convention for a process ended by that signal): 143 for SIGTERM, 130 for SIGINT."""
    return 128 + int(signal.Signals[signal_name])


class Watch:
    """Watches for SIGTERM / SIGINT while a run has training not yet in a checkpoint.

    `with Watch() as watch:` scopes it (the previous handlers are back on exit, whatever
    happens). The handlers are installed by `arm()`, which the loop calls once its first
    step is dispatched, and removed by `disarm()` once the final checkpoint is committed:
    before the first step (data loading, restoring, the step's first compile, which can
    take a minute on a CPU) nothing is unsaved, so a signal acts as without jaxad and ends
    the process at once; so it does during evaluation. `reached()` is asked at each
    boundary. Handlers can only be installed in the main thread; elsewhere a warning says
    the run is not watched.
    """

    def __init__(self):
        self.multi = _distributed()
        self.signal_name = None  # the first signal this process received
        self.repeats = 0  # signals received after the first (ignored until the save is done)
        self.stopping = False  # a stop was agreed: sticky
        self._previous = {}
        self._sync_ok = True
        self._warned_thread = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disarm()

    def arm(self):
        """Installs the handlers (again: a no-op)."""
        if self._previous:
            return
        if threading.current_thread() is not threading.main_thread():
            if not self._warned_thread:
                logging.warning('training outside the main thread: SIGTERM/SIGINT are not '
                                'watched (a signal ends the process without a checkpoint of '
                                'its step)')
                self._warned_thread = True
            return
        if self.multi:
            # SIGTERM stays JAX's (see the module docstring); SIGINT becomes a SIGTERM.
            self._set(signal.SIGINT, self._forward_as_sigterm)
        else:
            for signum in SIGNALS:
                self._set(signum, self._record)

    def disarm(self):
        """Restores the previous handlers (again: a no-op); `reached()` still answers."""
        for signum, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default then.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def _set(self, signum, handler):
        self._previous[signum] = signal.signal(signum, handler)

    def _record(self, signum, frame):  # pylint: disable=unused-argument
        # Runs in the main thread between two bytecodes: set attributes, nothing else.
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        else:
            self.repeats += 1

    def _forward_as_sigterm(self, signum, frame):
        self._record(signum, frame)
        os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier

    # ------------------------------------------------------------------ the boundary

    def reached(self):
        """At a boundary (a step, the end of a final save, the start of a table group):
        whether the run stops here. Every process calls it at the same boundaries and gets
        the same answer; once True it stays True. Host-only: no device is touched."""
        if self.stopping:
            return True
        if self.multi:
            self.stopping = self._sync_point()
        else:
            self.stopping = self.signal_name is not None
        return self.stopping

    def _sync_point(self):
        if not self._sync_ok:
            return False
        from jax.experimental import multihost_utils
        try:
            return multihost_utils.reached_preemption_sync_point(next(_sync_ids))
        except RuntimeError as e:  # jax_enable_preemption_service=False: no manager
            self._sync_ok = False
            logging.warning('preemption sync point unavailable (%s): SIGTERM is not handled by '
                            'jaxad in this multi-process run', e)
            return False

    # ------------------------------------------------------------------ the exception

    @property
    def reason(self):
        if not self.multi:
            return self.signal_name
        if self.signal_name == 'SIGINT':
            return 'SIGINT'
        return f'SIGTERM to a process of this {jax.process_count()}-process run'

    def preempted(self, step, total_steps, directory, *, final=False, group=None,
                  groups_done=None):
        """The `Preempted` to raise once the checkpoint of `step` in `directory` is committed.

        final: the step is the run's last and its checkpoint the final one (with the
        scoring state), so the rerun only evaluates. group / groups_done: a table's group
        name and 'i of n' groups finished before it.
        """
        if self.repeats:
            logging.warning('%d more signal(s) arrived while the checkpoint was being saved; '
                            'ignored until it was committed', self.repeats)
        signal_name = 'SIGINT' if self.signal_name == 'SIGINT' else 'SIGTERM'
        where = f' of group {group} ({groups_done} groups finished)' if group else ''
        what = 'the final checkpoint' if final else 'checkpoint'
        message = (f'preempted ({self.reason}) at step {step} of {total_steps}{where}; saved '
                   f'{what} step {step} in {directory}')
        if final:
            message += ' (training done, not yet evaluated)'
        message += '. Rerun the same command to resume.'
        self.repeats = 0
        return Preempted(message, signal_name=signal_name, step=step, total_steps=total_steps,
                         directory=directory, exit_code=exit_code(signal_name))

    def preempted_between_groups(self, next_group, groups_done, directory):
        """The `Preempted` of a table stopped before `next_group` started (every earlier
        group is finished and saved)."""
        signal_name = 'SIGINT' if self.signal_name == 'SIGINT' else 'SIGTERM'
        message = (f'preempted ({self.reason}) before group {next_group} started '
                   f'({groups_done} groups finished; checkpoints in {directory}). Rerun the '
                   'same command to resume.')
        return Preempted(message, signal_name=signal_name, step=0, total_steps=None,
                         directory=directory, exit_code=exit_code(signal_name))
