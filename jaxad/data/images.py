"""Image files: the one extension list, the one reader, and the `ImageSet` they fill.

Every image the library reads goes through `read_image`: the training sources
(folders and .tar.gz archives, MVTec-AD, anomalib-style folders and their
masks), the resizing of sklearn digits and of auxiliary data sets, and
`--mode=predict`/calibrate. It decodes with Pillow (first frame; no EXIF
rotation), converts to the mode of the requested channels ('L' for 1, 'RGB'
for 3; RGBA drops alpha, palette images are expanded) and then, only when the
size differs, resizes with Pillow's `resample` filter: bilinear by default
(antialiased when shrinking, as Pillow's resize always is), nearest neighbour
for masks so they stay binary. Aspect ratio is not kept.

This module imports nothing else of `jaxad.data`, so every source can use it.
"""
import contextlib
import dataclasses
import io
import os
from typing import Sequence

import numpy as np
from PIL import Image

from jaxad.errors import ConfigError, DataError

# Files with these extensions (any case) are images; others in a folder are ignored.
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp')
PIL_MODES = {1: 'L', 3: 'RGB'}  # channels -> the Pillow mode images are converted to
# What Pillow raises for a file it cannot decode (`decode_errors` turns them into DataError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
BILINEAR = Image.Resampling.BILINEAR
NEAREST = Image.Resampling.NEAREST


@dataclasses.dataclass
class ImageSet:
    """One split: images (uint8 NHWC array or a lazy sequence of HWC arrays) and labels."""
    images: np.ndarray | Sequence[np.ndarray]
    labels: np.ndarray  # int64, label i is class_names[i]
    class_names: list[str]
    name: str  # for messages
    # Pixel ground truth: uint8 (N, H, W) in {0, 1}, 1 = anomalous pixel, zeros for
    # normal images; None when the set has none (every source but mvtec/folder_masks).
    masks: np.ndarray | None = None

    def __len__(self):
        return len(self.labels)


def is_image_file(name):
    """Whether a file name (not a path) is an image: not hidden, an image extension."""
    return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def check_channels(channels):
    """ConfigError unless images can be decoded to `channels` (1 or 3)."""
    if channels not in PIL_MODES:
        raise ConfigError(f'channels={channels}: images can be decoded to 1 or 3 channels')


def read_image(source, channels=None, size=None, resample=BILINEAR, return_size=False):
    """The uint8 array of one image, converted and resized as asked.

    source: a file path, the encoded bytes of a file, or an HW / HWC array (uint8).
    channels: 1 or 3 converts to 'L' or 'RGB' and gives HWC; None keeps the decoded
      mode and gives the array Pillow gives (HW or HWC; masks).
    size: an int (square) or (H, W); the image is resized with `resample` when its
      size differs, after the conversion. None keeps the size.
    return_size: also return the size as decoded, (W, H) as Pillow gives it.

    An array already of the requested shape is returned as is (no Pillow round
    trip, which would give the same values). A file Pillow cannot decode raises
    one of `DECODE_ERRORS` (wrap the call in `decode_errors` for a DataError).
    """
    if isinstance(source, np.ndarray):
        array = source[..., 0] if source.ndim == 3 and source.shape[-1] == 1 else source
        wh = (array.shape[1], array.shape[0])
        if (size is None or _pil_size(size) == wh) and (
                channels is None or (channels == 1 and array.ndim == 2)
                or (channels == 3 and array.ndim == 3 and array.shape[-1] == 3)):
            out = array if channels is None else array.reshape(wh[1], wh[0], channels)
        else:
            out = _convert_resize(Image.fromarray(array), channels, size, resample)
        return (out, wh) if return_size else out
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    with Image.open(source) as im:
        wh = im.size
        out = _convert_resize(im, channels, size, resample)
    return (out, wh) if return_size else out


@contextlib.contextmanager
def decode_errors(name, what='image'):
    """Turns a decoding failure inside the block into DataError('cannot decode {what} {name}')."""
    try:
        yield
    except DECODE_ERRORS as e:
        raise DataError(f'cannot decode {what} {os.fspath(name)}: {e}') from e


def _pil_size(size):
    """(W, H) for Pillow from an int side or (H, W)."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(w), int(h)


def _convert_resize(im, channels, size, resample):
    if channels is not None:
        mode = PIL_MODES[channels]
        if im.mode != mode:
            im = im.convert(mode)
    if size is not None and im.size != _pil_size(size):
        im = im.resize(_pil_size(size), resample)
    array = np.asarray(im)
    return array[..., None] if channels is not None and array.ndim == 2 else array
