"""Dataset splits as `ImageSet`s: uint8 NHWC images plus labels known up front.

Every loader checks its input and raises `DataError` naming the path, class or
file at fault, so a bad data set stops a run before anything is compiled.
Labels are always a NumPy array, so one-class indexing and metrics never touch
the images.

`load_split(data_cfg, split)` reads these fields of `config.data`:
  source         'folder' | 'idx' | 'fashion_mnist' | 'digits' | 'tfds' | 'numpy'
                 | 'mvtec' | 'folder_masks' (pixel masks; fields in jaxad.data.pixel_sources)
  path           folder or .tar.gz (folder), IDX directory (idx, fashion_mnist;
                 '' = the Debian default for fashion_mnist)
  image_size     expected side (folder; checked per image) / output side (digits)
  channels       1 or 3: decode to (folder) or repeat grey to (idx, fashion_mnist)
  test_fraction  held-out fraction of the digits split
  split_seed     seed of the digits train/test split
  tfds_name, tfds_data_dir, label_key   TFDS dataset, its data dir, label feature
  tfds_download  download and prepare a TFDS data set on first use (needs TensorFlow once)
  tfds_alternative  what to do instead when TFDS cannot give the data (error messages)
  numpy_path     .npz with `{split}_images`, `{split}_labels` (numpy)
"""
import dataclasses
import gzip
import os
import socket
import tarfile
import time

import numpy as np
from absl import logging

from jaxad import storage
from jaxad.data import pixel_sources
from jaxad.data.images import IMAGE_EXTENSIONS, ImageSet
from jaxad.data.images import check_channels, decode_errors, is_image_file, read_image
from jaxad.errors import ConfigError, DataError

FASHION_MNIST_ROOT = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                         'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
SOURCES = ('folder', 'idx', 'fashion_mnist', 'digits', 'tfds', 'numpy', 'mvtec',
           'folder_masks')
PIXEL_SOURCES = ('mvtec', 'folder_masks')  # jaxad.data.pixel_sources
_IDX_PREFIX = {'train': 'train', 'test': 't10k'}  # MNIST file naming
_LOG_EVERY = 10000  # images; loads at least this big log their progress


