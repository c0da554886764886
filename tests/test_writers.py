"""MetricWriter: JSONL plus TensorBoard event files (tensorboardX), read back with TensorBoard's
own readers."""
import gc
import glob
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
from tensorboard.backend.event_processing import event_accumulator, event_file_loader
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.util import tensor_util

from jaxad import writers

SCALARS = {1: {'loss': 2.5, 'lr': 0.1, 'images_per_sec': 1234.5678},
           2: {'loss': 1.25, 'lr': 0.05, 'images_per_sec': 2345.6789},
           3: {'loss': 1.0 / 3.0, 'lr': 1e-7, 'images_per_sec': 3456.789}}


def _event_files(logdir):
    return sorted(glob.glob(os.path.join(str(logdir), 'events.out.tfevents.*')))


def _events(path):
    """Every event of one file as written (no scalar-to-tensor migration), through
    TensorBoard's own record reader (which checks the CRCs) and protobuf's parser."""
    return [event_pb2.Event.FromString(r)
            for r in event_file_loader.RawEventFileLoader(path).Load()]


def _accumulator(logdir, plugin=False):
    module = plugin_event_accumulator if plugin else event_accumulator
    acc = module.EventAccumulator(str(logdir))
    acc.Reload()
    return acc


def _write_run(workdir, **kwargs):
    os.makedirs(str(workdir), exist_ok=True)
    with writers.MetricWriter(str(workdir), tensorboard=True, **kwargs) as w:
        for step, metrics in SCALARS.items():
            w.write(step, metrics)
    (path,) = _event_files(os.path.join(str(workdir), 'tensorboard'))
    return path


def test_event_file_holds_one_event_per_write_and_jsonl(tmp_path):
    path = _write_run(tmp_path)
    events = _events(path)
    assert len(events) == 1 + len(SCALARS)  # file_version, then one event per write
    assert events[0].file_version == 'brain.Event:2'
    assert [e.step for e in events[1:]] == [1, 2, 3]
    for got in events[1:]:
        assert got.wall_time > 1e9
        values = {v.tag: v.simple_value for v in got.summary.value}
        assert values == {k: np.float32(v) for k, v in SCALARS[got.step].items()}
    lines = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    assert [r['step'] for r in lines] == [1, 2, 3]
    assert lines[0] == {'step': 1, **SCALARS[1]}


def test_event_accumulator_sees_scalars(tmp_path):
    _write_run(tmp_path)
    acc = _accumulator(tmp_path / 'tensorboard')
    assert sorted(acc.Tags()['scalars']) == sorted(SCALARS[1])
    loss = acc.Scalars('loss')
    assert [s.step for s in loss] == [1, 2, 3]
    np.testing.assert_array_equal([s.value for s in loss],
                                  np.float32([SCALARS[s]['loss'] for s in (1, 2, 3)]))
    # what the TensorBoard UI reads: scalars migrated to tensors by data_compat
    acc = _accumulator(tmp_path / 'tensorboard', plugin=True)
    assert sorted(acc.Tags()['tensors']) == sorted(SCALARS[1])
    lr = acc.Tensors('lr')
    assert [e.step for e in lr] == [1, 2, 3]
    np.testing.assert_array_equal([tensor_util.make_ndarray(e.tensor_proto) for e in lr],
                                  np.float32([SCALARS[s]['lr'] for s in (1, 2, 3)]))


def test_several_writes_per_step_and_tags_kept_verbatim(tmp_path):
    # jaxad.table tags per-class losses 'loss/<class names joined by +>'; tensorboardX's
    # add_scalar would rename those ('loss/Ankle_boot'), so the tags must come through as is.
    with writers.MetricWriter(str(tmp_path), tensorboard=True) as w:
        w.write(2, {'loss': 1.0, 'loss/Ankle boot': 0.5, 'loss/T-shirt/top+Bag': 0.25})
        w.write(2, {'auroc': 0.75})  # a second write at the same step, other tags
        w.write(2, {'loss': 0.9})  # and one that repeats a tag
        w.write(3, {'loss': 0.8, 'auroc': 0.8})
    acc = _accumulator(tmp_path / 'tensorboard')
    assert sorted(acc.Tags()['scalars']) == sorted(
        ['loss', 'loss/Ankle boot', 'loss/T-shirt/top+Bag', 'auroc'])
    assert [(s.step, s.value) for s in acc.Scalars('loss')] == [
        (2, 1.0), (2, np.float32(0.9)), (3, np.float32(0.8))]
    assert [(s.step, s.value) for s in acc.Scalars('auroc')] == [(2, 0.75), (3, np.float32(0.8))]
    assert [(s.step, s.value) for s in acc.Scalars('loss/Ankle boot')] == [(2, 0.5)]
    lines = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    assert [r['step'] for r in lines] == [2, 2, 2, 3]


