"""Grain pipeline: the documented data order, exact resume, per-epoch permutations, process
slices, eval."""
import itertools

import numpy as np
import pytest

from jaxad.data import pipeline, sources
from jaxad.errors import ConfigError, DataError

NUM, CLASSES = 60, 3


def indexed_set():
    """Image i carries i in its pixels, so batches can be traced back to indices."""
    images = np.broadcast_to(np.arange(NUM, dtype=np.uint8)[:, None, None, None],
                             (NUM, 4, 4, 3)).copy()
    return sources.from_numpy(images, np.arange(NUM) % CLASSES, ['a', 'b', 'c'])


def ids(batch):
    return batch['image'][:, 0, 0, 0].astype(np.int64)


def take(it, n):
    return [ids(b) for b in itertools.islice(it, n)]


def reference_items(idx, seed, start, stop):
    """Items [start, stop) of the training stream as pipeline.py's docstring defines it:
    epoch e is idx[np.random.default_rng([seed, e]).permutation(n)], epochs concatenated."""
    n = len(idx)
    first, last = start // n, (stop - 1) // n
    stream = np.concatenate([np.asarray(idx)[np.random.default_rng([seed, e]).permutation(n)]
                             for e in range(first, last + 1)])
    return stream[start - first * n:stop - first * n]


def reference_batches(idx, seed, batch, start_step, steps):
    return [reference_items(idx, seed, s * batch, (s + 1) * batch)
            for s in range(start_step, start_step + steps)]


@pytest.fixture(scope='module')
def data():
    s = indexed_set()
    return s, sources.one_class_indices(s.labels, [1], CLASSES)  # 20 normal images


def test_batches_are_uint8_images_only(data):
    s, idx = data
    batch = next(pipeline.train_iterator(s, idx, global_batch_size=8, seed=0))
    assert set(batch) == {'image'}
    assert batch['image'].shape == (8, 4, 4, 3) and batch['image'].dtype == np.uint8


def test_same_seed_same_batches_other_seed_differs(data):
    s, idx = data
    a = take(pipeline.train_iterator(s, idx, global_batch_size=8, seed=3), 12)
    b = take(pipeline.train_iterator(s, idx, global_batch_size=8, seed=3), 12)
    c = take(pipeline.train_iterator(s, idx, global_batch_size=8, seed=4), 12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_each_epoch_is_a_permutation_of_the_normal_class(data):
    s, idx = data
    stream = np.concatenate(take(pipeline.train_iterator(s, idx, global_batch_size=8,
                                                         seed=0), 15))  # 6 epochs
    epochs = stream.reshape(6, len(idx))
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), idx)
    assert np.all(s.labels[stream] == 1)
    assert len({tuple(e) for e in epochs}) == 6  # reshuffled every epoch
    assert all((a != b).any() for a, b in zip(epochs, epochs[1:]))


@pytest.mark.parametrize('batch,seed', [(8, 0), (8, 5), (6, 1), (20, 2)])
def test_stream_is_the_documented_numpy_order(data, batch, seed):
    s, idx = data  # 20 images: batch 8 and 6 straddle epochs, 20 is one epoch per step
    got = take(pipeline.train_iterator(s, idx, global_batch_size=batch, seed=seed), 12)
    np.testing.assert_array_equal(got, reference_batches(idx, seed, batch, 0, 12))


def test_far_start_step_is_the_documented_order(data):
    s, idx = data  # step 10**6 with batch 8: epoch 400 000, no earlier epoch drawn
    start = 10 ** 6 + 2  # a batch that straddles an epoch boundary
    got = take(pipeline.train_iterator(s, idx, global_batch_size=8, seed=9,
                                       start_step=start), 3)
    np.testing.assert_array_equal(got, reference_batches(idx, 9, 8, start, 3))


@pytest.mark.parametrize('read_threads,prefetch', [(0, 0), (1, 1), (2, 4), (2, 0)])
def test_order_does_not_depend_on_reading(data, read_threads, prefetch):
    s, idx = data
    got = take(pipeline.train_iterator(s, idx, global_batch_size=8, seed=4,
                                       read_threads=read_threads, prefetch=prefetch), 11)
    np.testing.assert_array_equal(got, reference_batches(idx, 4, 8, 0, 11))


@pytest.mark.parametrize('start', [1, 2, 5, 7])
def test_resume_matches_uninterrupted_run(data, start):
    s, idx = data  # 20 images, batch 8: epochs end inside steps 2 and 7, after step 4
    full = take(pipeline.train_iterator(s, idx, global_batch_size=8, seed=1), 10)
    resumed = take(pipeline.train_iterator(s, idx, global_batch_size=8, seed=1,
                                           start_step=start), 10 - start)
    np.testing.assert_array_equal(resumed, full[start:])
    np.testing.assert_array_equal(resumed, reference_batches(idx, 1, 8, start, 10 - start))


