"""data.source='tfds' read for real, without TensorFlow and without a download.

tensorflow-datasets (the `tfds` extra) runs without TensorFlow for what jaxad uses: the
builder, its DatasetInfo and the ArrayRecord data source. It can even prepare a data set
without TensorFlow when the images come as PIL images (numpy images would be PNG-encoded
by TF), so the first tests prepare a tiny data set as ArrayRecord files and read it back
through `load_split` exactly as a prepared CIFAR would be: real files, TFDS's reader,
its decoding. The last one uses `tfds.testing.mock_data` on the real CIFAR-100 builder
(code only: its two label features) to check which split and label feature are read.

Off CI the tests skip when tensorflow-datasets is not installed; on CI (.ci/run installs
the extra) they run and fail without it.
"""
import importlib.util
import pathlib
import sys

import ml_collections
import numpy as np
import pytest

from jaxad.data import pipeline, sources
from jaxad.errors import DataError
from tests.helpers import skip_unless_on_ci

pytestmark = skip_unless_on_ci(importlib.util.find_spec('tensorflow_datasets') is None,
                               "needs tensorflow-datasets: pip install -e '.[tfds]'")

NAME = 'jaxad_tiny_shapes'
CLASSES = ['airplane', 'cat', 'ship']
COARSE = ['vehicle', 'animal']
SPLITS = {'train': (9, 100), 'test': (6, 200)}  # split: (images, channel-2 marker)


def _image(split, i):
    """8x8 RGB: channel 0 = index in the split, 1 = 50 * label, 2 = the split's marker."""
    image = np.empty((8, 8, 3), np.uint8)
    image[..., 0] = i
    image[..., 1] = 50 * (i % len(CLASSES))
    image[..., 2] = SPLITS[split][1]
    return image


