"""Auxiliary data: outlier-exposure and OOD sets fitted to the main data, the label and
outlier streams of `pipeline.method_train_iterator`."""
import itertools

import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxad import loop
from jaxad.data import pipeline, sources
from jaxad.errors import ConfigError, DataError
from tests.helpers import make_npz, tiny_config


def aux_cfg(**kw):
    c = ml_collections.ConfigDict(dict(source='', path='', tfds_name='', tfds_data_dir='',
                                       label_key='label', numpy_path=''))
    c.update(kw)
    return c


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp('aux') / 'tiny.npz', size=8)


def test_auxiliary_set_is_resized_and_converted_like_pillow(npz):
    got = sources.load_auxiliary(aux_cfg(source='numpy', numpy_path=str(npz)), 'train',
                                 (5, 6, 1), 'oe')
    raw = np.load(npz)['train_images']
    assert got.images.shape == (len(raw), 5, 6, 1) and got.images.dtype == np.uint8
    want = np.asarray(Image.fromarray(raw[3]).convert('L').resize((6, 5), Image.BILINEAR))
    np.testing.assert_array_equal(got.images[3, ..., 0], want)
    same = sources.load_auxiliary(aux_cfg(source='numpy', numpy_path=str(npz)), 'test',
                                  (8, 8, 3), 'oe')
    np.testing.assert_array_equal(same.images, np.load(npz)['test_images'])


def test_auxiliary_set_errors_are_clear(npz, tmp_path):
    with pytest.raises(ConfigError, match='unknown source'):
        sources.load_auxiliary(aux_cfg(source='nope'), 'train', (8, 8, 3), 'oe')
    with pytest.raises(DataError, match='does not exist'):
        sources.load_auxiliary(aux_cfg(source='numpy', numpy_path=str(tmp_path / 'x.npz')),
                               'train', (8, 8, 3), 'oe')


def test_ood_set_is_appended_as_one_anomalous_class(npz):
    test = sources.load_split(tiny_config(npz).data, 'test')
    both = sources.with_ood(test, aux_cfg(source='numpy', numpy_path=str(npz)))
    n = len(test)
    assert len(both) == 2 * n and both.class_names[-1].startswith('OOD: ')
    assert (both.labels[n:] == len(test.class_names)).all()
    np.testing.assert_array_equal(both.labels[:n], test.labels)
    anomaly = sources.anomaly_labels(both.labels, [0, 1, 2])
    assert anomaly[:n].sum() == 0 and anomaly[n:].all()
    sources.check_has_anomalies(both, [0, 1, 2])
    with pytest.raises(DataError, match='nothing to detect'):
        sources.check_has_anomalies(test, [0, 1, 2])
    assert sources.with_ood(test, aux_cfg()) is test


def test_class_positions():
    np.testing.assert_array_equal(pipeline.class_positions([5, 2, 7, 2, 0], [7, 2]),
                                  [-1, 0, 1, 0, -1])


def take(it, n):
    return list(itertools.islice(it, n))


def test_label_and_outlier_streams(npz):
    train_set = sources.load_split(tiny_config(npz).data, 'train')
    normal = np.flatnonzero(np.isin(train_set.labels, [0, 2]))
    others = np.flatnonzero(train_set.labels == 1)
    kw = dict(global_batch_size=4, seed=3)
    batches = take(pipeline.method_train_iterator(
        ('label', 'outlier'), train_set, normal, (0, 2), outliers=(train_set, others), **kw), 8)
    plain = take(pipeline.train_iterator(train_set, normal, **kw), 8)
    lookup = {train_set.images[i].tobytes(): i for i in range(len(train_set))}
    for b, p in zip(batches, plain):
        assert set(b) == {'image', 'label', 'outlier'}
        np.testing.assert_array_equal(b['image'], p['image'])  # the normal stream is unchanged
        idx = [lookup[x.tobytes()] for x in b['image']]
        np.testing.assert_array_equal(b['label'], np.where(train_set.labels[idx] == 2, 1, 0))
        assert all(train_set.labels[lookup[x.tobytes()]] == 1 for x in b['outlier'])
    # Outliers are the normal images again for self-OECL, in an independent order; a
    # resumed stream continues exactly.
    own = take(pipeline.method_train_iterator(('outlier',), train_set, normal, (0, 2),
                                              outliers=(train_set, normal), **kw), 8)
    assert any((b['image'] != b['outlier']).any() for b in own)
    resumed = take(pipeline.method_train_iterator(('outlier',), train_set, normal, (0, 2),
                                                  outliers=(train_set, normal), start_step=5,
                                                  **kw), 3)
    for a, b in zip(own[5:], resumed):
        np.testing.assert_array_equal(a['outlier'], b['outlier'])
    with pytest.raises(ConfigError, match='oe.source'):
        next(pipeline.method_train_iterator(('outlier',), train_set, normal, (0, 2), **kw))


def test_outlier_source_choices(npz):
    config = tiny_config(npz)
    train_set = sources.load_split(config.data, 'train')
    normal = np.flatnonzero(train_set.labels == 0)
    assert loop.outlier_source(config, train_set, normal, (0,)) is None
    config.oe.source = 'normal'
    assert loop.outlier_source(config, train_set, normal, (0,))[1] is normal
    config.oe.source = 'other_classes'
    _, idx = loop.outlier_source(config, train_set, normal, (0,))
    assert set(train_set.labels[idx]) == {1, 2}
    with pytest.raises(DataError, match='no images outside'):
        loop.outlier_source(config, train_set, np.arange(len(train_set)), (0, 1, 2))


def test_config_file_ood_argument():
    from jaxad import config as jc
    for arg, want in (('tfds:cifar100', ('tfds', 'tfds_name', 'cifar100')),
                      ('numpy:/d/o.npz', ('numpy', 'numpy_path', '/d/o.npz')),
                      ('/d/svhn.tar.gz', ('folder', 'path', '/d/svhn.tar.gz'))):
        c = jc.csi_base()
        jc.set_ood(c, arg)
        assert (c.eval.ood.source, getattr(c.eval.ood, want[1])) == (want[0], want[2])
    c = jc.csi_base()
    jc.set_ood(c, '')
    assert c.eval.ood.source == ''
    assert jc.classes_per_detector('0+1+2,3') == 3 and jc.classes_per_detector('all') == 1
