"""Data sources with pixel ground truth: the MVTec-AD layout and anomalib-style folders.

Both give `ImageSet`s whose `masks` are uint8 (N, H, W) in {0, 1} (1 = anomalous
pixel), aligned with the images; normal images have all-zero masks. Labels
follow the library's convention: class 0 is the normal class (set
`data.normal_classes=(0,)`), every other class is an anomaly.

Resizing (`image_size` > 0): images with Pillow bilinear, masks with nearest
neighbour so they stay binary; both to image_size x image_size, by
`jaxad.data.images.read_image` (the reader of every image file source and of
predict). Masks are binarised (> 0) before resizing, so nearest neighbour picks
the same pixels a resize of the original mask would. `image_size` 0/None keeps the original size,
and then every image of the split must have the same size. Grey images (MVTec's
grid, screw, zipper) and RGBA images are converted to `channels`.

`load_split(data_cfg, split)` (reached through `sources.load_split`) reads:
  source='mvtec'         path (MVTec-AD root), category, image_size, channels
  source='folder_masks'  path (root the folders are relative to; '' = as given),
                         normal_dir, abnormal_dir, mask_dir, normal_test_dir,
                         normal_split_ratio, split_seed, image_size, channels
"""
import os

import numpy as np
from absl import logging

from jaxad.data.images import (IMAGE_EXTENSIONS, NEAREST, ImageSet, check_channels,
                               decode_errors, is_image_file, read_image)
from jaxad.errors import ConfigError, DataError

MVTEC_GOOD = 'good'
FOLDER_CLASSES = ['normal', 'abnormal']
_SPLITS = ('train', 'test')
_LOG_EVERY = 2000  # images; loads at least this big log that they started


def load_split(data_cfg, split):
    """The `split` of an 'mvtec' or 'folder_masks' data set `data_cfg` describes."""
    if data_cfg.source == 'mvtec':
        return load_mvtec(data_cfg.path, data_cfg.category, split, data_cfg.image_size or None,
                          data_cfg.channels)
    if data_cfg.source == 'folder_masks':
        root = data_cfg.path

        def under_root(d):
            return os.path.join(root, d) if d and root else d
        return load_folder_masks(
            under_root(data_cfg.normal_dir), split, abnormal_dir=under_root(data_cfg.abnormal_dir),
            mask_dir=under_root(data_cfg.mask_dir),
            normal_test_dir=under_root(data_cfg.normal_test_dir),
            split_ratio=data_cfg.normal_split_ratio, seed=data_cfg.split_seed,
            image_size=data_cfg.image_size or None, channels=data_cfg.channels)
    raise ConfigError(f'pixel_sources cannot load data.source {data_cfg.source!r}')


# ----------------------------------------------------------------------- MVTec


