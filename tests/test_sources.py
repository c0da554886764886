"""Data sources: image folders and archives, IDX, digits, npz, TFDS errors, one-class."""
import gzip
import os
import struct
import sys
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image
from sklearn import datasets

from jaxad import config as jc
from jaxad.data import sources
from jaxad.errors import ConfigError, DataError
from tests.helpers import CIFAR_TAR, make_npz, skip_unless_on_ci



def pattern(seed, size=8):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_tree(root, size=8):
    """Class 'cat': RGB PNGs (one .PNG, one RGBA); class 'ant': JPGs and a grey PNG."""
    for split, n in (('train', 3), ('test', 2)):
        cat, ant = root / split / 'cat', root / split / 'ant'
        cat.mkdir(parents=True)
        ant.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(pattern(i, size)).save(cat / f'{i}.png')
            Image.fromarray(pattern(10 + i, size)).save(ant / f'{i}.jpg', quality=95)
        Image.fromarray(pattern(20, size)).save(cat / 'Z.PNG')
        rgba = np.concatenate([pattern(21, size), np.full((size, size, 1), 7, np.uint8)], -1)
        Image.fromarray(rgba, 'RGBA').save(cat / 'rgba.png')
        Image.fromarray(pattern(22, size)[..., 0], 'L').save(ant / 'grey.png')
        (cat / 'notes.txt').write_text('ignored')
    return root


def make_tar(tree, path, top=None):
    with tarfile.open(path, 'w:gz') as tar:
        for split in ('train', 'test'):
            tar.add(tree / split, arcname=f'{top}/{split}' if top else split)
    return path


def data_cfg(**fields):
    c = jc.csi_base().data
    c.update(fields)
    return c


# ----------------------------------------------------------------- image folder


def test_image_folder_decodes_sorted_classes_and_files(tmp_path):
    root = write_tree(tmp_path / 'data')
    s = sources.load_image_folder(root, 'train')
    assert s.class_names == ['ant', 'cat']
    assert s.images.shape == (9, 8, 8, 3) and s.images.dtype == np.uint8
    np.testing.assert_array_equal(s.labels, [0] * 4 + [1] * 5)
    assert s.labels.dtype == np.int64 and len(s) == 9
    # cat files sorted: 0.png 1.png 2.png Z.PNG rgba.png; PNG is lossless.
    for k, i in enumerate([0, 1, 2, 20]):
        np.testing.assert_array_equal(s.images[4 + k], pattern(i))
    np.testing.assert_array_equal(s.images[8], pattern(21))  # alpha dropped
    np.testing.assert_array_equal(s.images[3], np.repeat(pattern(22)[..., :1], 3, -1))
    jpg = np.asarray(Image.open(tmp_path / 'data' / 'train' / 'ant' / '0.jpg'))  # lossy
    np.testing.assert_array_equal(s.images[0], jpg)


def test_image_folder_grey_channels(tmp_path):
    root = write_tree(tmp_path / 'data')
    s = sources.load_image_folder(root, 'test', image_size=8, channels=1)
    assert s.images.shape == (7, 8, 8, 1)


@pytest.mark.parametrize('top', [None, 'cifar'])
def test_archive_equals_folder(tmp_path, top):
    root = write_tree(tmp_path / 'data')
    tar = make_tar(root, tmp_path / 'data.tar.gz', top)
    for split in ('train', 'test'):
        a = sources.load_image_folder(root, split)
        b = sources.load_image_folder(tar, split)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.class_names == b.class_names


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match='nowhere.*does not exist'):
        sources.load_image_folder(tmp_path / 'nowhere', 'train')
    root = write_tree(tmp_path / 'data')
    with pytest.raises(DataError, match="'valid'"):
        sources.load_image_folder(root, 'valid')
    (root / 'val').mkdir()
    with pytest.raises(DataError, match='no class folders'):
        sources.load_image_folder(root, 'val')
    (root / 'val' / 'empty').mkdir()
    with pytest.raises(DataError, match="class folder 'empty'"):
        sources.load_image_folder(root, 'val')
    (tmp_path / 'x.zip').write_bytes(b'zip')
    with pytest.raises(DataError, match='x.zip'):
        sources.load_image_folder(tmp_path / 'x.zip', 'train')
    with pytest.raises(ConfigError, match='channels=2'):
        sources.load_image_folder(root, 'train', channels=2)


