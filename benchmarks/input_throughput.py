"""Host input throughput: the trainer's Grain pipeline alone, and with the host-to-device copy.

python benchmarks/input_throughput.py --config=configs/csi_cifar.py --global_batch=512 \
    --cores=1,2 --read_threads=1,2 --batches=300
python benchmarks/input_throughput.py --source=synthetic --num_images=5000 --image_size=32

The data set is loaded once (`jaxad.data.sources.load_split`, timed: `load_s`; for the
JPEG folder source that is where every image is decoded, once, into one uint8 array).
Then, per (cores, read_threads), a fresh child process pinned to the first `cores` CPUs
(os.sched_setaffinity before JAX or Grain start any thread) reads the normal class's
training stream exactly as `jaxad.train.Setup.batches` does: `jaxad.loop.train_batches`
(each epoch's order one NumPy permutation seeded by (seed, epoch), a Grain `MapDataset`
of whole batches indexed by step, each batch gathered in one NumPy indexing call,
`read_threads` reader threads, `prefetch` batches ahead; `jaxad.data.pipeline`) and
`jaxad.sharding.to_global` onto the device. After `--warmup` batches it times
`--batches` batches twice:

  pipeline_images_per_s   next() of the host iterator alone (uint8 batches in host memory)
  with_copy_images_per_s  the same followed by the trainer's host-to-device copy
                          (`sharding.to_global`, block_until_ready)

plus, in the same child: `gather_images_per_s`, one NumPy fancy-index gather of a batch
(images[idx]: the memory copy the host cannot avoid); `copy_images_per_s`, the device
copy of a ready batch alone; `on_device_images_per_s`, `data.on_device`: the class's
images placed on the device once (`loop.DeviceInput`), then per batch the host's
positions (the same stream with `images=False`) copied and the batch gathered by a jitted
gather, block_until_ready at the end; with `--stack=K`, a table group of K members (classes
0..K-1, as `jaxad.table.Group.batches` feeds it: K streams stacked on a model axis):
`stack_host_with_copy_images_per_s` and `stack_on_device_images_per_s`, images of all K
members per second; `positions_only_images_per_s`, the pipeline's batches of
stream positions through Grain without any image (`pipeline.BatchPositions`: the cost of
the order and of Grain's per-batch iterator); `numpy_permutation_prototype_images_per_s`,
the prototype the pipeline was built from (the same per-epoch NumPy permutations, one
gather per batch, a plain `MapDataset.range(...).map`); and
`grain_shuffle_pipeline_images_per_s`, the pipeline before it (Grain's per-element
`MapDataset.shuffle` of positions, batched, one gather per batch; another order;
`--batches` / 4 batches), whose Python per-element shuffle capped it near 30k images/s.
On the CPU backend the "device" is host memory, so the copy is a memcpy; on a GPU it is
a PCIe/NVLink transfer (1.5 MiB per 512 CIFAR images). Each line records the load
average before and after. Never part of the test pass/fail
(tests/test_benchmark_scripts.py only checks it runs).
"""
import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time