def from_numpy(images, labels, class_names=None, name='numpy'):
    """Validated `ImageSet` from arrays; NHW (grey) gains a channel axis.

    Integer-valued arrays of another dtype are accepted if they fit 0..255;
    floats in 0..1 are refused rather than silently scaled.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise DataError(f'{name}: images must be NHWC or NHW, got shape {images.shape}')
    if len(images) == 0:
        raise DataError(f'{name}: no images')
    if images.dtype != np.uint8:
        if not (np.issubdtype(images.dtype, np.number) and np.all(images == np.round(images))
                and images.min() >= 0 and images.max() <= 255):
            raise DataError(f'{name}: images must be uint8 or integers in 0..255, got '
                            f'{images.dtype} in [{images.min()}, {images.max()}]')
        images = images.astype(np.uint8)
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f'{name}: {len(images)} images but labels of shape {labels.shape}')
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise DataError(f'{name}: labels must be non-negative integers, got {labels.dtype} '
                        f'with minimum {labels.min()}')
    labels = labels.astype(np.int64)
    if class_names is None:
        class_names = [str(i) for i in range(labels.max() + 1)]
    class_names = [str(c) for c in class_names]
    if labels.max() >= len(class_names):
        raise DataError(f'{name}: label {labels.max()} but only {len(class_names)} class '
                        f'names {class_names}')
    return ImageSet(images, labels, class_names, name)


# ---------------------------------------------------------------- image folder


def load_image_folder(root, split, image_size=None, channels=3):
    """`root/<split>/<class>/<image files>` (or a .tar.gz of it) decoded into one array.

    Class folders sorted by name are labels 0..K-1; files are sorted by name
    within a class so the order does not depend on the file system or archive.
    Every image must have the same size (and be image_size x image_size when
    given); grey and RGBA images are converted to `channels`. Image files are those
    with an extension of `jaxad.data.images.IMAGE_EXTENSIONS`.
    """
    root = os.fspath(root)
    check_channels(channels)
    if not os.path.exists(root):
        raise DataError(f'image folder {root} does not exist')
    if os.path.isdir(root):
        files = _list_folder(root, split)
    elif root.endswith(('.tar.gz', '.tgz')):
        files = _read_archive(root, split)
    else:
        raise DataError(f'{root} is neither a folder nor a .tar.gz/.tgz archive of one')
    class_names = sorted(files)
    items = [(name, data) for c in class_names for name, data in files[c]]
    labels = np.repeat(np.arange(len(class_names)), [len(files[c]) for c in class_names])
    images = _decode_all(items, image_size, channels, f'{root} [{split}]')
    return ImageSet(images, labels.astype(np.int64), class_names, f'{root} [{split}]')


def _list_folder(root, split):
    """{class: [(path, None)]}; files are read while decoding."""
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DataError(f'image folder {root} has no {split!r} split folder ({split_dir})')
    classes = sorted(e.name for e in os.scandir(split_dir)
                     if e.is_dir() and not e.name.startswith('.'))
    if not classes:
        raise DataError(f'{split_dir} has no class folders (expected {split_dir}/<class>/*.png)')
    files = {}
    for c in classes:
        class_dir = os.path.join(split_dir, c)
        names = sorted(n for n in os.listdir(class_dir) if is_image_file(n))
        if not names:
            raise DataError(f'class folder {c!r} ({class_dir}) has no '
                            f'{"/".join(IMAGE_EXTENSIONS)} images')
        files[c] = [(os.path.join(class_dir, n), None) for n in names]
    return files


def _read_archive(path, split):
    """{class: [(name, bytes)]} for one split, in a single streaming pass over the archive.

    Accepts `split/<class>/<file>` at the top or under one top-level folder.
    """
    files, tops, split_seen = {}, set(), False
    try:
        with tarfile.open(path, 'r|gz') as tar:
            for member in tar:
                parts = tuple(p for p in member.name.split('/') if p not in ('', '.'))
                split_seen |= split in parts[:2]
                if member.isdir():
                    class_parts = parts
                elif member.isfile() and is_image_file(parts[-1]):
                    class_parts = parts[:-1]
                else:
                    continue
                if len(class_parts) not in (2, 3) or class_parts[-2] != split:
                    continue
                tops.add(class_parts[:-2])
                class_files = files.setdefault(class_parts[-1], [])
                if member.isfile():
                    class_files.append((f'{path}:{member.name}',
                                        tar.extractfile(member).read()))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f'cannot read archive {path}: {e}') from e
    if len(tops) > 1:
        raise DataError(f'archive {path} has {split}/ under several top-level folders: '
                        f'{sorted("/".join(t) or "." for t in tops)}')
    if not split_seen:
        raise DataError(f'archive {path} has no {split!r} split folder')
    if not files:
        raise DataError(f'archive {path}: {split}/ has no class folders')
    for c, class_files in files.items():
        if not class_files:
            raise DataError(f'class folder {c!r} ({split}/{c} in {path}) has no '
                            f'{"/".join(IMAGE_EXTENSIONS)} images')
        class_files.sort()
    return files


def _decode(name, data, channels):
    """HWC uint8 of a file (`data` None: read from the path `name`) or archive member."""
    with decode_errors(name):
        return read_image(name if data is None else data, channels)


def _decode_all(items, image_size, channels, what):
    """Decodes into one preallocated array, checking every size against the first.

    Serial on purpose: Pillow's per-image Python overhead dominates for small
    images, and a thread pool measured slower than this loop on CIFAR-10.
    """
    t0 = time.time()
    first = _decode(*items[0], channels)
    h, w = first.shape[:2]
    if image_size is not None and (h, w) != (image_size, image_size):
        raise DataError(f'image {items[0][0]} is {h}x{w} (HxW) but image_size is '
                        f'{image_size}x{image_size}')
    images = np.empty((len(items),) + first.shape, np.uint8)
    images[0] = first
    if len(items) >= _LOG_EVERY:
        logging.info('decoding %d images from %s', len(items), what)
    for i in range(1, len(items)):
        array = _decode(*items[i], channels)
        if array.shape != first.shape:
            raise DataError(f'image {items[i][0]} is {array.shape[0]}x{array.shape[1]} (HxW) '
                            f'but {items[0][0]} is {h}x{w}; all images must have one size')
        images[i] = array
        if (i + 1) % _LOG_EVERY == 0:
            logging.info('decoded %d/%d images from %s', i + 1, len(items), what)
    if len(items) >= _LOG_EVERY:
        logging.info('decoded %d images from %s in %.1f s', len(items), what, time.time() - t0)
    return images


# ------------------------------------------------------------------------- IDX


def load_idx(images_gz, labels_gz, class_names=None):
    """MNIST-format IDX files (gzipped): images (N, rows, cols, 1) uint8 and labels."""
    images = _read_idx(images_gz, 2051, 3)
    labels = _read_idx(labels_gz, 2049, 1)
    if len(images) != len(labels):
        raise DataError(f'{images_gz} has {len(images)} images but {labels_gz} has '
                        f'{len(labels)} labels')
    return from_numpy(images, labels, class_names, name=os.fspath(images_gz))


def _read_idx(path, magic, ndim):
    """The uint8 array of an IDX file, checking magic number and length."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f'IDX file {path} does not exist')
    try:
        with gzip.open(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f'cannot read IDX file {path}: {e}') from e
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], 'big') != magic:
        found = int.from_bytes(data[:4], 'big') if len(data) >= 4 else None
        raise DataError(f'{path} is not an IDX file with magic number {magic} (found {found})')
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    if len(data) - header != np.prod(shape):
        raise DataError(f'IDX file {path} header says shape {shape} ({np.prod(shape)} bytes) '
                        f'but holds {len(data) - header} bytes')
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(root=FASHION_MNIST_ROOT, split='train'):
    """Fashion-MNIST from the Debian package's IDX files, with its 10 class names."""
    root = os.fspath(root or FASHION_MNIST_ROOT)
    if not os.path.isdir(root):
        raise DataError(f'Fashion-MNIST folder {root} does not exist; install it with '
                        '`apt-get install -y dataset-fashion-mnist`')
    images_gz, labels_gz = _idx_paths(root, split)
    for path in (images_gz, labels_gz):
        if not os.path.isfile(path):
            raise DataError(f'Fashion-MNIST file {path} is missing; install it with '
                            '`apt-get install -y dataset-fashion-mnist`')
    return dataclasses.replace(load_idx(images_gz, labels_gz, FASHION_MNIST_CLASSES),
                               name=f'fashion_mnist [{split}]')