def test_corrupt_image_names_the_file(tmp_path):
    root = write_tree(tmp_path / 'data')
    (root / 'train' / 'cat' / 'bad.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    with pytest.raises(DataError, match='bad.jpg'):
        sources.load_image_folder(root, 'train')
    with pytest.raises(DataError, match='bad.jpg'):
        sources.load_image_folder(make_tar(root, tmp_path / 'd.tgz'), 'train')


def test_wrong_image_size_names_file_and_sizes(tmp_path):
    root = write_tree(tmp_path / 'data')
    Image.fromarray(pattern(0, 12)).save(root / 'train' / 'cat' / 'big.png')
    with pytest.raises(DataError, match=r'big.png is 12x12.*0.jpg is 8x8'):
        sources.load_image_folder(root, 'train')
    with pytest.raises(DataError, match=r'0.jpg is 8x8.*image_size is 16x16'):
        sources.load_image_folder(root, 'test', image_size=16)


def test_archive_errors(tmp_path):
    root = write_tree(tmp_path / 'data')
    tar = make_tar(root, tmp_path / 'd.tar.gz')
    with pytest.raises(DataError, match="no 'valid' split"):
        sources.load_image_folder(tar, 'valid')
    (root / 'train' / 'empty').mkdir()
    with pytest.raises(DataError, match="class folder 'empty'"):
        sources.load_image_folder(make_tar(root, tmp_path / 'e.tar.gz'), 'train')
    (tmp_path / 'junk.tar.gz').write_bytes(b'not gzip')
    with pytest.raises(DataError, match='junk.tar.gz'):
        sources.load_image_folder(tmp_path / 'junk.tar.gz', 'train')


@skip_unless_on_ci(not os.path.exists(CIFAR_TAR), reason='../shared/data CIFAR-10 tar not present')
def test_real_cifar10_test_split():
    s = sources.load_image_folder(CIFAR_TAR, 'test', image_size=32)
    assert s.images.shape == (10000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(s.labels), [1000] * 10)
    assert s.class_names[0] == 'airplane' and s.class_names[9] == 'truck'


def test_one_reader_and_one_extension_list(tmp_path):
    """jaxad.data.images is the reader of the folder sources, the pixel sources and predict."""
    from jaxad import inputs, predict
    from jaxad.data import images, pixel_sources

    assert sources.IMAGE_EXTENSIONS is images.IMAGE_EXTENSIONS is predict.IMAGE_EXTENSIONS
    assert pixel_sources.IMAGE_EXTENSIONS is images.IMAGE_EXTENSIONS
    assert sources.ImageSet is pixel_sources.ImageSet is images.ImageSet
    assert images.is_image_file('a.BMP') and images.is_image_file('b.webp')
    assert not images.is_image_file('.hidden.png') and not images.is_image_file('notes.txt')
    # A .bmp (and any other listed extension) is an image for the training folders too.
    root = write_tree(tmp_path / 'data')
    Image.fromarray(pattern(30)).save(root / 'train' / 'cat' / 'zz.bmp')
    np.testing.assert_array_equal(sources.load_image_folder(root, 'train').images[-1],
                                  pattern(30))

    rgba = np.concatenate([pattern(1, 12), np.full((12, 12, 1), 9, np.uint8)], -1)
    path = tmp_path / 'x.png'
    Image.fromarray(rgba, 'RGBA').save(path)
    with Image.open(path) as im:  # the reference: convert, then bilinear resize
        want = np.asarray(im.convert('RGB').resize((8, 8), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(images.read_image(path, 3, 8), want)
    np.testing.assert_array_equal(images.read_image(path.read_bytes(), 3, 8), want)
    np.testing.assert_array_equal(images.read_image(rgba, 3, 8), want)
    np.testing.assert_array_equal(inputs.load_image(str(path), 8, 3), want)
    grey, wh = images.read_image(path, 1, (6, 10), return_size=True)
    assert grey.shape == (6, 10, 1) and wh == (12, 12)
    same = pattern(2)
    assert np.shares_memory(images.read_image(same, 3, 8), same)  # that shape: as is
    assert images.read_image(path, None).shape == (12, 12, 4)  # channels None: decoded mode
    mask = np.zeros((5, 5), np.uint8)
    mask[1:3, 2:4] = 1
    np.testing.assert_array_equal(  # nearest neighbour keeps a mask binary
        images.read_image(mask, size=10, resample=images.NEAREST),
        np.repeat(np.repeat(mask, 2, 0), 2, 1))
    (tmp_path / 'bad.png').write_bytes(b'not an image')
    with pytest.raises(images.DECODE_ERRORS):
        images.read_image(tmp_path / 'bad.png', 3)
    with pytest.raises(DataError, match='cannot decode mask .*bad.png'):
        with images.decode_errors(tmp_path / 'bad.png', 'mask'):
            images.read_image(tmp_path / 'bad.png')
    with pytest.raises(ConfigError, match='channels=2'):
        images.check_channels(2)


# -------------------------------------------------------------------------- IDX


def write_idx(path, array, magic):
    with gzip.open(path, 'wb') as f:
        f.write(struct.pack('>I', magic) + b''.join(struct.pack('>I', d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())
    return path


def write_idx_pair(root, n=5, prefix='train'):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 6, 7), dtype=np.uint8)
    labels = np.arange(n) % 3
    write_idx(root / f'{prefix}-images-idx3-ubyte.gz', images, 2051)
    write_idx(root / f'{prefix}-labels-idx1-ubyte.gz', labels, 2049)
    return images, labels


def test_idx_round_trip(tmp_path):
    images, labels = write_idx_pair(tmp_path)
    s = sources.load_idx(tmp_path / 'train-images-idx3-ubyte.gz',
                         tmp_path / 'train-labels-idx1-ubyte.gz', ['a', 'b', 'c'])
    np.testing.assert_array_equal(s.images[..., 0], images)
    np.testing.assert_array_equal(s.labels, labels)
    assert s.images.shape == (5, 6, 7, 1) and s.class_names == ['a', 'b', 'c']


def test_idx_errors(tmp_path):
    images, labels = write_idx_pair(tmp_path)
    img, lab = tmp_path / 'train-images-idx3-ubyte.gz', tmp_path / 'train-labels-idx1-ubyte.gz'
    with pytest.raises(DataError, match='missing.gz does not exist'):
        sources.load_idx(tmp_path / 'missing.gz', lab)
    with pytest.raises(DataError, match='magic number 2051'):
        sources.load_idx(lab, lab)
    (tmp_path / 'plain.gz').write_bytes(b'not gzip at all')
    with pytest.raises(DataError, match='plain.gz'):
        sources.load_idx(tmp_path / 'plain.gz', lab)
    with gzip.open(tmp_path / 'short.gz', 'wb') as f:
        f.write(gzip.open(img).read()[:-3])
    with pytest.raises(DataError, match='short.gz.*shape'):
        sources.load_idx(tmp_path / 'short.gz', lab)
    write_idx(tmp_path / 'four.gz', labels[:4], 2049)
    with pytest.raises(DataError, match='5 images.*4 labels'):
        sources.load_idx(img, tmp_path / 'four.gz')


def test_fashion_mnist_missing_gives_apt_hint(tmp_path):
    with pytest.raises(DataError, match='apt-get install -y dataset-fashion-mnist'):
        sources.load_fashion_mnist(tmp_path / 'none', 'train')
    with pytest.raises(DataError, match='t10k-images.*apt-get install'):
        sources.load_fashion_mnist(tmp_path, 'test')


@skip_unless_on_ci(not os.path.isdir(sources.FASHION_MNIST_ROOT),
                   reason='apt package dataset-fashion-mnist not installed')
def test_real_fashion_mnist_test_split():
    s = sources.load_fashion_mnist(split='test')
    assert s.images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(s.labels), [1000] * 10)
    assert s.class_names[9] == 'Ankle boot'


# ----------------------------------------------------------------------- digits


def test_digits_split_is_deterministic_and_stratified():
    train = sources.load_digits('train', image_size=16, seed=0)
    test = sources.load_digits('test', image_size=16, seed=0)
    assert train.images.shape[1:] == (16, 16, 3) and train.images.dtype == np.uint8
    assert len(train) + len(test) == 1797
    counts = np.bincount(train.labels) + np.bincount(test.labels)
    np.testing.assert_array_equal(counts, np.bincount(datasets.load_digits().target))
    assert np.all(np.abs(np.bincount(train.labels) - np.bincount(test.labels)) <= 1)
    assert train.images.max() > 200
    np.testing.assert_array_equal(train.images[..., 0], train.images[..., 2])
    again = sources.load_digits('train', image_size=16, seed=0)
    np.testing.assert_array_equal(again.images, train.images)
    other = sources.load_digits('train', image_size=16, seed=1)
    assert not np.array_equal(other.images, train.images)


def test_digits_test_fraction():
    s = sources.load_digits('test', image_size=8, test_fraction=0.25)
    assert abs(len(s) - 0.25 * 1797) <= 1 and s.images.shape[1:] == (8, 8, 3)
    with pytest.raises(ConfigError, match='test_fraction'):
        sources.load_digits('test', test_fraction=1.0)


# ---------------------------------------------------------------- numpy / split


def test_from_numpy_validates():
    s = sources.from_numpy(np.full((4, 5, 5), 3, np.int64), np.array([0, 1, 1, 0]))
    assert s.images.shape == (4, 5, 5, 1) and s.images.dtype == np.uint8
    assert s.class_names == ['0', '1']
    with pytest.raises(DataError, match='0..255'):
        sources.from_numpy(np.full((2, 4, 4, 3), 0.5), [0, 1])
    with pytest.raises(DataError, match='3 images but labels'):
        sources.from_numpy(np.zeros((3, 4, 4, 3), np.uint8), [0, 1])
    with pytest.raises(DataError, match='NHWC'):
        sources.from_numpy(np.zeros((3, 4), np.uint8), [0, 1, 2])
    with pytest.raises(DataError, match='class names'):
        sources.from_numpy(np.zeros((2, 4, 4, 3), np.uint8), [0, 2], ['a', 'b'])


def test_load_split_numpy_digits_folder_idx(tmp_path):
    npz = make_npz(tmp_path / 'd.npz')
    s = sources.load_split(data_cfg(source='numpy', numpy_path=str(npz)), 'test')
    assert s.images.shape == (24, 8, 8, 3) and s.class_names == ['0', '1', '2']
    d = sources.load_split(data_cfg(source='digits', image_size=12), 'train')
    assert d.images.shape[1:] == (12, 12, 3)
    root = write_tree(tmp_path / 'data')
    f = sources.load_split(data_cfg(source='folder', path=str(root), image_size=8), 'train')
    assert f.class_names == ['ant', 'cat']
    write_idx_pair(tmp_path, prefix='t10k')
    i = sources.load_split(data_cfg(source='idx', path=str(tmp_path)), 'test')
    assert i.images.shape == (5, 6, 7, 3)  # grey repeated to data.channels
    with pytest.raises(DataError, match='train_images'):
        sources.load_split(data_cfg(source='numpy', numpy_path=str(npz)), 'train_extra')


def test_load_split_unknown_source():
    with pytest.raises(ConfigError, match="'hdf5'.*folder, idx, fashion_mnist, digits, tfds"):
        sources.load_split(data_cfg(source='hdf5'), 'train')


def test_load_split_reads_only_documented_fields(tmp_path):
    # A locked ConfigDict with just the documented fields is enough for every source.
    fields = dict(source='digits', path='', image_size=8, channels=3, test_fraction=0.5,
                  split_seed=0, tfds_name='', tfds_data_dir='', label_key='label', numpy_path='')
    cfg = ml_collections.ConfigDict(fields)
    cfg.lock()
    assert sources.load_split(cfg, 'test').images.shape[1:] == (8, 8, 3)


def test_tfds_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # import now fails
    with pytest.raises(DataError, match=r"'cifar100'.*run pip install -e '\.\[tfds\]' in the "
                                        r"jaxad checkout$"):
        sources.load_tfds('cifar100', 'train', label_key='coarse_label')
    with pytest.raises(DataError, match=r"pip install -e '\.\[tfds\]' in"):
        sources.load_split(data_cfg(source='tfds', tfds_name='cifar10'), 'train')
    # downloading (the CIFAR configs) will need TensorFlow as well: one command for both
    cfg = data_cfg(source='tfds', tfds_name='cifar10', tfds_download=True,
                   tfds_alternative='pass path=/x')
    with pytest.raises(DataError, match=r"pip install -e '\.\[tfds\]' tensorflow in the jaxad "
                                        r"checkout \(TensorFlow only .*; or pass path=/x$"):
        sources.load_split(cfg, 'train')


# -------------------------------------------------------------------- one-class


def test_one_class_indices_and_anomaly_labels():
    labels = np.array([2, 0, 1, 2, 0, 2])
    np.testing.assert_array_equal(sources.one_class_indices(labels, [2], 3), [0, 3, 5])
    np.testing.assert_array_equal(sources.one_class_indices(labels, (0, 1), 3), [1, 2, 4])
    np.testing.assert_array_equal(sources.anomaly_labels(labels, [2]), [0, 1, 1, 0, 1, 0])
    with pytest.raises(DataError, match='normal class 3 has no images'):
        sources.one_class_indices(labels, [3], 4)
    with pytest.raises(DataError, match='normal class 5 is out of range.*3 classes'):
        sources.one_class_indices(labels, [5], 3)
    with pytest.raises(DataError, match='normal class -1'):
        sources.one_class_indices(labels, [-1], 3)