def test_close_writes_everything_out(tmp_path):
    w = writers.MetricWriter(str(tmp_path), tensorboard=True)
    for step, metrics in SCALARS.items():
        w.write(step, metrics)
    w.close()  # drains tensorboardX's queue, flushes and closes the file
    (path,) = _event_files(tmp_path / 'tensorboard')
    assert len(_events(path)) == 1 + len(SCALARS)
    w.close()
    assert len(_events(path)) == 1 + len(SCALARS)
    w.write(4, {'loss': 0.25})  # after close: a new file, not silently dropped
    w.close()
    new = [p for p in _event_files(tmp_path / 'tensorboard') if p != path]
    assert len(new) == 1 and [e.step for e in _events(new[0])] == [0, 4]
    assert len(_accumulator(tmp_path / 'tensorboard').Scalars('loss')) == 4


def _write_and_drop(workdir):
    """What train() and table.train_group() do: a local writer, never closed explicitly."""
    w = writers.MetricWriter(workdir, tensorboard=True)
    for step, metrics in SCALARS.items():
        w.write(step, metrics)


def test_writer_is_closed_when_dropped(tmp_path):
    _write_and_drop(str(tmp_path))
    gc.collect()  # CPython frees it on return already; this is for other interpreters
    (path,) = _event_files(tmp_path / 'tensorboard')
    assert [e.step for e in _events(path)] == [0, 1, 2, 3]


def test_writer_alive_at_exit_is_flushed(tmp_path):
    # A writer still referenced when the interpreter exits (e.g. a run that raised) is
    # flushed at exit; with 2 s between background flushes nothing would be on disk yet.
    script = textwrap.dedent(f'''
        from jaxad import writers
        w = writers.MetricWriter({str(tmp_path)!r}, tensorboard=True)
        for step in (1, 2, 3):
            w.write(step, {{'loss': 1.0 / step}})
    ''')
    subprocess.run([sys.executable, '-c', script], check=True, timeout=120,
                   env=dict(os.environ, JAX_PLATFORMS='cpu'))
    (path,) = _event_files(tmp_path / 'tensorboard')
    assert [e.step for e in _events(path)] == [0, 1, 2, 3]


def test_new_file_per_writer_and_subdir(tmp_path):
    _write_run(tmp_path / 'a')
    (tmp_path / 'b').mkdir()
    for _ in range(2):  # a resumed run: a second writer in the same second and directory
        with writers.MetricWriter(str(tmp_path / 'b'), tensorboard='tb') as w:
            w.write(5, {'loss': 1.0})
    files = _event_files(tmp_path / 'b' / 'tb')
    assert len(files) == 2
    for path in files:
        assert [e.step for e in _events(path)] == [0, 5]


def test_off_by_default_and_only_process_zero_writes(tmp_path, monkeypatch):
    (tmp_path / 'off').mkdir()
    writers.MetricWriter(str(tmp_path / 'off')).write(1, {'loss': 1.0})
    assert os.listdir(tmp_path / 'off') == ['metrics.jsonl']
    monkeypatch.setattr(writers, '_is_writer', lambda: False)
    (tmp_path / 'other').mkdir()
    with writers.MetricWriter(str(tmp_path / 'other'), tensorboard=True) as w:
        for step, metrics in SCALARS.items():
            w.write(step, metrics)
    assert os.listdir(tmp_path / 'other') == []


def test_config_default_is_off():
    from jaxad import config
    assert config.csi_base().tensorboard is False