def _idx_paths(root, split):
    if split not in _IDX_PREFIX:
        raise DataError(f'unknown split {split!r} for IDX data; choose {", ".join(_IDX_PREFIX)}')
    prefix = os.path.join(root, _IDX_PREFIX[split])
    return f'{prefix}-images-idx3-ubyte.gz', f'{prefix}-labels-idx1-ubyte.gz'


# ---------------------------------------------------------------------- digits


def load_digits(split, image_size=16, test_fraction=0.5, seed=0):
    """scikit-learn's bundled 8x8 digits, resized and repeated to RGB.

    The train/test split is stratified by digit and fixed by `seed`, so runs
    with different training seeds are scored on the same test images.
    """
    from sklearn import datasets, model_selection

    if split not in ('train', 'test'):
        raise DataError(f'unknown split {split!r} for digits; choose train, test')
    if not 0 < test_fraction < 1:
        raise ConfigError(f'test_fraction={test_fraction} must be between 0 and 1')
    digits = datasets.load_digits()
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = model_selection.train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed)
    idx = np.sort(train_idx if split == 'train' else test_idx)
    grey = np.round(digits.images[idx] * (255 / 16)).astype(np.uint8)
    resized = np.stack([read_image(g, 1, image_size) for g in grey])  # (N, S, S, 1)
    images = np.repeat(resized, 3, axis=-1)
    return ImageSet(images, labels[idx], [str(d) for d in range(10)], f'digits [{split}]')


# ------------------------------------------------------------------------ TFDS


