"""MetricWriter: JSONL plus hand-encoded TensorBoard event files (no TensorFlow needed)."""
import glob
import json
import os
import struct

import numpy as np

from jaxad import writers

SCALARS = {1: {'loss': 2.5, 'lr': 0.1, 'images_per_sec': 1234.5678},
           2: {'loss': 1.25, 'lr': 0.05, 'images_per_sec': 2345.6789},
           3: {'loss': 1.0 / 3.0, 'lr': 1e-7, 'images_per_sec': 3456.789}}


def _reference_crc32c(data):
    """Bit-at-a-time CRC-32C, independent of the table-driven one in jaxad.writers."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(crc):
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path):
    """Splits a TFRecord file, checking both masked CRCs of every record."""
    with open(path, 'rb') as f:
        blob = f.read()
    out, pos = [], 0
    while pos < len(blob):
        header = blob[pos:pos + 8]
        (length,) = struct.unpack('<Q', header)
        (length_crc,) = struct.unpack('<I', blob[pos + 8:pos + 12])
        assert length_crc == _masked(_reference_crc32c(header))
        data = blob[pos + 12:pos + 12 + length]
        assert len(data) == length
        (data_crc,) = struct.unpack('<I', blob[pos + 12 + length:pos + 16 + length])
        assert data_crc == _masked(_reference_crc32c(data))
        out.append(data)
        pos += 16 + length
    assert pos == len(blob)
    return out


def _write_run(workdir, **kwargs):
    os.makedirs(str(workdir), exist_ok=True)
    w = writers.MetricWriter(str(workdir), tensorboard=True, **kwargs)
    for step, metrics in SCALARS.items():
        w.write(step, metrics)
    (path,) = glob.glob(os.path.join(str(workdir), 'tensorboard', 'events.out.tfevents.*'))
    return path


def test_crc32c_known_vectors():
    assert writers.crc32c(b'') == 0
    assert writers.crc32c(b'123456789') == 0xE3069283
    assert writers.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert writers.crc32c(b'\xff' * 32) == 0x62A8AB43  # RFC 3720 B.4: 32 bytes of 0xff
    assert writers.crc32c(bytes(range(32))) == 0x46DD794E  # RFC 3720 B.4: incrementing
    data = bytes(range(256)) * 3
    assert writers.crc32c(data) == _reference_crc32c(data)
    assert writers.crc32c(data[100:], writers.crc32c(data[:100])) == writers.crc32c(data)


def test_varint_matches_protobuf_int64():
    assert writers._varint(0) == b'\x00'
    assert writers._varint(1) == b'\x01'
    assert writers._varint(300) == b'\xac\x02'
    assert writers._varint(-1) == b'\xff' * 9 + b'\x01'


def test_event_file_framing_and_jsonl(tmp_path):
    path = _write_run(tmp_path)
    assert os.path.basename(path).startswith('events.out.tfevents.')
    records = _records(path)  # checks both CRCs of every record
    assert len(records) == 1 + len(SCALARS)  # file_version record, then one per write
    assert b'brain.Event:2' in records[0]
    lines = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    assert [r['step'] for r in lines] == [1, 2, 3]
    assert lines[0]['loss'] == 2.5


def test_event_file_round_trip_through_tensorboard(tmp_path):
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.compat.proto import event_pb2

    path = _write_run(tmp_path)
    events = [event_pb2.Event.FromString(r) for r in _records(path)]  # protobuf's own parser
    loaded = list(event_file_loader.EventFileLoader(path).Load())  # TensorBoard's reader
    assert len(loaded) == len(events) == 1 + len(SCALARS)
    assert loaded[0].file_version == 'brain.Event:2'
    for got in loaded[1:]:
        assert got.step in SCALARS
        assert got.wall_time > 1e9
        values = {}
        for v in got.summary.value:
            if v.HasField('simple_value'):
                values[v.tag] = v.simple_value
            else:  # TensorBoard versions that migrate scalars to tensors
                values[v.tag] = float(np.asarray(v.tensor.float_val)[0])
        expected = SCALARS[got.step]
        assert set(values) == set(expected)
        for tag, value in expected.items():
            assert values[tag] == np.float32(value), tag
    assert [e.step for e in events[1:]] == [1, 2, 3]
    assert events[0] == loaded[0]


def test_event_accumulator_sees_scalars(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    _write_run(tmp_path)
    acc = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'))
    acc.Reload()
    assert sorted(acc.Tags()['scalars']) == sorted(SCALARS[1])
    loss = acc.Scalars('loss')
    assert [s.step for s in loss] == [1, 2, 3]
    np.testing.assert_array_equal([s.value for s in loss],
                                  np.float32([SCALARS[s]['loss'] for s in (1, 2, 3)]))
    # what the TensorBoard UI reads: scalars migrated to tensors by data_compat
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.util import tensor_util
    acc = plugin_event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'))
    acc.Reload()
    assert sorted(acc.Tags()['tensors']) == sorted(SCALARS[1])
    lr = acc.Tensors('lr')
    assert [e.step for e in lr] == [1, 2, 3]
    np.testing.assert_array_equal([tensor_util.make_ndarray(e.tensor_proto) for e in lr],
                                  np.float32([SCALARS[s]['lr'] for s in (1, 2, 3)]))


def test_new_file_per_writer_and_subdir(tmp_path):
    _write_run(tmp_path / 'a')
    (tmp_path / 'b').mkdir()
    for _ in range(2):  # a resumed run: a second writer in the same second and directory
        w = writers.MetricWriter(str(tmp_path / 'b'), tensorboard='tb')
        w.write(5, {'loss': 1.0})
    files = sorted(glob.glob(str(tmp_path / 'b' / 'tb' / 'events.out.tfevents.*')))
    assert len(files) == 2
    for path in files:
        assert len(_records(path)) == 2


def test_off_by_default_and_only_process_zero_writes(tmp_path, monkeypatch):
    (tmp_path / 'off').mkdir()
    writers.MetricWriter(str(tmp_path / 'off')).write(1, {'loss': 1.0})
    assert os.listdir(tmp_path / 'off') == ['metrics.jsonl']
    monkeypatch.setattr(writers, '_is_writer', lambda: False)
    (tmp_path / 'other').mkdir()
    w = writers.MetricWriter(str(tmp_path / 'other'), tensorboard=True)
    for step, metrics in SCALARS.items():
        w.write(step, metrics)
    assert os.listdir(tmp_path / 'other') == []


def test_config_default_is_off():
    from jaxad import config
    assert config.csi_base().tensorboard is False
