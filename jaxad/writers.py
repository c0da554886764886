"""Metrics to JSONL and a console progress line with ETA (process 0 only)."""
import json
import os
import sys
import time

import jax


def _is_writer():
    return jax.process_index() == 0


class MetricWriter:
    """Appends one JSON object per logged step to `workdir/metrics.jsonl`."""

    def __init__(self, workdir, filename='metrics.jsonl'):
        self.path = os.path.join(workdir, filename)

    def write(self, step, metrics):
        if not _is_writer():
            return
        record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')


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