class _RecordImages:
    """The image feature of a TFDS data source, decoded on access."""

    def __init__(self, source, image_key):
        self._source, self._image_key = source, image_key

    def __len__(self):
        return len(self._source)

    def __getitem__(self, i):
        return np.asarray(self._source[int(i)][self._image_key], np.uint8)


def _local_tfds_dir(name, data_dir):
    """A TFDS data dir that is a URL (gs://...): its folder of data set `name`, prepared
    there, copied once to the local cache (`storage.local_input`; ArrayRecord files are read
    by a C++ reader that opens local files), and a local data dir that holds it."""
    if not data_dir or not storage.is_url(data_dir):
        return data_dir
    builder = name.split(':')[0].split('/')[0]
    copy = storage.local_input(storage.join(data_dir, builder), 'data.tfds_data_dir')
    local_dir = os.path.join(os.path.dirname(copy), 'tfds')
    os.makedirs(local_dir, exist_ok=True)
    link = os.path.join(local_dir, builder)
    if not os.path.islink(link):
        os.symlink(copy, link)
    return local_dir


def load_tfds(name, split, data_dir=None, label_key='label', image_key='image',
              download=False, alternative=''):
    """A TFDS data set, read lazily through its ArrayRecord data source.

    Images are decoded when a batch needs them; labels are read once here (one
    pass over the records). `label_key='coarse_label'` gives CIFAR-100's 20
    superclasses. `download=True` downloads and prepares a data set that is not yet
    prepared in `data_dir` (first use; see `_download_and_prepare`), as `tfds.load`
    does. `alternative`: what the user can do instead when TFDS cannot give the data
    (e.g. "pass path=/path/to/cifar10-jpg.tar.gz"), added to the error message.
    """
    instead = f'; or {alternative}' if alternative else ''
    data_dir = _local_tfds_dir(name, data_dir)
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        if download:  # preparing it will need TensorFlow too: say so now, not next run
            run = ("pip install -e '.[tfds]' tensorflow in the jaxad checkout (TensorFlow only "
                   'to prepare it on first use; later runs read it without)')
        else:
            run = "pip install -e '.[tfds]' in the jaxad checkout"
        raise DataError(f'TFDS data set {name!r} needs tensorflow-datasets, which is not '
                        f'installed: run {run}{instead}') from e
    where = data_dir or '~/tensorflow_datasets'
    try:
        builder = tfds.builder(name, data_dir=data_dir or None, file_format='array_record')
        if download and not builder.is_prepared():
            where = os.fspath(builder.data_dir_root)
            _download_and_prepare(builder, name, where, instead)
        source = builder.as_data_source(split=split)
    except DataError:
        raise
    except Exception as e:  # tfds raises assorted types for unknown/unprepared data
        raise DataError(
            f'TFDS data set {name!r} split {split!r} is not prepared as ArrayRecord in {where} '
            f'({_one_line(e)}). Prepare it once where TensorFlow is installed (e.g. Colab): '
            f'`tfds build {name} --file_format=array_record --data_dir=DIR`, '
            f'then set data.tfds_data_dir=DIR{instead}') from e
    features = builder.info.features
    if label_key not in features or image_key not in features:
        raise DataError(f'TFDS data set {name!r} has features {sorted(features)}; '
                        f'needs {image_key!r} and {label_key!r}')
    labels = np.empty(len(source), np.int64)
    for start in range(0, len(source), 1024):
        keys = list(range(start, min(start + 1024, len(source))))
        labels[start:start + len(keys)] = [r[label_key] for r in source.__getitems__(keys)]
    return ImageSet(_RecordImages(source, image_key), labels,
                    list(features[label_key].names), f'tfds:{name} [{split}]')


# Connection attempts of a TFDS download before it gives up (tensorflow-datasets' own 10,
# with its backoff, take about 200 s to report that there is no network). A transfer that
# breaks after it started is not retried by these anyway.
_TFDS_CONNECT_RETRIES = 2


