"""What `--mode=predict` and `--mode=calibrate` score: listing inputs and decoding them.

Inputs (`list_inputs`): a folder (recursive, image extensions), a glob, a text
file listing one path per line (relative paths are relative to the list
file's folder; '#' starts a comment), a single image, or a `.npz` holding
`images` (uint8 NHWC or NHW) and optionally `names`. Files are decoded by
`jaxad.data.images.read_image`, the reader of the training sources: Pillow,
converted to the run's channels (L or RGB) and, when not already image_size x
image_size, resized to it with Pillow's bilinear filter (antialiased when
shrinking; aspect ratio not kept). Training images went through the same
reader: the folder, idx, fashion_mnist, tfds and numpy sources must already be
that size (checked when the data loads), while sklearn digits and, when
data.image_size is set, mvtec and folder_masks were resized with the same
bilinear filter. Unreadable files are logged once each, listed under `skipped`
with the reason, and never stop the run.

`decoded_batches` yields them decoded, in padded batches (`pad_batch`);
`jaxad.scoring.score_inputs(model, inputs)` scores those batches.

This module needs NumPy and Pillow only, none of the training side's packages
(Flax, Orbax, absl, ...): `jaxad.export`'s loader decodes files with it. The
skip warning goes through the standard `logging` module (under the command
line, absl's handler prints it as it prints absl's own records).
"""
import dataclasses
import glob
import logging
import os

import numpy as np

from jaxad.data import images as image_files
from jaxad.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = image_files.IMAGE_EXTENSIONS  # the one list, shared with the data sources
_GLOB_CHARS = '*?['
# What decoding an input may raise: Pillow's decode errors, and TypeError for an array
# `read_image` cannot convert. The item is skipped, the run goes on.
_SKIPPED_ERRORS = image_files.DECODE_ERRORS + (TypeError,)


@dataclasses.dataclass
class Inputs:
    """What to score: (name, path or uint8 array) items, and what was left out."""
    items: list
    ignored: int = 0  # files of a folder/glob without an image extension
    what: str = ''


def list_inputs(spec):
    """The images `spec` names; DataError when it names none. A URL (gs://...) is read
    from a local copy (`storage.local_input`)."""
    from jaxad import storage
    spec = storage.local_input(os.fspath(spec), 'input')
    if os.path.isdir(spec):
        items, ignored = [], 0
        for root, dirs, files in os.walk(spec):
            dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
            for f in sorted(files):
                if f.startswith('.'):
                    continue
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    items.append((os.path.join(root, f), None))
                else:
                    ignored += 1
        if not items:
            raise DataError(f'folder {spec} has no images ({"/".join(IMAGE_EXTENSIONS)}, '
                            'searched recursively)')
        return Inputs(items, ignored, f'folder {spec}')
    if os.path.isfile(spec):
        lower = spec.lower()
        if lower.endswith('.npz'):
            return Inputs(_npz_items(spec), 0, f'{spec}')
        if lower.endswith(IMAGE_EXTENSIONS):
            return Inputs([(spec, None)], 0, spec)
        return Inputs(_list_file_items(spec), 0, f'list file {spec}')
    if any(c in spec for c in _GLOB_CHARS):
        matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        items = [(p, None) for p in matches if p.lower().endswith(IMAGE_EXTENSIONS)]
        if not items:
            raise DataError(f'no image files ({"/".join(IMAGE_EXTENSIONS)}) match {spec!r}'
                            + (f' ({len(matches)} other files do)' if matches else ''))
        return Inputs(items, len(matches) - len(items), f'glob {spec}')
    raise DataError(f'input {spec} does not exist (expected a folder, a glob, a list file, '
                    'an image or a .npz)')


def _list_file_items(path):
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f'{path} is not an image, a .npz or a text file listing image paths '
                        f'({e})') from e
    base = os.path.dirname(os.path.abspath(path))
    entries = [line.strip() for line in lines]
    entries = [e for e in entries if e and not e.startswith('#')]
    if not entries:
        raise DataError(f'list file {path} names no images')
    return [(e if os.path.isabs(e) else os.path.join(base, e), None) for e in entries]


def _npz_items(path):
    try:
        with np.load(path, allow_pickle=False) as npz:
            if 'images' not in npz:
                raise DataError(f'{path} has no `images` array (it has {sorted(npz.files)})')
            images = npz['images']
            names = [str(n) for n in npz['names']] if 'names' in npz else None
    except (OSError, ValueError) as e:
        raise DataError(f'cannot read {path}: {e}') from e
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or len(images) == 0 or images.shape[-1] not in (1, 3, 4):
        raise DataError(f'{path}: `images` must be a non-empty uint8 NHWC (C = 1, 3 or 4) or NHW '
                        f'array, got shape {images.shape}')
    if images.dtype != np.uint8:
        if not (np.issubdtype(images.dtype, np.integer) and images.min() >= 0
                and images.max() <= 255):
            raise DataError(f'{path}: `images` must be uint8 (or integers in 0..255), got '
                            f'{images.dtype}')
        images = images.astype(np.uint8)
    if names is not None and len(names) != len(images):
        raise DataError(f'{path}: {len(names)} names for {len(images)} images')
    names = names or [f'{path}[{i}]' for i in range(len(images))]
    return list(zip(names, images))


def pad_batch(images, batch_size):
    """`images` (n <= batch_size) padded with copies of its first row to batch_size."""
    n = len(images)
    if n == batch_size:
        return images
    return np.concatenate([images, np.repeat(images[:1], batch_size - n, axis=0)])


def load_image(source, image_size, channels):
    """uint8 (image_size, image_size, channels) from a path or an HWC/HW uint8 array.

    `jaxad.data.images.read_image`, the reader of the training sources: an array of
    that shape is returned as is; Pillow's errors propagate (`decoded_batches` skips).
    """
    return image_files.read_image(source, channels, image_size)


def decoded_batches(inputs, image_size, channels, batch_size, skipped, progress=None):
    """Yields (names, uint8 (batch_size, S, S, C), n_valid); unreadable items go to `skipped`."""
    names, arrays = [], []
    done = 0
    for name, source in inputs.items:
        done += 1
        try:
            arrays.append(load_image(name if source is None else source, image_size, channels))
            names.append(name)
        except _SKIPPED_ERRORS as e:
            reason = f'{type(e).__name__}: {e}'
            log.warning('skipping %s: %s', name, reason)
            skipped.append({'path': name, 'reason': reason})
        if len(arrays) == batch_size:
            yield names, np.stack(arrays), batch_size
            names, arrays = [], []
            if progress:
                progress.update(done, skipped=len(skipped))
    if arrays:
        yield names, pad_batch(np.stack(arrays), batch_size), len(arrays)
    if progress:
        progress.update(done, skipped=len(skipped))
