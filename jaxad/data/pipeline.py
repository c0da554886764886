"""Host input pipeline (Grain): index the one-class split, shuffle, batch uint8.

Nothing here augments or converts to float: augmentation runs on device
(`jaxad.data.augment`), so the host only gathers and stacks uint8 images.

The training order, exactly (n = len(indices), B = global batch, P processes):

  perm_e    = np.random.default_rng([seed, e]).permutation(n)   # epoch e = 0, 1, ...
  stream    = indices[concatenate(perm_0, perm_1, perm_2, ...)]
  global batch s            = stream[s * B : (s + 1) * B]
  process p's batch s       = stream[s * B + p * B // P : s * B + (p + 1) * B // P]

Each epoch is one vectorised NumPy permutation seeded by (seed, epoch) alone
(NumPy's SeedSequence over the pair, PCG64), a fresh one every epoch, and
batches run across epoch boundaries. Batch `s` is therefore a pure function of
(seed, s, process_index, process_count): resuming at `start_step` yields
exactly the batches an uninterrupted run would have seen, with no iterator
state to checkpoint. The batches are still a Grain `MapDataset` (one element
per *batch*, random access by step), read by Grain's threads with prefetch;
each batch's images are gathered in one NumPy indexing call, not image by image
(`IndexedSource.gather`). Drawing the order per epoch rather than per element
keeps per-image Python work off the host entirely: Grain's own
`MapDataset.shuffle` computes each element's position in Python and capped
the pipeline at ~30k images/s (benchmarks/input_throughput.py, BENCHMARKS.md).
"""
import functools
import sys

import grain
import numpy as np

from jaxad.errors import ConfigError, DataError


class IndexedSource:
    """Grain random-access source over `image_set[indices]`.

    Index-mapped rather than `MapDataset.filter`, which would leave `None`
    holes for the ~90% of images a one-class split drops.
    """

    def __init__(self, image_set, indices, labels=None):
        self._images = image_set.images
        self._labels = None if labels is None else np.asarray(labels, np.int32)
        self._indices = np.asarray(indices, np.int64)
        if self._indices.ndim != 1:
            raise DataError(f'{image_set.name}: indices must be 1-D, got shape '
                            f'{self._indices.shape}')
        if len(self._indices) and not (0 <= self._indices.min()
                                       and self._indices.max() < len(image_set)):
            raise DataError(f'{image_set.name}: indices outside 0..{len(image_set) - 1}')
        self._name = image_set.name

    def __len__(self):
        return len(self._indices)

    def __getitem__(self, i):
        index = self._indices[i]
        item = {'image': np.asarray(self._images[index], np.uint8), 'index': index}
        if self._labels is not None:
            item['label'] = self._labels[index]
        return item

    def gather(self, positions, keys=('image',)):
        """The batch of items at `positions` (an int array) in one indexing call:
        {'image': uint8 (n, H, W, C)} plus 'label' / 'index' when asked in `keys`;
        what `[self[i] for i in positions]` stacked would be."""
        index = self._indices[np.asarray(positions, np.int64)]
        batch = {}
        if 'image' in keys:
            if isinstance(self._images, np.ndarray):
                batch['image'] = np.asarray(self._images[index], np.uint8)
            else:  # a lazy sequence (TFDS records): decoded one by one
                batch['image'] = np.stack([np.asarray(self._images[i], np.uint8)
                                           for i in index])
        if 'label' in keys:
            batch['label'] = self._labels[index]
        if 'index' in keys:
            batch['index'] = index
        if 'position' in keys:  # rows of `image_set[indices]` (an on-device copy of it)
            batch['position'] = np.asarray(positions, np.int32)
        return batch

    def __repr__(self):
        return f'IndexedSource({self._name!r}, {len(self)} images)'


def _local_batch_size(global_batch_size, process_count, what):
    if global_batch_size % process_count:
        raise ConfigError(f'{what}={global_batch_size} does not divide over {process_count} '
                          'processes')
    return global_batch_size // process_count


def _read_options(read_threads, prefetch):
    return grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)


