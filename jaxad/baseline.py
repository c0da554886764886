"""The raw-pixel nearest-neighbour baseline that every result carries.

A detector is worth its training only if it beats the simplest one: score each test image by
the Euclidean distance from its raw pixels (uint8 / 255, flattened) to the nearest normal
training image of the same detector's bank, and take that score's image AUROC on the same
test split. On small or easy data this is strong (sklearn's digits: 0.998; RESULTS.md), so a
learned detector below it says so in its results (`results['baseline']`), its console table,
the log and a table's results.md.

Computed on the host with NumPy, blockwise, exactly (integer pixel values in float64:
`nearest_sq_distances`), once per (bank, test split) per process: a table's members and a
rerun in the same process (eval mode in a notebook) reuse it (`_CACHE`, keyed by a digest of
the pixels and labels, never by a name).
"""
import hashlib

import numpy as np

from jaxad import metrics

NAME = 'raw_pixel_1nn'  # results['baseline'][NAME]
DESCRIPTION = 'L2 distance of raw pixels (uint8 / 255) to the nearest normal training image'
BLOCK_ROWS = 1024  # test rows per distance block: memory is BLOCK_ROWS x bank floats
_CACHE = {}


def flatten(images):
    """(N, D) float32 in [0, 1] from uint8 NHWC images (an array or a sequence of HWC
    arrays)."""
    images = images if isinstance(images, np.ndarray) else np.stack(
        [np.asarray(images[i]) for i in range(len(images))])
    return images.reshape(len(images), -1).astype(np.float32) / np.float32(255)


def knn_distances(bank, queries, k=1, block_rows=BLOCK_ROWS):
    """Mean Euclidean distance from each query row to its k nearest bank rows, float64 (Q,).

    ||q - b||^2 = ||q||^2 - 2 q.b + ||b||^2, clipped at 0, `block_rows` queries at a time.
    Both sides are centred on the bank mean first: distances are unchanged and the norms
    smaller, so less is lost when the float32 q.b is subtracted from them.
    """
    if not 1 <= k <= len(bank):
        raise ValueError(f'k={k} must be between 1 and the bank size {len(bank)}')
    mean = np.asarray(bank, np.float64).mean(axis=0)
    bank = (np.asarray(bank, np.float64) - mean).astype(np.float32)
    mean = mean.astype(np.float32)
    bank_sq = np.einsum('ij,ij->i', bank, bank, dtype=np.float64)
    out = np.empty(len(queries), np.float64)
    for start in range(0, len(queries), block_rows):
        block = np.asarray(queries[start:start + block_rows], np.float32) - mean
        block_sq = np.einsum('ij,ij->i', block, block, dtype=np.float64)
        sq = block_sq[:, None] + bank_sq[None, :] - 2.0 * (block @ bank.T).astype(np.float64)
        np.maximum(sq, 0.0, out=sq)
        nearest = (sq.min(axis=1, keepdims=True) if k == 1
                   else np.partition(sq, k - 1, axis=1)[:, :k])
        out[start:start + len(block)] = np.sqrt(nearest).mean(axis=1)
    return out


def _digest(*arrays):
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.data)
    return h.hexdigest()


def nearest_sq_distances(bank, queries, block_rows=BLOCK_ROWS):
    """Exact squared L2 distance (in uint8 units) from each uint8 query row to its nearest
    uint8 bank row, float64 (Q,).

    ||q||^2 - 2 q.b + ||b||^2 of the raw integers in float64: every product and partial sum
    is an integer below 2**53, so the result is exact whatever the summation order, and
    images at equal distances tie exactly (they do on quantised data such as digits), as
    the AUROC's definition counts them.
    """
    bank = np.asarray(bank, np.float64)
    bank_sq = np.einsum('ij,ij->i', bank, bank)
    out = np.empty(len(queries), np.float64)
    for start in range(0, len(queries), block_rows):
        block = np.asarray(queries[start:start + block_rows], np.float64)
        sq = np.einsum('ij,ij->i', block, block)[:, None] + bank_sq[None, :] - 2.0 * (
            block @ bank.T)
        out[start:start + len(block)] = sq.min(axis=1)
    return out


def raw_pixel_1nn(train_images, bank_indices, test_images, anomaly):
    """{'image_AUROC', 'bank_images', 'distance'} of the raw-pixel 1-NN detector whose bank is
    `train_images[bank_indices]`, on `test_images` with `anomaly` labels (1 = anomaly).
    Scored by the exact squared distance (`nearest_sq_distances`): the same ranking as the
    distance of the pixels / 255."""
    bank = _take(train_images, bank_indices).reshape(len(bank_indices), -1)
    test = _take(test_images, None).reshape(len(test_images), -1)
    if bank.dtype != np.uint8 or test.dtype != np.uint8:
        raise TypeError(f'raw-pixel baseline: uint8 images expected, got {bank.dtype} and '
                        f'{test.dtype}')
    anomaly = np.asarray(anomaly, np.int64)
    key = _digest(bank, test, anomaly)
    if key not in _CACHE:
        auroc = metrics.auroc(nearest_sq_distances(bank, test), anomaly)
        _CACHE[key] = {'image_AUROC': float(auroc), 'bank_images': int(len(bank)),
                       'distance': DESCRIPTION}
    return dict(_CACHE[key])


def _take(images, indices):
    """`images[indices]` (None: all) as one array, from an array or a lazy sequence."""
    if indices is None:
        return (images if isinstance(images, np.ndarray)
                else np.stack([np.asarray(images[i]) for i in range(len(images))]))
    indices = np.asarray(indices, np.int64)
    if isinstance(images, np.ndarray):
        return images[indices]
    return np.stack([np.asarray(images[i]) for i in indices])


def below(results):
    """Whether a result's headline image AUROC is below its raw-pixel baseline (False when
    it has none)."""
    base = results.get('baseline', {}).get(NAME)
    return base is not None and results['image_AUROC'] < base['image_AUROC']


def verdict(results):
    """One line comparing a result with its baseline, for the console and the log."""
    base = results['baseline'][NAME]['image_AUROC']
    word = 'BELOW' if below(results) else 'above' if results['image_AUROC'] > base else 'equal to'
    return (f"image_AUROC {results['image_AUROC']:.4f} is {word} the raw-pixel 1-NN baseline "
            f'{base:.4f} on the same split ({DESCRIPTION})')