def _download_and_prepare(builder, name, where, instead):
    """`builder.download_and_prepare` as ArrayRecord, with what it needs checked first.

    What tensorflow-datasets 4.9.10 needs to prepare CIFAR-10 (and CIFAR-100, SVHN), read
    from its source: the download itself is plain `requests`, but
    * `DatasetBuilder.code_path` (core/dataset_builder.py), reached through `url_infos` /
      `_checksums_path` before anything is downloaded, imports `importlib_resources`, which
      tensorflow-datasets requires only on Python < 3.9 (jaxad's `tfds` extra adds it);
    * TensorFlow: the archive is extracted through `tf.io.gfile` (core/download/extractor.py,
      `_copy`), the cifar builder reads each batch file with `tf.io.gfile.GFile`
      (image_classification/cifar.py, `_load_data`) and `tfds.features.Image` PNG-encodes
      NumPy images with `tf.image.encode_png` (core/features/image_feature.py,
      `_ImageEncoder._encode_image`). tensorflow-datasets' use without TensorFlow
      (`as_data_source` over ArrayRecord files) covers reading prepared data, as jaxad
      does, not preparing this builder's.
    Both are checked before the download starts (CIFAR-10 is 163 MiB), so a missing one
    costs nothing. The prepared ArrayRecord files are read later without TensorFlow. A
    multi-process run does not prepare: its processes would race on one data dir.
    """
    import jax
    if jax.process_count() > 1:
        raise DataError(
            f'TFDS data set {name!r} is not prepared in {where}, and a multi-process run does '
            f'not prepare it (its processes would race): prepare it once first with `tfds '
            f'build {name} --file_format=array_record --data_dir=DIR` (needs TensorFlow) and '
            f'set tfds_data_dir=DIR{instead}')
    needs, installs = [], []
    try:
        import importlib_resources  # noqa: F401
    except ImportError:
        needs.append('importlib_resources (tensorflow-datasets imports it without requiring it)')
        installs.append("-e '.[tfds]'")
    try:
        import tensorflow as tf
    except ImportError:
        needs.append('TensorFlow (tensorflow-datasets extracts, reads and PNG-encodes the '
                     'images with it)')
        installs.append('tensorflow')
    if needs:
        checkout = ' in the jaxad checkout' if "-e '.[tfds]'" in installs else ''
        raise DataError(
            f'TFDS data set {name!r} is not prepared in {where}, and downloading and '
            f'preparing it needs {" and ".join(needs)}: run pip install {" ".join(installs)}'
            f'{checkout}, then rerun (the first run downloads and prepares it, later runs '
            f'read it without TensorFlow){instead}')
    # Keep TensorFlow off the accelerators: JAX owns them (TF would reserve GPU memory).
    try:
        tf.config.set_visible_devices([], 'GPU')
    except (AttributeError, RuntimeError, ValueError):  # an old/stand-in TF, or too late
        pass
    from tensorflow_datasets.core.download import downloader
    logging.info('TFDS data set %r is not prepared in %s: downloading and preparing it '
                 '(once)', name, where)
    retries = getattr(downloader, 'MAX_RETRIES', None)
    try:
        if isinstance(retries, int):
            downloader.MAX_RETRIES = min(retries, _TFDS_CONNECT_RETRIES)
        builder.download_and_prepare(file_format='array_record')
    except Exception as e:
        if _is_network_error(e):
            raise DataError(
                f'could not download TFDS data set {name!r} into {where} ({_one_line(e)}): '
                'without internet access, prepare it where there is internet and TensorFlow '
                f'(e.g. Colab: `tfds build {name} --file_format=array_record --data_dir=DIR`), '
                f'copy DIR here and set tfds_data_dir=DIR{instead}') from e
        raise DataError(f'preparing TFDS data set {name!r} in {where} failed: '
                        f'{_one_line(e)}{instead}') from e
    finally:
        if isinstance(retries, int):
            downloader.MAX_RETRIES = retries


def _is_network_error(error):
    """Whether `error` or one of its causes is a failed connection or download (requests'
    and urllib's exceptions, tfds's DownloadError, or the OS's)."""
    names = {'RequestException', 'DownloadError', 'URLError'}
    while error is not None:
        if isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)) or any(
                c.__name__ in names for c in type(error).__mro__):
            return True
        error = error.__cause__ or error.__context__
    return False