def epoch_permutation(seed, epoch, n):
    """Epoch `epoch`'s order of positions 0..n-1: the one definition of the data order."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class BatchPositions:
    """Random-access, endless sequence: step s -> process p's positions of global batch s.

    Positions index `indices` (0..n-1). Item i of the global stream is position
    `epoch_permutation(seed, i // n, n)[i % n]`. A local batch has at most n
    items (B <= n), so it spans at most two epochs; the epochs' permutations are
    cached, so a batch costs O(B), not the O(n) of drawing a permutation.
    """

    # Reader threads and prefetch work a few steps ahead; with a small set (n close
    # to B) those steps can straddle more than two epochs, and a miss costs O(n).
    CACHED_EPOCHS = 4

    def __init__(self, n, global_batch_size, seed, process_index=0, process_count=1):
        self._n, self._global = n, global_batch_size
        self._local = global_batch_size // process_count
        self._offset = process_index * self._local
        # Per instance (not a method-level cache, which would pin every instance).
        self._epoch = functools.lru_cache(self.CACHED_EPOCHS)(
            lambda epoch: epoch_permutation(seed, epoch, n))

    def __len__(self):
        return sys.maxsize  # endless; Grain needs a length, and slices it for start_step

    def __getitem__(self, step):
        epoch, start = divmod(step * self._global + self._offset, self._n)
        positions = self._epoch(epoch)[start:start + self._local]
        if len(positions) < self._local:  # the batch runs into the next epoch
            rest = self._epoch(epoch + 1)[:self._local - len(positions)]
            positions = np.concatenate([positions, rest])
        return positions


def train_iterator(image_set, indices, *, global_batch_size, seed, start_step=0,
                   process_index=0, process_count=1, read_threads=2, prefetch=4, labels=None,
                   images=True):
    """Infinite iterator of `{'image': uint8 (global_batch_size // process_count, H, W, C)}`,
    plus `'label'`: int32 `labels[image index]` when `labels` (one per image) is given.
    `images=False`: `'position'` (int32 rows of `image_set.images[indices]`) instead of
    `'image'`, for a run that keeps those images on its devices (`jaxad.loop.DeviceInput`).

    The image stream is `indices` in a fresh seeded permutation every epoch
    (`epoch_permutation`), so each epoch shows every normal image exactly once
    (batches run across epoch boundaries). Global batch `s` is stream items
    `[s * B, (s + 1) * B)`; process `p` gets the `p`-th contiguous slice of it.
    """
    _local_batch_size(global_batch_size, process_count, 'batch_size')  # or raises
    if len(indices) < global_batch_size:
        raise ConfigError(
            f'{image_set.name}: only {len(indices)} normal training images for a global batch '
            f'of {global_batch_size}; use batch_size <= {len(indices)}')
    if seed < 0:
        raise ConfigError(f'seed must be >= 0 for the data order, got {seed}')
    source = IndexedSource(image_set, indices, labels)
    keys = (('image',) if images else ('position',)) + (() if labels is None else ('label',))
    # One Grain element per local batch, indexed by global step: Grain keeps the
    # reader threads and prefetch, the order is drawn per epoch by BatchPositions.
    positions = BatchPositions(len(source), global_batch_size, seed, process_index,
                               process_count)
    batches = (grain.MapDataset.source(positions)[start_step:]
               .map(lambda p: source.gather(p, keys)))
    return iter(batches.to_iter_dataset(_read_options(read_threads, prefetch)))


OUTLIER_SEED_OFFSET = 7919  # the outlier stream's shuffle is independent of the normal one's


def class_positions(labels, normal_classes):
    """Each image's position among the sorted normal classes (-1 elsewhere): MCL's labels."""
    normal = np.sort(np.asarray(normal_classes, np.int64))
    lut = np.full(int(max(np.max(labels), normal.max())) + 1, -1, np.int32)
    lut[normal] = np.arange(len(normal), dtype=np.int32)
    return lut[np.asarray(labels)]


def method_train_iterator(inputs, image_set, indices, normal_classes, *, outliers=None,
                          global_batch_size, seed, **kwargs):
    """The training batches a method asks for with `inputs` (its extra batch keys).

    Always 'image' (the normal images). 'label': the class position of each image
    (`class_positions`). 'outlier': a batch of images from `outliers` =
    (image_set, indices), read by its own, independently shuffled stream and zipped
    with the normal one (OECL; self-OECL passes the normal images again).

    `images=False` (in kwargs): no image is read; the batch holds `{'positions': {'image':
    rows of image_set.images[indices], 'outlier': rows of the outlier set's}}` instead (plus
    'label'), the same order as the images would have.
    """
    labels = class_positions(image_set.labels, normal_classes) if 'label' in inputs else None
    main = train_iterator(image_set, indices, global_batch_size=global_batch_size, seed=seed,
                          labels=labels, **kwargs)
    if 'outlier' not in inputs:
        return main if kwargs.get('images', True) else _as_positions(main)
    if outliers is None:
        raise ConfigError('this method trains with outlier exposure: set oe.source')
    oe_set, oe_indices = outliers
    oe = train_iterator(oe_set, oe_indices, global_batch_size=global_batch_size,
                        seed=seed + OUTLIER_SEED_OFFSET, **kwargs)
    if not kwargs.get('images', True):
        return _as_positions(main, oe)
    return (dict(b, outlier=o['image']) for b, o in zip(main, oe))


def _as_positions(main, oe=None):
    """Position batches as `{'positions': {'image', 'outlier'}, 'label'}`."""
    for b in main:
        positions = {'image': b.pop('position')}
        if oe is not None:
            positions['outlier'] = next(oe)['position']
        yield dict(b, positions=positions)


def num_eval_batches(n, batch_size):
    """Batches `eval_batches` yields for `n` images (the last one padded)."""
    return -(-n // batch_size)


def eval_batches(image_set, indices=None, *, batch_size, process_index=0, process_count=1,
                 read_threads=2, prefetch=4):
    """`image_set[indices]` in order, as batches of `batch_size // process_count` per process.

    Yields `{'image', 'index', 'label', 'mask'}`; the last global batch is
    padded to full size with repeats of valid images (mask False), so every
    batch has one shape and the jitted evaluator compiles once.
    """
    local = _local_batch_size(batch_size, process_count, 'eval batch_size')
    indices = (np.arange(len(image_set)) if indices is None
               else np.asarray(indices, np.int64))
    total = num_eval_batches(len(indices), batch_size) * batch_size
    padded = np.resize(indices, total)
    mask = np.arange(total) < len(indices)
    # Rows of process p: its contiguous slice of each global batch.
    rows = np.arange(total).reshape(-1, process_count, local)[:, process_index].ravel()
    local_mask = mask[rows].reshape(-1, local)
    labels = np.asarray(image_set.labels, np.int64)

    def finish(b, batch):
        return dict(batch, label=labels[batch['index']], mask=local_mask[b])

    batches = (grain.MapDataset.source(IndexedSource(image_set, padded[rows]))
               .batch(local).map_with_index(finish))
    return iter(batches.to_iter_dataset(_read_options(read_threads, prefetch)))


def stacked_eval_batches(image_set, index_lists, *, batch_size, process_index=0,
                         process_count=1, read_threads=2, prefetch=4):
    """Batches for K models at once, model k reading `image_set[index_lists[k]]`.

    Yields `{'image': (K, b, H, W, C), 'index': (K, b), 'mask': (K, b)}` with
    b = batch_size // process_count: the per-model equivalent of
    `eval_batches`, so a stack of one-class detectors fits its train banks in
    one pass. Shorter lists are padded with repeats (mask False) up to the
    longest, in whole batches.
    """
    local = _local_batch_size(batch_size, process_count, 'eval batch_size')
    lists = [np.asarray(ix, np.int64) for ix in index_lists]
    if not lists or min(len(ix) for ix in lists) == 0:
        raise DataError(f'{image_set.name}: every model of a stack needs at least one image')
    n_batches = num_eval_batches(max(len(ix) for ix in lists), batch_size)
    total = n_batches * batch_size
    padded = np.stack([np.resize(ix, total) for ix in lists])  # (K, total)
    mask = np.stack([np.arange(total) < len(ix) for ix in lists])
    k = len(lists)

    def local_rows(a):
        # (K, n_batches, P, local) -> process p's (n_batches, K, local) slice.
        return a.reshape(k, n_batches, process_count, local)[:, :, process_index].swapaxes(0, 1)

    order = local_rows(padded)
    local_mask = local_rows(mask)

    def finish(b, batch):
        return {'image': batch['image'].reshape((k, local) + batch['image'].shape[1:]),
                'index': batch['index'].reshape(k, local), 'mask': local_mask[b]}

    batches = (grain.MapDataset.source(IndexedSource(image_set, order.reshape(-1)))
               .batch(k * local).map_with_index(finish))
    return iter(batches.to_iter_dataset(_read_options(read_threads, prefetch)))