@pytest.mark.parametrize('count', [2, 4])
def test_process_slices_concatenate_to_global_batch(data, count):
    s, idx = data
    full = take(pipeline.train_iterator(s, idx, global_batch_size=8, seed=2), 6)
    parts = [take(pipeline.train_iterator(s, idx, global_batch_size=8, seed=2, start_step=1,
                                          process_index=p, process_count=count), 5)
             for p in range(count)]
    assert parts[0][0].shape == (8 // count,)
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), full[1:])


@pytest.mark.parametrize('batch', [8, 20])
@pytest.mark.parametrize('count', [2, 4])
def test_process_batches_are_disjoint_slices_of_the_reference(data, batch, count):
    s, idx = data
    steps, start = 10, 3
    parts = [take(pipeline.train_iterator(s, idx, global_batch_size=batch, seed=6,
                                          start_step=start, process_index=p,
                                          process_count=count), steps)
             for p in range(count)]
    reference = reference_batches(idx, 6, batch, start, steps)
    for k, step in enumerate(range(start, start + steps)):
        local = [parts[p][k] for p in range(count)]
        assert all(len(b) == batch // count for b in local)
        np.testing.assert_array_equal(np.concatenate(local), reference[k])
        # Within one epoch every image appears once, so the processes' batches are
        # disjoint; a batch straddling an epoch boundary may repeat an image across it.
        if step * batch // len(idx) == ((step + 1) * batch - 1) // len(idx):
            assert len(np.unique(np.concatenate(local))) == batch


def test_train_iterator_errors(data):
    s, idx = data
    with pytest.raises(ConfigError, match='batch_size=6 does not divide over 4'):
        pipeline.train_iterator(s, idx, global_batch_size=6, seed=0, process_count=4)
    with pytest.raises(ConfigError, match='only 20 normal.*batch of 32.*batch_size <= 20'):
        pipeline.train_iterator(s, idx, global_batch_size=32, seed=0)
    with pytest.raises(ConfigError, match='seed must be >= 0'):
        pipeline.train_iterator(s, idx, global_batch_size=8, seed=-1)


def test_indexed_source_maps_indices(data):
    s, idx = data
    source = pipeline.IndexedSource(s, idx)
    assert len(source) == 20
    item = source[3]
    assert item['index'] == idx[3] and item['image'][0, 0, 0] == idx[3]
    assert item['image'].dtype == np.uint8 and item['image'].shape == (4, 4, 3)
    with pytest.raises(DataError, match='outside 0..59'):
        pipeline.IndexedSource(s, [0, 60])


def test_lazy_sequence_source(data):
    s, idx = data
    lazy = sources.ImageSet(list(s.images), s.labels, s.class_names, 'lazy')
    a = take(pipeline.train_iterator(lazy, idx, global_batch_size=4, seed=0), 7)
    b = take(pipeline.train_iterator(s, idx, global_batch_size=4, seed=0), 7)
    np.testing.assert_array_equal(a, b)


def test_eval_batches_order_padding_mask(data):
    s, idx = data
    assert pipeline.num_eval_batches(20, 8) == 3 and pipeline.num_eval_batches(16, 8) == 2
    assert pipeline.num_eval_batches(0, 8) == 0
    batches = list(pipeline.eval_batches(s, idx, batch_size=8))
    assert len(batches) == 3
    for b in batches:
        assert b['image'].shape == (8, 4, 4, 3) and b['image'].dtype == np.uint8
        assert b['index'].dtype == np.int64 and b['label'].dtype == np.int64
        assert b['mask'].dtype == bool
        np.testing.assert_array_equal(ids(b), b['index'])
    index = np.concatenate([b['index'] for b in batches])
    mask = np.concatenate([b['mask'] for b in batches])
    np.testing.assert_array_equal(index[mask], idx)
    np.testing.assert_array_equal(mask, np.arange(24) < 20)
    assert np.isin(index[~mask], idx).all()  # padding repeats valid images
    np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches]),
                                  s.labels[index])


def test_eval_batches_whole_set_and_processes(data):
    s, _ = data
    whole = list(pipeline.eval_batches(s, batch_size=16))
    np.testing.assert_array_equal(np.concatenate([b['index'] for b in whole])[:NUM],
                                  np.arange(NUM))
    parts = [list(pipeline.eval_batches(s, batch_size=16, process_index=p, process_count=4))
             for p in range(4)]
    for step, b in enumerate(whole):
        for key in ('image', 'index', 'label', 'mask'):
            np.testing.assert_array_equal(
                np.concatenate([parts[p][step][key] for p in range(4)]), b[key])
    with pytest.raises(ConfigError, match='eval batch_size=10 does not divide over 4'):
        pipeline.eval_batches(s, batch_size=10, process_count=4)
    assert list(pipeline.eval_batches(s, [], batch_size=8)) == []