def child(spec):
    os.sched_setaffinity(0, set(spec['cpus']))  # before any library starts a thread
    import grain
    import jax
    import ml_collections
    import numpy as np
    from importlib.metadata import version

    from jaxad import loop, sharding
    from jaxad.data import pipeline
    from jaxad.data.images import ImageSet
    from jaxad.methods import get_method

    load_before = os.getloadavg()
    data = np.load(spec['npz'])
    images, labels = data['images'], data['labels']  # in memory, as load_split leaves them
    image_set = ImageSet(images, labels, [str(c) for c in range(int(labels.max()) + 1)],
                         spec['name'])
    normal = [spec['normal_class']]
    indices = np.flatnonzero(np.isin(labels, normal)).astype(np.int64)
    config = ml_collections.ConfigDict(json.loads(spec['config']))
    config.batch_size = spec['global_batch']
    config.num_devices = 1
    method = get_method(config)
    mesh = sharding.make_mesh(1)
    b = spec['global_batch']

    def host_stream():
        return loop.train_batches(method, config, image_set, indices, normal, None, 0,
                                  read_threads=spec['read_threads'], prefetch=spec['prefetch'])

    def rate(it, n, to_device):
        for _ in range(spec['warmup']):
            batch = next(it)
        t0 = time.perf_counter()
        for _ in range(n):
            batch = next(it)
            if to_device:
                jax.block_until_ready(sharding.to_global(batch, mesh))
        return n * b / (time.perf_counter() - t0), batch

    def read(dataset):
        return iter(dataset.to_iter_dataset(grain.ReadOptions(
            num_threads=spec['read_threads'], prefetch_buffer_size=spec['prefetch'])))

    def grain_shuffle_stream():
        # jaxad's pipeline before per-epoch NumPy permutations: Grain's index shuffle
        # (one Python call per element) of positions, batched, one gather per batch.
        source = pipeline.IndexedSource(image_set, indices)
        positions = (grain.MapDataset.range(len(indices)).seed(config.seed).shuffle()
                     .repeat(None, reseed_each_epoch=True).batch(b, drop_remainder=True))
        return read(positions.map(source.gather))

    def positions_stream():
        # The pipeline's batches of positions alone (no images): its order and Grain's
        # per-batch iterator, the ceiling of everything but the gather and the copy.
        return read(grain.MapDataset.source(pipeline.BatchPositions(len(indices), b,
                                                                    config.seed)))

    def permutation_stream():
        # The prototype the pipeline grew from: each epoch's NumPy permutation (cached),
        # each batch's images gathered in one call, looked up with a mask per epoch.
        n = len(indices)
        source = pipeline.IndexedSource(image_set, indices)

        @functools.lru_cache(maxsize=4)
        def order(epoch):
            return np.random.default_rng([config.seed, epoch]).permutation(n)

        def batch_at(step):
            epoch, within = np.divmod(np.arange(step * b, (step + 1) * b), n)
            return source.gather(np.concatenate([order(e)[within[epoch == e]]
                                                 for e in np.unique(epoch)]))
        return read(grain.MapDataset.range(10 ** 12).map(batch_at))

    def on_device_rate(streams, where, n):
        # data.on_device: the images placed once (loop.DeviceInput), then per step the
        # host's positions copied and the batch gathered by the jitted gather on the device.
        sources = [{'image': (image_set, idx)} for idx in streams]
        device = loop.DeviceInput(sources, step_mesh)
        its = []
        for d, idx in enumerate(streams):
            it = loop.train_batches(method, config, image_set, idx, normal, None, 0,
                                    read_threads=threads_each, prefetch=spec['prefetch'],
                                    images=False)
            its.append(loop.offset_positions(it, {'image': int(device.offsets['image'][d])}))
        gather = jax.jit(lambda table, rows: table[rows])
        def one():
            batches = [next(it)['positions']['image'] for it in its]
            rows = batches[0] if where is None else np.stack(batches)
            return gather(device.tables['image'], sharding.to_global(rows, step_mesh, where))
        for _ in range(spec['warmup']):
            jax.block_until_ready(one())
        t0 = time.perf_counter()
        for _ in range(n):
            out = one()
        jax.block_until_ready(out)
        return n * b * len(streams) / (time.perf_counter() - t0)

    def stacked_host_rate(streams, n):
        # A table group of K members as jaxad.table.Group.batches feeds it: K streams, each
        # batch stacked on a model axis, copied with the (model, data) sharding.
        its = [loop.train_batches(method, config, image_set, idx, normal, None, 0,
                                  read_threads=threads_each, prefetch=spec['prefetch'])
               for idx in streams]
        where = sharding.stacked_data_sharding(step_mesh)
        def one():
            batches = [next(it) for it in its]
            stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)
            return sharding.to_global(stacked, step_mesh, where)
        for _ in range(spec['warmup']):
            jax.block_until_ready(one())
        t0 = time.perf_counter()
        for _ in range(n):
            jax.block_until_ready(one())
        return n * b * len(streams) / (time.perf_counter() - t0)

    step_mesh, threads_each = mesh, spec['read_threads']
    on_device = on_device_rate([indices], None, spec['batches'])
    stack = {}
    if spec['stack']:
        k = spec['stack']
        members = [np.flatnonzero(labels == c % (int(labels.max()) + 1)) for c in range(k)]
        step_mesh = sharding.make_mesh(1, num_models=k)
        threads_each = 1 if k > 2 else spec['read_threads']  # as Group.batches
        n = max(1, spec['batches'] // k)
        stack = {'stack': k, 'stack_batches_timed': n,
                 'stack_host_with_copy_images_per_s': round(stacked_host_rate(members, n), 1),
                 'stack_on_device_images_per_s': round(on_device_rate(
                     members, sharding.stacked_data_sharding(step_mesh), n), 1)}
        step_mesh, threads_each = mesh, spec['read_threads']
    pipeline_rate, batch = rate(host_stream(), spec['batches'], False)
    with_copy_rate, _ = rate(host_stream(), spec['batches'], True)
    old_batches = max(1, spec['batches'] // 4)  # the slow path: fewer batches
    old_rate, _ = rate(grain_shuffle_stream(), old_batches, False)
    positions_rate, _ = rate(positions_stream(), spec['batches'], False)
    permutation_rate, _ = rate(permutation_stream(), spec['batches'], False)
    # Ceilings: the gather alone (NumPy fancy indexing) and the device copy alone.
    rng = np.random.default_rng(0)
    picks = [rng.choice(indices, b, replace=False) for _ in range(spec['batches'])]
    t0 = time.perf_counter()
    for idx in picks:
        images[idx]
    gather_rate = spec['batches'] * b / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(spec['batches']):
        jax.block_until_ready(sharding.to_global(batch, mesh))
    copy_rate = spec['batches'] * b / (time.perf_counter() - t0)
    print(json.dumps({
        'cores': len(spec['cpus']), 'cpus': spec['cpus'], 'read_threads': spec['read_threads'],
        'prefetch': spec['prefetch'], 'global_batch': b, 'batches_timed': spec['batches'],
        'warmup': spec['warmup'], 'normal_class': spec['normal_class'],
        'normal_images': int(len(indices)), 'image_shape': list(images.shape[1:]),
        'batch_keys': sorted(batch), 'batch_dtype': str(batch['image'].dtype),
        'pipeline_images_per_s': round(pipeline_rate, 1),
        'with_copy_images_per_s': round(with_copy_rate, 1),
        'gather_images_per_s': round(gather_rate, 1),
        'copy_images_per_s': round(copy_rate, 1),
        'positions_only_images_per_s': round(positions_rate, 1),
        'numpy_permutation_prototype_images_per_s': round(permutation_rate, 1),
        'on_device_images_per_s': round(on_device, 1),
        **stack,
        'grain_shuffle_pipeline_images_per_s': round(old_rate, 1),
        'grain_shuffle_batches_timed': old_batches,
        'ms_per_batch_with_copy': round(1000 * b / with_copy_rate, 3),
        'loadavg_before': [round(x, 2) for x in load_before],
        'loadavg_after': [round(x, 2) for x in os.getloadavg()],
        'device': jax.devices()[0].device_kind, 'jax': jax.__version__,
        'grain': version('grain'), 'flax': version('flax'),
        'host': platform.processor() or platform.machine(),
        'host_cpus': os.cpu_count()}), flush=True)


def load(args):
    """(images, labels, name, config json, load seconds) of the data set to read."""
    import numpy as np
    from jaxad.data import sources
    if args.source == 'synthetic':
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from configs import quickstart
        config = quickstart.get_config()
        config.data.image_size = args.image_size
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.num_images, args.image_size, args.image_size, 3),
                              dtype=np.uint8)
        labels = np.arange(args.num_images) % 10
        return images, labels, 'synthetic', config, time.perf_counter() - t0
    import importlib.util
    path, _, arg = args.config.partition(':')
    spec = importlib.util.spec_from_file_location('cfg', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    t0 = time.perf_counter()
    train_set = sources.load_split(config.data, 'train')
    load_s = time.perf_counter() - t0
    return (np.asarray(train_set.images), np.asarray(train_set.labels), train_set.name,
            config, load_s)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', default='configs/csi_cifar.py')
    p.add_argument('--source', default='config', choices=['config', 'synthetic'])
    p.add_argument('--num_images', type=int, default=50000, help='synthetic only')
    p.add_argument('--image_size', type=int, default=32, help='synthetic only')
    p.add_argument('--normal_class', type=int, default=0)
    p.add_argument('--global_batch', type=int, default=512)
    p.add_argument('--batches', type=int, default=200, help='timed batches per measurement')
    p.add_argument('--warmup', type=int, default=10)
    p.add_argument('--cores', default='1,2', help='CPU counts to pin the child to')
    p.add_argument('--read_threads', default='2', help='Grain reader threads (trainer: 2)')
    p.add_argument('--prefetch', type=int, default=4, help='Grain prefetch (trainer: 4)')
    p.add_argument('--stack', type=int, default=0,
                   help='also a table group of this many members (classes 0..K-1), host-fed '
                        'and on device; 0: none')
    p.add_argument('--_child', default='', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        return child(json.loads(a._child))
    import numpy as np
    load_before = os.getloadavg()
    images, labels, name, config, load_s = load(a)
    print(json.dumps({'kind': 'load', 'data': name, 'images': int(len(images)),
                      'image_shape': list(images.shape[1:]), 'load_s': round(load_s, 2),
                      'load_images_per_s': round(len(images) / load_s, 1) if load_s else None,
                      'loadavg_before': [round(x, 2) for x in load_before],
                      'loadavg_after': [round(x, 2) for x in os.getloadavg()]}), flush=True)
    available = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, 'data.npz')
        np.savez(npz, images=images, labels=labels)
        for cores in (int(c) for c in a.cores.split(',')):
            if cores > len(available):
                print(json.dumps({'kind': 'input', 'cores': cores,
                                  'error': f'only {len(available)} CPUs available'}), flush=True)
                continue
            for threads in (int(t) for t in a.read_threads.split(',')):
                spec = dict(cpus=available[:cores], read_threads=threads, prefetch=a.prefetch,
                            global_batch=a.global_batch, batches=a.batches, warmup=a.warmup,
                            normal_class=a.normal_class, npz=npz, name=name, stack=a.stack,
                            config=config.to_json())
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--_child',
                                       json.dumps(spec)], capture_output=True, text=True)
                lines = [x for x in proc.stdout.splitlines() if x.startswith('{')]
                if proc.returncode or not lines:
                    out = {'cores': cores, 'read_threads': threads,
                           'error': (proc.stderr.strip().splitlines() or ['?'])[-1]}
                else:
                    out = json.loads(lines[-1])
                print(json.dumps(dict({'kind': 'input', 'data': name}, **out)), flush=True)


if __name__ == '__main__':
    main()