def load_mvtec(root, category, split, image_size=None, channels=3):
    """One MVTec-AD category: `root/<category>/{train/good, test/<defect>,
    ground_truth/<defect>/<stem>_mask.png}`.

    Class names are 'good' (class 0) then the defect types (the folders of test/
    other than good, sorted), the same list for both splits, so every defect type
    gets its own per-class AUROC. 'train' reads only train/good; 'test' reads
    test/good and every test/<defect>, with the masks of ground_truth/ (a defect
    image without its mask is a DataError). Files are sorted by name.
    """
    root, split = os.fspath(root), _check_split(split)
    check_channels(channels)
    if not os.path.isdir(root):
        raise DataError(f'MVTec-AD folder {root} does not exist')
    cat_dir = os.path.join(root, category) if category else ''
    if not category or not os.path.isdir(os.path.join(cat_dir, 'train')):
        available = [c for c in _subdirs(root) if os.path.isdir(os.path.join(root, c, 'train'))]
        raise DataError(f'MVTec-AD category {category!r} is not in {root} (no '
                        f'{os.path.join(cat_dir or root, "train")}); set data.category to one '
                        f'of {available}')
    test_dir = os.path.join(cat_dir, 'test')
    defects = [d for d in _subdirs(test_dir) if d != MVTEC_GOOD] if os.path.isdir(test_dir) else []
    class_names = [MVTEC_GOOD] + defects
    if split == 'train':
        groups = [(0, os.path.join(cat_dir, 'train', MVTEC_GOOD))]
    else:
        if not os.path.isdir(test_dir):
            raise DataError(f'MVTec-AD category {category!r} has no test folder ({test_dir})')
        groups = [(label, os.path.join(test_dir, name)) for label, name in enumerate(class_names)
                  if label or os.path.isdir(os.path.join(test_dir, name))]
    pairs, labels = [], []
    for label, folder in groups:
        for path in _image_files(folder, f'MVTec-AD {class_names[label]!r}'):
            mask = None
            if label:
                stem = os.path.splitext(os.path.basename(path))[0]
                mask = os.path.join(cat_dir, 'ground_truth', class_names[label],
                                    f'{stem}_mask.png')
                if not os.path.isfile(mask):
                    raise DataError(f'MVTec-AD defect image {path} has no mask {mask}')
            pairs.append((path, mask))
            labels.append(label)
    name = f'mvtec:{category} [{split}]'
    images, masks = _load_pairs(pairs, image_size, channels, True, name)
    return ImageSet(images, np.asarray(labels, np.int64), class_names, name, masks)


# ---------------------------------------------------------------------- Folder


def load_folder_masks(normal_dir, split, abnormal_dir='', mask_dir='', normal_test_dir='',
                      split_ratio=0.2, seed=0, image_size=None, channels=3):
    """Normal and abnormal image folders with anomalib's `Folder` semantics.

    Classes are ['normal', 'abnormal'] (0 and 1). 'train' is the normal images
    not held out; 'test' is the held-out normal images, then the abnormal ones.
    Held out: every image of `normal_test_dir` when given (`split_ratio` is then
    unused), else a `split_ratio` fraction of `normal_dir` (rounded, drawn with
    `seed`, independent of the file system's order). Masks come from `mask_dir`,
    matched by file stem (abnormal 'x.png' -> mask 'x.<ext>' or 'x_mask.<ext>');
    normal images get zero masks; without `mask_dir` the sets have `masks=None`
    (image-level methods need nothing else). Folders are read flat (no recursion).
    """
    split = _check_split(split)
    check_channels(channels)
    if not normal_dir:
        raise ConfigError('data.normal_dir is empty: name the folder of normal images')
    normal = _image_files(normal_dir, 'normal')
    if normal_test_dir:
        train, held_out = normal, _image_files(normal_test_dir, 'normal test')
    else:
        if not 0 <= split_ratio < 1:
            raise ConfigError(f'data.normal_split_ratio={split_ratio} must be in [0, 1)')
        n_test = int(round(split_ratio * len(normal)))
        if n_test >= len(normal):
            raise DataError(f'normal folder {normal_dir}: holding out {n_test} of its '
                            f'{len(normal)} images (normal_split_ratio={split_ratio}) leaves '
                            'none to train on')
        test_idx = set(np.random.default_rng(seed).choice(len(normal), n_test, replace=False)
                       .tolist())
        train = [p for i, p in enumerate(normal) if i not in test_idx]
        held_out = [p for i, p in enumerate(normal) if i in test_idx]
    if split == 'train':
        pairs, labels = [(p, None) for p in train], np.zeros(len(train), np.int64)
    else:
        abnormal = _image_files(abnormal_dir, 'abnormal') if abnormal_dir else []
        masks_by_stem = _masks_by_stem(mask_dir) if mask_dir else {}
        pairs = [(p, None) for p in held_out] + [
            (p, _match_mask(p, masks_by_stem, mask_dir) if mask_dir else None) for p in abnormal]
        if not pairs:
            raise DataError(f'normal folder {normal_dir}: the test split is empty (no '
                            'normal_test_dir, normal_split_ratio rounds to 0 images and no '
                            'abnormal_dir)')
        labels = np.repeat(np.arange(2), [len(held_out), len(abnormal)]).astype(np.int64)
    name = f'folder:{normal_dir} [{split}]'
    images, masks = _load_pairs(pairs, image_size, channels, bool(mask_dir), name)
    return ImageSet(images, labels, list(FOLDER_CLASSES), name, masks)


