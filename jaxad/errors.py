"""The exceptions jaxad raises for bad input, and for a run stopped by a signal.

`jaxad.main` turns any `JaxadError` into one line on stderr and exit status 1,
so every message must say what is wrong and where (path, class, key). `Preempted` is
the exception: one line too, but exit status `exit_code` (143 for SIGTERM, 130 for SIGINT).
"""


class JaxadError(Exception):
    """Base class: a user-facing problem with input, config or a run."""


class DataError(JaxadError):
    """Missing/corrupt/empty data, or images of the wrong shape."""


class ConfigError(JaxadError):
    """An unknown method, dataset, option or an inconsistent config."""


class TrainingError(JaxadError):
    """A run that cannot continue (NaN loss, incompatible checkpoint)."""


class Preempted(TrainingError):
    """Training stopped on SIGTERM or SIGINT (`jaxad.preemption`) after the checkpoint of
    `step` in `directory` was committed; rerunning the same command resumes there.

    Not a finished run: `jaxad.main` prints the message as one line and exits with
    `exit_code`, 128 + the signal number (143 for SIGTERM, 130 for SIGINT), as a process
    ended by that signal would. `signal_name`: 'SIGTERM' or 'SIGINT'; `total_steps`: the
    run's (None when a table stopped between groups, `step` then 0).
    """

    def __init__(self, message, *, signal_name, step, total_steps, directory, exit_code):
        super().__init__(message)
        self.signal_name, self.step, self.total_steps = signal_name, step, total_steps
        self.directory, self.exit_code = directory, exit_code


class WorkdirBusy(TrainingError):
    """Another live run holds the workdir's lease (`jaxad.lease`). Exit status 75
    (EX_TEMPFAIL): trying again later can succeed, so launchers that rerun a preempted
    command retry it, unlike status 1."""
    exit_code = 75
