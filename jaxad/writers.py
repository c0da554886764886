"""Metrics to JSONL (and optionally TensorBoard event files) and a console progress line with
ETA (process 0 only).

The TensorBoard output is written by hand (TFRecord-framed `Event` protos, encoded below), so
neither TensorFlow nor tensorboard is needed at run time; `tensorboard --logdir WORKDIR` reads it.
"""
import json
import os
import socket
import struct
import sys
import time

import jax


def _is_writer():
    return jax.process_index() == 0


def _crc32c_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data, crc=0):
    """CRC-32C (Castagnoli), as TFRecord uses; `crc` continues a previous value."""
    crc ^= 0xFFFFFFFF
    table = _CRC32C_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data):
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack('<Q', len(data))
    return (length + struct.pack('<I', masked_crc32c(length)) + data
            + struct.pack('<I', masked_crc32c(data)))


def _varint(n):
    n &= 0xFFFFFFFFFFFFFFFF  # int64: negatives as 10-byte two's complement, as protobuf does
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _bytes_field(number, payload):
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time, step=None, file_version=None, scalars=None):
    """A serialized tensorflow.Event: wall_time (1, double), step (2, int64), file_version
    (3, string), summary (5) = Summary{value (1): [Value{tag (1), simple_value (2, float)}]}."""
    out = b'\x09' + struct.pack('<d', wall_time)
    if step is not None:
        out += b'\x10' + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        summary = b''.join(
            _bytes_field(1, _bytes_field(1, str(tag).encode())
                         + b'\x15' + struct.pack('<f', float(value)))
            for tag, value in scalars.items())
        out += _bytes_field(5, summary)
    return out


class EventFileWriter:
    """Scalars to `logdir/events.out.tfevents.<time>.<host>`; a new file per instance (as TF
    does), opened on the first write, appended and flushed on every write."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.path = None

    def _open(self):
        os.makedirs(self.logdir, exist_ok=True)
        base = os.path.join(self.logdir,
                            f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}')
        for n in range(1000):  # two writers in one directory and second: never share a file
            path = f'{base}.{n}' if n else base
            try:
                f = open(path, 'xb')
            except FileExistsError:
                continue
            with f:
                f.write(tfrecord(encode_event(time.time(), step=0, file_version='brain.Event:2')))
            self.path = path
            return
        raise FileExistsError(f'no free event file name like {base}')

    def write_scalars(self, step, scalars):
        if self.path is None:
            self._open()
        with open(self.path, 'ab') as f:  # closed (hence flushed) after every write
            f.write(tfrecord(encode_event(time.time(), step=step, scalars=scalars)))


class MetricWriter:
    """Appends one JSON object per logged step to `workdir/metrics.jsonl`; with `tensorboard`
    (True, or a subdirectory name) also the scalars to event files in `workdir/tensorboard/`."""

    def __init__(self, workdir, filename='metrics.jsonl', tensorboard=False):
        self.path = os.path.join(workdir, filename)
        self.events = None
        if tensorboard:
            subdir = tensorboard if isinstance(tensorboard, str) else 'tensorboard'
            self.events = EventFileWriter(os.path.join(workdir, subdir))

    def write(self, step, metrics):
        if not _is_writer():
            return
        record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        if self.events is not None:
            self.events.write_scalars(int(step), {k: v for k, v in record.items() if k != 'step'})


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