def _make_builder(tfds):
    from PIL import Image

    class JaxadTinyShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Found by name from its files in data_dir, as a data set prepared elsewhere."""
        VERSION = tfds.core.Version('1.0.0')
        # No source file to look for a checksums file beside: tensorflow-datasets 4.9.10
        # finds it through `importlib_resources`, which it does not install.
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(8, 8, 3)),
                'label': tfds.features.ClassLabel(names=CLASSES),
                'coarse_label': tfds.features.ClassLabel(names=COARSE),
            }))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in SPLITS}

        def _generate_examples(self, split):
            for i in range(SPLITS[split][0]):
                label = i % len(CLASSES)
                yield f'{split}{i}', {'image': Image.fromarray(_image(split, i)),
                                      'label': label,
                                      'coarse_label': int(CLASSES[label] == 'cat')}

    return JaxadTinyShapes


@pytest.fixture(scope='module')
def tfds():
    import tensorflow_datasets
    return tensorflow_datasets


@pytest.fixture(scope='module')
def data_dir(tfds, tmp_path_factory):
    root = tmp_path_factory.mktemp('tfds')
    _make_builder(tfds)(data_dir=str(root), file_format='array_record').download_and_prepare()
    assert sorted(p.name for p in (root / NAME / '1.0.0').glob('*.array_record-*')) == [
        f'{NAME}-test.array_record-00000-of-00001', f'{NAME}-train.array_record-00000-of-00001']
    return str(root)


def data_cfg(**fields):
    """The `config.data` fields load_split reads, locked as in a real config."""
    cfg = ml_collections.ConfigDict(dict(
        source='tfds', path='', image_size=8, channels=3, test_fraction=0.5, split_seed=0,
        tfds_name=NAME, tfds_data_dir='', label_key='label', numpy_path='', tfds_download=False,
        tfds_alternative=''))
    cfg.update(fields)
    cfg.lock()
    return cfg


def _all_images(image_set):
    return np.stack([image_set.images[i] for i in range(len(image_set))])


def test_prepared_dataset_train_and_test_splits(data_dir):
    sets = {split: sources.load_split(data_cfg(tfds_data_dir=data_dir), split)
            for split in SPLITS}
    for split, image_set in sets.items():
        n, marker = SPLITS[split]
        assert image_set.name == f'tfds:{NAME} [{split}]'
        assert len(image_set) == n and len(image_set.images) == n
        assert image_set.class_names == CLASSES
        assert image_set.labels.dtype == np.int64
        images = _all_images(image_set)  # decoded lazily, one record at a time
        assert images.shape == (n, 8, 8, 3) and images.dtype == np.uint8
        assert (images[..., 2] == marker).all()  # every image from this split
        # each example once (TFDS shuffles the records), each label with its own image
        assert sorted(images[:, 0, 0, 0]) == list(range(n))
        np.testing.assert_array_equal(image_set.labels, images[:, 0, 0, 1] // 50)
        np.testing.assert_array_equal(image_set.labels, images[:, 0, 0, 0] % len(CLASSES))


def test_label_key_picks_the_label_feature(data_dir):
    fine = sources.load_split(data_cfg(tfds_data_dir=data_dir), 'test')
    coarse = sources.load_split(data_cfg(tfds_data_dir=data_dir, label_key='coarse_label'),
                                'test')
    assert coarse.class_names == COARSE
    # same records in the same order, labelled by the other feature
    np.testing.assert_array_equal(_all_images(coarse), _all_images(fine))
    np.testing.assert_array_equal(coarse.labels, (fine.labels == CLASSES.index('cat')))


def test_one_class_indices_and_pipeline_on_tfds_data(data_dir):
    train = sources.load_split(data_cfg(tfds_data_dir=data_dir), 'train')
    test = sources.load_split(data_cfg(tfds_data_dir=data_dir), 'test')
    cat = CLASSES.index('cat')
    normal = sources.one_class_indices(train.labels, [cat], len(train.class_names))
    assert len(normal) == 3
    np.testing.assert_array_equal(normal, np.flatnonzero(train.labels == cat))
    np.testing.assert_array_equal(sources.anomaly_labels(test.labels, [cat]),
                                  (test.labels != cat).astype(int))
    # the lazily decoded images go through jaxad's (grain) input pipeline
    batches = list(pipeline.eval_batches(train, normal, batch_size=2, read_threads=1))
    assert len(batches) == 2
    images = np.concatenate([b['image'][b['mask']] for b in batches])
    labels = np.concatenate([b['label'][b['mask']] for b in batches])
    assert images.shape == (3, 8, 8, 3) and (labels == cat).all()
    assert (images[:, 0, 0, 1] == 50 * cat).all() and (images[..., 2] == 100).all()


def test_prepared_dataset_errors(data_dir):
    with pytest.raises(DataError, match=r"features \['coarse_label', 'image', 'label'\]; "
                                        r"needs 'image' and 'fine'"):
        sources.load_split(data_cfg(tfds_data_dir=data_dir, label_key='fine'), 'train')
    with pytest.raises(DataError, match=f"'{NAME}' split 'validation' is not prepared"):
        sources.load_split(data_cfg(tfds_data_dir=data_dir), 'validation')
    with pytest.raises(DataError, match=f"(?s)'{NAME}' split 'train' is not prepared.*tfds build"):
        sources.load_split(data_cfg(tfds_data_dir=data_dir + '/elsewhere'), 'train')


def test_download_on_first_use_reads_prepared_data_as_it_is(data_dir, monkeypatch):
    # The CIFAR configs' tfds_download=True: data already prepared in tfds_data_dir is read
    # as before, without TensorFlow and without preparing anything again.
    monkeypatch.setitem(sys.modules, 'tensorflow', None)  # an import would fail now
    version_dir = pathlib.Path(data_dir) / NAME / '1.0.0'
    before = sorted(p.name for p in version_dir.iterdir())
    image_set = sources.load_split(data_cfg(tfds_data_dir=data_dir, tfds_download=True,
                                            tfds_alternative='pass path=/x'), 'test')
    assert len(image_set) == SPLITS['test'][0] and image_set.class_names == CLASSES
    assert sorted(p.name for p in version_dir.iterdir()) == before


class _ListSource:
    """A random-access data source as `builder.as_data_source` returns (here, from memory)."""

    def __init__(self, records):
        self._records = records

    def __len__(self):
        return len(self._records)

    def __getitem__(self, i):
        return self._records[i]

    def __getitems__(self, keys):
        return [self._records[i] for i in keys]


def test_mock_data_cifar100_split_and_label_key(tfds):
    # mock_data's own random data source does not work with batched reads here
    # (tensorflow-datasets 4.9.10: its __getitems__ is not bound to the mock, so
    # `source.__getitems__(keys)` raises TypeError), hence `as_data_source_fn`.
    requested = []

    def as_data_source(builder, split, **kwargs):
        requested.append((builder.name, split))
        n = SPLITS[split][0]
        return _ListSource([{'image': _image(split, i), 'label': 99 - i,
                             'coarse_label': 19 - i} for i in range(n)])

    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                                as_data_source_fn=as_data_source):
        coarse = sources.load_split(
            data_cfg(tfds_name='cifar100', label_key='coarse_label'), 'train')
        fine = sources.load_split(data_cfg(tfds_name='cifar100'), 'test')
    assert requested == [('cifar100', 'train'), ('cifar100', 'test')]
    assert len(coarse.class_names) == 20 and len(fine.class_names) == 100
    np.testing.assert_array_equal(coarse.labels, 19 - np.arange(9))
    np.testing.assert_array_equal(fine.labels, 99 - np.arange(6))
    assert (coarse.name, fine.name) == ('tfds:cifar100 [train]', 'tfds:cifar100 [test]')
    np.testing.assert_array_equal(fine.images[5], _image('test', 5))


def test_a_prepared_dataset_in_a_gcs_data_dir_is_read_from_a_local_copy(
        data_dir, tmp_path, monkeypatch):
    """data.tfds_data_dir=gs://...: the prepared data set is copied from a real GCS server
    (fake-gcs-server on loopback) to the local cache and read as the local one is."""
    import fsspec
    from tests.gcs import FakeGcs
    server = FakeGcs()
    try:
        for k, v in server.env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv('JAXAD_CACHE_DIR', str(tmp_path / 'cache'))
        bucket = server.make_bucket('tfds-data')
        fs, _ = fsspec.core.url_to_fs(bucket)
        fs.put(str(data_dir), 'tfds-data/tensorflow_datasets', recursive=True)
        local = sources.load_split(data_cfg(tfds_data_dir=str(data_dir)), 'test')
        remote = sources.load_split(
            data_cfg(tfds_data_dir=f'{bucket}/tensorflow_datasets'), 'test')
        np.testing.assert_array_equal(_all_images(remote), _all_images(local))
        np.testing.assert_array_equal(remote.labels, local.labels)
    finally:
        server.stop()