def _one_line(error, limit=300):
    """`error` as `Type: message` on one line, cut to `limit` characters."""
    text = ' '.join(f'{type(error).__name__}: {error}'.split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


# ---------------------------------------------------------------- config entry


# Fields of `config.data` (and of auxiliary sources) that name files or folders; a URL there
# is read from a local copy (`storage.local_input`). TFDS reads its data_dir URL itself.
_PATH_FIELDS = ('path', 'numpy_path', 'normal_dir', 'abnormal_dir', 'mask_dir',
                'normal_test_dir')


def _with_local_paths(data_cfg):
    """`data_cfg` with every URL in `_PATH_FIELDS` replaced by a local copy's path."""
    remote = [k for k in _PATH_FIELDS if storage.is_url(str(data_cfg.get(k) or ''))]
    if not remote:
        return data_cfg
    import ml_collections
    local = ml_collections.ConfigDict(data_cfg.to_dict())
    for k in remote:
        local[k] = storage.local_input(data_cfg[k], f'data.{k}')
    return local


def load_split(data_cfg, split):
    """The `split` ('train' or 'test') of the data set `data_cfg` describes."""
    data_cfg = _with_local_paths(data_cfg)
    source = data_cfg.source
    if source in PIXEL_SOURCES:
        return pixel_sources.load_split(data_cfg, split)
    if source == 'folder':
        return load_image_folder(data_cfg.path, split, data_cfg.image_size, data_cfg.channels)
    if source == 'idx':
        images_gz, labels_gz = _idx_paths(data_cfg.path, split)
        image_set = load_idx(images_gz, labels_gz)
    elif source == 'fashion_mnist':
        image_set = load_fashion_mnist(data_cfg.path, split)
    elif source == 'digits':
        image_set = load_digits(split, data_cfg.image_size, data_cfg.test_fraction,
                                data_cfg.split_seed)
    elif source == 'tfds':
        return load_tfds(data_cfg.tfds_name, split, data_cfg.tfds_data_dir or None,
                         data_cfg.label_key, download=data_cfg.get('tfds_download', False),
                         alternative=data_cfg.get('tfds_alternative', ''))
    elif source == 'numpy':
        image_set = _load_npz(data_cfg.numpy_path, split)
    else:
        raise ConfigError(f'unknown data.source {source!r}; choose one of {", ".join(SOURCES)}')
    return _with_channels(image_set, data_cfg.channels)


def _load_npz(path, split):
    if not os.path.isfile(path):
        raise DataError(f'numpy data file {path!r} does not exist')
    with np.load(path) as npz:
        keys = (f'{split}_images', f'{split}_labels')
        missing = [k for k in keys if k not in npz]
        if missing:
            raise DataError(f'{path} lacks {missing}; it has {sorted(npz.files)}')
        class_names = list(npz['class_names']) if 'class_names' in npz else None
        return from_numpy(npz[keys[0]], npz[keys[1]], class_names, name=f'{path} [{split}]')


def _with_channels(image_set, channels):
    """Repeats grey images to `channels`; other mismatches are left to the shape check."""
    if image_set.images.shape[-1] != 1 or channels == 1:
        return image_set
    return dataclasses.replace(image_set,
                               images=np.repeat(image_set.images, channels, axis=-1))


# ------------------------------------------------------- auxiliary data sets


def load_auxiliary(aux_cfg, split, image_shape, what):
    """Another data set (outlier exposure, an OOD test set) fitted to the main one's shape.

    `aux_cfg` has the `config.data` source fields (source, path, tfds_name, tfds_data_dir,
    label_key, numpy_path; digits: test_fraction/split_seed of the main data; mvtec and
    folder_masks: their fields, read with .get). Images of another size are resized
    (Pillow bilinear) and grey/colour converted to `image_shape` = (H, W, C), so e.g.
    CIFAR-10 can be outlier exposure for 28x28 grey Fashion-MNIST. Labels are kept but
    carry no meaning for the main data set; pixel masks are dropped.
    """
    h, w, c = image_shape
    cfg = dict(source=aux_cfg.source, path=aux_cfg.get('path', ''), image_size=None,
               channels=c, tfds_name=aux_cfg.get('tfds_name', ''),
               tfds_data_dir=aux_cfg.get('tfds_data_dir', ''),
               tfds_download=aux_cfg.get('tfds_download', False),
               tfds_alternative=aux_cfg.get('tfds_alternative', ''),
               label_key=aux_cfg.get('label_key', 'label'), test_fraction=0.5, split_seed=0,
               numpy_path=aux_cfg.get('numpy_path', ''),
               category=aux_cfg.get('category', ''), normal_dir=aux_cfg.get('normal_dir', ''),
               abnormal_dir=aux_cfg.get('abnormal_dir', ''), mask_dir='',
               normal_test_dir=aux_cfg.get('normal_test_dir', ''),
               normal_split_ratio=aux_cfg.get('normal_split_ratio', 0.2))
    if cfg['source'] == 'digits' or (cfg['source'] in PIXEL_SOURCES and h == w):
        cfg['image_size'] = h
    if cfg['source'] not in SOURCES:
        raise ConfigError(f'{what}: unknown source {cfg["source"]!r}; choose one of '
                          f'{", ".join(SOURCES)}')
    import ml_collections
    image_set = load_split(ml_collections.ConfigDict(cfg), split)
    images = np.asarray(image_set.images) if not isinstance(image_set.images, np.ndarray) \
        else image_set.images
    if images.shape[1:] != (h, w, c):
        images = _fit_images(images, (h, w, c))
    logging.info('%s: %d images from %s', what, len(images), image_set.name)
    return dataclasses.replace(image_set, images=images, name=f'{what} ({image_set.name})',
                               masks=None)


def with_ood(test_set, ood_cfg):
    """`test_set` with the test split of the OOD data set `ood_cfg` appended as one extra
    class, 'OOD: <name>' (never a normal class, so every OOD image is an anomaly).

    This is the labelled multi-class protocol (MCL: CIFAR-10 with all its classes normal,
    CIFAR-100 as the anomalies). `ood_cfg.source` '' returns `test_set` unchanged. The
    OOD images have no pixel ground truth, so the result has no masks either.
    """
    if not ood_cfg.source:
        return test_set
    shape = tuple(np.shape(test_set.images[0]))
    ood = load_auxiliary(ood_cfg, 'test', shape, 'eval.ood')
    images = np.concatenate([np.asarray(test_set.images), ood.images])
    labels = np.concatenate([test_set.labels,
                             np.full(len(ood.labels), len(test_set.class_names), np.int64)])
    names = list(test_set.class_names) + [f'OOD: {ood.name}']
    if test_set.masks is not None:
        logging.info('eval.ood: %s has no pixel masks; dropping those of %s', ood.name,
                     test_set.name)
    return ImageSet(images, labels, names, f'{test_set.name} + {ood.name}')


def _fit_images(images, shape):
    """Resizes (bilinear) and converts channels of uint8 NHWC images to (H, W, C)."""
    h, w, c = shape
    out = np.empty((len(images), h, w, c), np.uint8)
    for i, image in enumerate(images):
        out[i] = read_image(image, c, (h, w))
    return out


# ------------------------------------------------------------------- one-class


def one_class_indices(labels, normal_classes, num_classes, where='this split'):
    """Indices of the images of the normal class(es), in data set order."""
    labels = np.asarray(labels)
    for c in np.atleast_1d(normal_classes):
        if not 0 <= c < num_classes:
            raise DataError(f'normal class {c} is out of range: the data set has {num_classes} '
                            f'classes (0..{num_classes - 1})')
        if not np.any(labels == c):
            raise DataError(f'normal class {c} has no images in {where}')
    return np.flatnonzero(np.isin(labels, normal_classes)).astype(np.int64)


def check_has_anomalies(test_set, normal_classes):
    """DataError when every test image is of a normal class (no AUROC can be computed)."""
    if not anomaly_labels(test_set.labels, normal_classes).any():
        raise DataError(f'{test_set.name}: every test image is of a normal class '
                        f'{list(normal_classes)}, so there is nothing to detect; leave a class '
                        'out of data.normal_classes or add anomalies with eval.ood')


def anomaly_labels(labels, normal_classes):
    """1 = anomaly (not a normal class), 0 = normal: the library's label convention."""
    return np.isin(labels, normal_classes, invert=True).astype(np.int64)