def _masks_by_stem(mask_dir):
    files = _image_files(mask_dir, 'mask')
    by_stem = {}
    for path in files:  # sorted: of x.jpg and x.png the first wins
        by_stem.setdefault(os.path.splitext(os.path.basename(path))[0], path)
    return by_stem


def _match_mask(image_path, masks_by_stem, mask_dir):
    stem = os.path.splitext(os.path.basename(image_path))[0]
    for key in (stem, f'{stem}_mask'):
        if key in masks_by_stem:
            return masks_by_stem[key]
    raise DataError(f'abnormal image {image_path} has no mask in {mask_dir} (looked for '
                    f'{stem}.<ext> and {stem}_mask.<ext>, ext one of {"/".join(IMAGE_EXTENSIONS)})')


# --------------------------------------------------------------------- helpers


def _check_split(split):
    if split not in _SPLITS:
        raise DataError(f'unknown split {split!r}; choose {", ".join(_SPLITS)}')
    return split


def _subdirs(folder):
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith('.'))


def _image_files(folder, what):
    """Sorted image paths directly in `folder`; DataError if it is missing or has none."""
    if not os.path.isdir(folder):
        raise DataError(f'{what} folder {folder} does not exist')
    names = sorted(n for n in os.listdir(folder)
                   if is_image_file(n) and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise DataError(f'{what} folder {folder} has no {"/".join(IMAGE_EXTENSIONS)} images')
    return [os.path.join(folder, n) for n in names]


def _load_pairs(pairs, image_size, channels, with_masks, what):
    """(images NHWC, masks NHW or None) for [(image path, mask path or None)].

    A None mask path is an all-zero mask. Without `image_size` every image must
    have the first one's size.
    """
    if len(pairs) >= _LOG_EVERY:
        logging.info('decoding %d images from %s', len(pairs), what)
    images = masks = None
    for i, (path, mask_path) in enumerate(pairs):
        with decode_errors(path):  # converted to `channels`, resized bilinear; original (W, H)
            image, size = read_image(path, channels, image_size or None, return_size=True)
        if images is None:
            first_path, first_size = path, size
            images = np.empty((len(pairs),) + image.shape, np.uint8)
            if with_masks:
                masks = np.zeros((len(pairs),) + image.shape[:2], np.uint8)
        elif image.shape != images.shape[1:]:
            raise DataError(f'image {path} is {size[1]}x{size[0]} (HxW) but {first_path} is '
                            f'{first_size[1]}x{first_size[0]}; all images must have one size '
                            '(or set data.image_size to resize them)')
        images[i] = image
        if with_masks and mask_path is not None:
            masks[i] = _read_mask(mask_path, path, size, image_size)
    return images, masks


def _read_mask(path, image_path, image_wh, image_size):
    """HW {0, 1} mask: any non-zero value (any channel) is 1; resized nearest neighbour.

    Read in its own mode (no conversion) and binarised before the resize, so the
    resize picks pixels of the binary mask.
    """
    with decode_errors(path, 'mask'):
        array, size = read_image(path, return_size=True)
    if size != image_wh:
        raise DataError(f'mask {path} is {size[1]}x{size[0]} (HxW) but its image {image_path} '
                        f'is {image_wh[1]}x{image_wh[0]}')
    binary = (array.reshape(array.shape[:2] + (-1,)) > 0).any(-1).astype(np.uint8)
    return read_image(binary, size=image_size or None, resample=NEAREST)
