"""data.on_device: the training images kept on the devices, each step's batch gathered there
by position (`jaxad.loop.DeviceInput`), must be the batch the host would have sent.

The end-to-end check that a run trained this way equals one fed from the host (a single run
and a stacked table) is in tests/test_table.py; the lowering for cuda/tpu in
tests/test_lowering.py.
"""
import itertools

import numpy as np
import pytest

from jaxad import config as jc
from jaxad import loop, sharding
from jaxad.data import pipeline
from jaxad.data.images import ImageSet
from jaxad.errors import ConfigError


def image_set(n, seed, name):
    rng = np.random.default_rng(seed)
    return ImageSet(images=rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8),
                    labels=np.arange(n) % 3, class_names=['a', 'b', 'c'], name=name)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


@pytest.mark.parametrize('process_index,process_count', [(0, 1), (1, 2)])
def test_positions_gather_exactly_the_host_batches(process_index, process_count):
    """Two detectors (classes 0 and 1) with labels and an outlier stream from another set:
    each one's positions, offset to its rows of the device tables, pick out exactly the
    images (and outliers) its host stream yields, labels unchanged, over several epochs."""
    train, outliers = image_set(30, 0, 'train'), image_set(17, 1, 'outliers')
    kw = dict(global_batch_size=4, seed=3, start_step=2, process_index=process_index,
              process_count=process_count, read_threads=0)
    members = [(np.flatnonzero(train.labels == c), (c,)) for c in (0, 1)]
    oe_indices = np.arange(3, 17)
    sources = [{'image': (train, idx), 'outlier': (outliers, oe_indices)} for idx, _ in members]
    device = loop.DeviceInput(sources, sharding.make_mesh(1))
    tables = {k: np.asarray(v) for k, v in device.tables.items()}
    assert tables['image'].shape == (20, 4, 4, 3) and tables['outlier'].shape == (28, 4, 4, 3)
    assert loop.DeviceInput.nbytes(sources) == (20 + 28) * 48
    for d, (indices, classes) in enumerate(members):
        def stream(images):
            return pipeline.method_train_iterator(
                ('label', 'outlier'), train, indices, classes, outliers=(outliers, oe_indices),
                images=images, **kw)
        host, positions = take(stream(True), 12), take(stream(False), 12)
        for h, p in zip(host, positions):
            assert set(p) == {'positions', 'label'}
            for key in ('image', 'outlier'):
                rows = p['positions'][key] + device.offsets[key][d]
                np.testing.assert_array_equal(tables[key][rows], h[key])
            np.testing.assert_array_equal(p['label'], h['label'])


def test_an_outlier_stream_of_the_normal_images_shares_their_table():
    """self-OECL's outliers are the detector's own normal images: one copy on the devices."""
    train = image_set(12, 0, 'train')
    sources = [{'image': (train, np.arange(c, 12, 3)), 'outlier': (train, np.arange(c, 12, 3))}
               for c in range(2)]
    device = loop.DeviceInput(sources, sharding.make_mesh(1))
    assert device.tables['outlier'] is device.tables['image']
    assert loop.DeviceInput.nbytes(sources) == 8 * 48
    np.testing.assert_array_equal(device.offsets['outlier'], [0, 4])


class MemoryReporting:
    """A device that reports its memory as a GPU's or TPU's `memory_stats()` does."""

    process_index = 0

    def __init__(self, limit):
        self.limit = limit

    def memory_stats(self):
        return {'bytes_limit': self.limit, 'bytes_in_use': 0}


def test_auto_keeps_the_images_on_the_devices_only_when_they_fit():
    """'auto': on when the images take at most ON_DEVICE_MAX_FRACTION of the smallest
    device's memory; off where devices do not report memory (XLA:CPU, this machine)."""
    fraction = loop.ON_DEVICE_MAX_FRACTION
    gib = 2 ** 30
    devices = [MemoryReporting(80 * gib), MemoryReporting(16 * gib)]
    on, why = loop.input_on_device('auto', int(fraction * 16 * gib), devices)
    assert on and '16.0 GiB' in why
    on, why = loop.input_on_device('auto', int(fraction * 16 * gib) + 1, devices)
    assert not on and '>' in why
    import jax
    assert loop.input_on_device('auto', 1, jax.devices()) == (
        False, 'data.on_device=auto: the devices do not report their memory')
    assert loop.input_on_device('true', 10 ** 15, jax.devices())[0]
    assert not loop.input_on_device('false', 1, devices)[0]


def test_an_unknown_setting_is_refused_before_any_data_is_read():
    c = jc.csi_base()
    c.data.on_device = 'yes'
    with pytest.raises(ConfigError, match=r"data\.on_device must be one of auto, true, false, "
                                          r"got 'yes'"):
        jc.validate_config(c)
