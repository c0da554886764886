"""Metrics to JSONL (and optionally TensorBoard event files) and a console progress line with
ETA (process 0 only).

The TensorBoard event files are written by tensorboardX (no TensorFlow needed);
`tensorboard --logdir WORKDIR` reads them.
"""
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
import weakref

import jax

from jaxad import storage

# Seconds between tensorboardX's background flushes: how stale a live
# `tensorboard --logdir` view may be. Closing a writer (or the process exiting) flushes.
TENSORBOARD_FLUSH_SECS = 2
# Seconds between uploads of the event files to an object-store workdir.
UPLOAD_SECS = 30
_event_file_ids = itertools.count()


def _import_tensorboardx():
    """tensorboardX, imported without torch when torch is not imported yet: tensorboardX
    imports all of torch (2-4 s) only to recognise torch tensors among the values it is
    given, and jaxad gives it protobuf summaries of floats. A `None` entry in sys.modules
    makes its `import torch` fail as if torch were absent; the entry is removed again, so a
    later `import torch` anywhere works as usual."""
    import sys
    if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
        import tensorboardX
        return tensorboardX
    sys.modules['torch'] = None
    try:
        import tensorboardX
    finally:
        del sys.modules['torch']
    return tensorboardX


def _is_writer():
    return jax.process_index() == 0


class MetricWriter:
    """Appends one JSON object per logged step to `workdir/metrics.jsonl`; with `tensorboard`
    (True, or a subdirectory name) also the scalars to event files in `workdir/tensorboard/`.

    Each `write` is one TensorBoard event holding every scalar, tagged with its metric name
    as is (several writes per step are fine). The event file is opened on the first write
    (only process 0 writes), one new file per writer, so a resumed run never overwrites
    an earlier one. tensorboardX writes it in the background: `close()` (or leaving a `with`
    block, garbage collection, interpreter exit) writes everything out and closes the file.
    """

    def __init__(self, workdir, filename='metrics.jsonl', tensorboard=False):
        self.path = storage.join(workdir, filename)
        self.logdir = None
        if tensorboard:
            subdir = tensorboard if isinstance(tensorboard, str) else 'tensorboard'
            self.logdir = storage.join(workdir, subdir)
        self._events = None  # tensorboardX.FileWriter, opened on the first write
        self._close_events = None
        # On an object store (no append) metrics.jsonl is rewritten whole at every write,
        # from the lines kept here; event files are written to a local folder and uploaded
        # at most every UPLOAD_SECS and when the writer closes.
        self._remote = storage.is_url(self.path)
        self._lines = None
        self._staging = None
        self._uploaded = 0.0

    def _event_writer(self):
        if self._events is None:
            tensorboardX = _import_tensorboardx()
            # pid and a counter: tensorboardX names files by host and second only.
            suffix = f'.{os.getpid()}.{next(_event_file_ids)}'
            logdir = self.logdir
            if self._remote:
                self._staging = logdir = tempfile.mkdtemp(prefix='jaxad-events-')
            self._events = tensorboardX.FileWriter(
                logdir, flush_secs=TENSORBOARD_FLUSH_SECS, filename_suffix=suffix)
            self._close_events = weakref.finalize(self, self._events.close)
        return self._events

    def write(self, step, metrics):
        if not _is_writer():
            return
        record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
        line = json.dumps(record) + '\n'
        if self._remote:
            if self._lines is None:  # a resumed run continues the file
                self._lines = [storage.read_text(self.path)] if storage.isfile(self.path) else []
            self._lines.append(line)
            storage.write_text(self.path, ''.join(self._lines))
        else:
            with open(self.path, 'a') as f:
                f.write(line)
        if self.logdir is not None:
            events = self._event_writer()
            from tensorboardX.proto import summary_pb2
            # A Summary built here rather than with add_scalar, which renames tags with
            # characters TensorFlow op names disallow (table tags like 'loss/Ankle boot').
            summary = summary_pb2.Summary(value=[
                summary_pb2.Summary.Value(tag=k, simple_value=v)
                for k, v in record.items() if k != 'step'])
            events.add_summary(summary, global_step=record['step'])
            if self._staging and time.time() - self._uploaded > UPLOAD_SECS:
                events.flush()
                self._upload_events()

    def _upload_events(self):
        storage.sync_folder(self._staging, self.logdir)
        self._uploaded = time.time()

    def close(self):
        """Writes out and closes the event file (a later `write` opens a new one); the JSONL
        file is closed after every write anyway."""
        if self._close_events is not None:
            self._close_events()  # runs once: the finalizer does nothing after this
            self._events = self._close_events = None
            if self._staging:
                self._upload_events()
                shutil.rmtree(self._staging, ignore_errors=True)
                self._staging = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def format_duration(seconds):
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f'{h:d}:{m:02d}:{s:02d}' if h else f'{m:d}:{s:02d}'


class Progress:
    """Prints `label step/total [elapsed<eta] key=value ...` to stderr."""

    def __init__(self, total, first=0, label='train', stream=None):
        self.total, self.first, self.label = total, first, label
        self.stream = stream or sys.stderr
        self.start = time.time()

    def update(self, step, **values):
        if not _is_writer():
            return
        elapsed = time.time() - self.start
        done = step - self.first
        eta = elapsed / done * (self.total - step) if done > 0 else float('nan')
        eta_s = format_duration(eta) if done > 0 else '?'
        parts = ' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                         for k, v in values.items())
        print(f'{self.label} {step}/{self.total} [{format_duration(elapsed)}<{eta_s}] {parts}',
              file=self.stream, flush=True)
