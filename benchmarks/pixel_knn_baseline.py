"""Raw-pixel nearest-neighbour one-class baseline: image AUROC per normal class.

cd /work/main && python benchmarks/pixel_knn_baseline.py --dataset fashion_mnist
python benchmarks/pixel_knn_baseline.py --dataset digits                       # 16x16, as configs/quickstart.py
python benchmarks/pixel_knn_baseline.py --config=configs/recontrast_mvtec.py:path=/tmp/synth32,category=weave,size=32 --classes=0

For each normal class c the bank is every TRAINING image of class c. Every TEST
image (all classes) is scored by its distance to the nearest bank image, higher
= more anomalous; the anomaly label is (test label != c). Prints progress to
stderr and one JSON object to stdout: image AUROC per class and their mean.

With --k=1 --metric=l2 (the default) each class's AUROC is
`jaxad.baseline.raw_pixel_1nn`, the baseline every result carries in its
results.json (`baseline.raw_pixel_1nn`): the exact squared L2 distance of the
raw uint8 pixels (integers in float64, so images at equal distances tie
exactly) and jaxad.metrics.auroc. The numbers are therefore those a run on the
same split reports. With --k > 1 (the mean Euclidean distance to the k nearest)
or --metric cosine (1 - cosine similarity) the pixels are flattened to float32
in [0, 1] (uint8 / 255) and scored by `knn_scores` (float32 dot products).

No learning and no augmentation: it is the reference baseline that RESULTS.md
sets the learned detectors against. Data come from the project's loaders
(jaxad.data.sources.load_split) with the `.data` of a config: by default the
one --dataset names (configs/csi_fmnist.py, configs/quickstart.py,
configs/csi_cifar.py), or --config=FILE[:ARGS] for a section's own config
(e.g. the synthetic MVTec-style set of configs/recontrast_mvtec.py), with
--image_size and --path overriding its data.image_size and data.path. The
image geometry is thus the one the detectors of that config see (digits:
data.image_size=16, upsampled from 8x8 and repeated to RGB as the config
loads them). --dataset cifar10_jpg reads the CIFAR-10 JPEG archive given as
--path, cifar10 TFDS's cifar10 (downloaded and prepared on first use, as the
CIFAR configs do).

Grey IDX data (fashion_mnist, idx) are read with one channel rather than the
configs' three repeated ones: that multiplies every squared distance by exactly
3 (integers, so no tie appears or disappears) and leaves the ranking, hence
the AUROC, unchanged; the numbers equal the results.json baseline of a run
with the three channels.

Distances are computed blockwise (||a||^2 - 2 a.b + ||b||^2, ~1024 test rows at
a time) so memory stays bounded by block x bank size.
"""
import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `python benchmarks/...` puts benchmarks/, not the repo, on the path
    sys.path.insert(0, REPO_ROOT)

from jaxad import baseline, metrics  # noqa: E402
from jaxad.data import sources  # noqa: E402
# dataset flag -> (config file, its argument string)
DATASETS = {
    'fashion_mnist': ('configs/csi_fmnist.py', ''),
    'digits': ('configs/quickstart.py', ''),
    'cifar10_jpg': ('configs/csi_cifar.py', 'dataset=cifar10_jpg'),  # needs --path
    'cifar10': ('configs/csi_cifar.py', 'dataset=cifar10'),  # TFDS, prepared on first use
}
BLOCK_ROWS = baseline.BLOCK_ROWS


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _config_module(config_file, name):
    spec = importlib.util.spec_from_file_location(
        f'_pixel_knn_config_{name}', config_file if os.path.isabs(config_file)
        else os.path.join(REPO_ROOT, config_file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def data_config(dataset, path=None, config=None, image_size=None):
    """The `.data` ConfigDict of the config module that `dataset` names, or of `config`
    ('FILE[:ARGS]', as `python -m jaxad.main --config=` takes it) when given; `path` and
    `image_size` override its data.path and data.image_size."""
    if config:
        config_file, _, arg = config.partition(':')
        name = os.path.splitext(os.path.basename(config_file))[0]
    else:
        if dataset not in DATASETS:
            raise ValueError(f'unknown dataset {dataset!r}; choose {", ".join(DATASETS)}')
        config_file, arg = DATASETS[dataset]
        name = dataset
        if dataset == 'cifar10_jpg':  # the JPEG archive has no default: the config needs it
            arg = f'{arg},path={path or ""}'
    data_cfg = _config_module(config_file, name).get_config(arg or None).data
    if path:
        data_cfg.path = path
    if image_size:
        data_cfg.image_size = int(image_size)
    if data_cfg.source in ('fashion_mnist', 'idx'):
        # one grey channel, not the configs' three repeated ones: every squared distance
        # is 3x that of the three channels, exactly, so the ranking and the AUROC are as is
        data_cfg.channels = 1
    return data_cfg


def load_data(dataset, path=None, config=None, image_size=None):
    """(train, test) `ImageSet`s of `dataset` (or `config`) through the project's loaders."""
    data_cfg = data_config(dataset, path, config, image_size)
    return sources.load_split(data_cfg, 'train'), sources.load_split(data_cfg, 'test')


def knn_scores(bank, queries, k=1, block_rows=BLOCK_ROWS):
    """Mean Euclidean distance from each query row to its k nearest bank rows, float64 (Q,)
    (`jaxad.baseline.knn_distances`, which every result's baseline uses)."""
    return baseline.knn_distances(bank, queries, k, block_rows)


def _is_uint8(images):
    if isinstance(images, np.ndarray):
        return images.dtype == np.uint8
    return len(images) > 0 and np.asarray(images[0]).dtype == np.uint8


def one_class_knn_aurocs(train_images, train_labels, test_images, test_labels, classes, k=1,
                         metric='l2'):
    """{class index: image AUROC} of k-NN distance to that class's training images.

    k = 1 and metric 'l2' on uint8 images (an array or a sequence): the exact raw-pixel
    1-NN baseline of `jaxad.baseline.raw_pixel_1nn`, what every results.json carries.
    Otherwise images are uint8 NHWC (flattened and scaled to [0, 1] here) or float
    arrays, flattened and used as they are, and scored by `knn_scores`. metric 'cosine'
    scales every vector to unit length first (the distance between unit vectors is
    sqrt(2 - 2 cos), so the ranking is that of 1 - cos).
    """
    if metric not in ('l2', 'cosine'):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if k == 1 and metric == 'l2' and _is_uint8(train_images) and _is_uint8(test_images):
        results = {}
        for c in classes:
            bank_indices = np.flatnonzero(train_labels == c)
            if len(bank_indices) == 0:
                raise ValueError(f'class {c} has no training images')
            t0 = time.time()
            results[c] = baseline.raw_pixel_1nn(train_images, bank_indices, test_images,
                                                (test_labels != c).astype(np.int64))['image_AUROC']
            _log(f'class {c}: bank {len(bank_indices)}, AUROC {results[c]:.4f} (exact '
                 f'raw_pixel_1nn, {time.time() - t0:.1f} s)')
        return results

    def as_vectors(images):
        if not isinstance(images, np.ndarray) or images.dtype == np.uint8:
            return baseline.flatten(images)
        return images.reshape(len(images), -1).astype(np.float32)

    train_x, test_x = as_vectors(train_images), as_vectors(test_images)
    if metric == 'cosine':
        train_x, test_x = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
                           for x in (train_x, test_x))
    results = {}
    for c in classes:
        bank = train_x[train_labels == c]
        if len(bank) == 0:
            raise ValueError(f'class {c} has no training images')
        t0 = time.time()
        scores = knn_scores(bank, test_x, k)
        results[c] = metrics.auroc(scores, (test_labels != c).astype(np.int64))
        _log(f'class {c}: bank {len(bank)}, AUROC {results[c]:.4f} ({time.time() - t0:.1f} s)')
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--dataset', choices=sorted(DATASETS), default='fashion_mnist')
    parser.add_argument('--config', default=None,
                        help="FILE[:ARGS]: take .data from this config instead of --dataset's "
                             "(e.g. configs/recontrast_mvtec.py:path=/tmp/synth32,category=weave,"
                             "size=32)")
    parser.add_argument('--image_size', type=int, default=None,
                        help="override the config's data.image_size")
    parser.add_argument('--path', default=None, help="override the config's data.path")
    parser.add_argument('--classes', default=None,
                        help='comma-separated class indices (default: all classes)')
    parser.add_argument('--k', type=int, default=1, help='neighbours averaged (default 1)')
    parser.add_argument('--metric', choices=('l2', 'cosine'), default='l2',
                        help='Euclidean distance, or 1 - cosine similarity')
    args = parser.parse_args(argv)

    t0 = time.time()
    data_cfg = data_config(args.dataset, args.path, args.config, args.image_size)
    train, test = sources.load_split(data_cfg, 'train'), sources.load_split(data_cfg, 'test')
    class_names = train.class_names
    classes = (list(range(len(class_names))) if args.classes is None
               else [int(c) for c in args.classes.split(',')])
    name = args.config or args.dataset
    _log(f'{name}: {len(train)} train, {len(test)} test images, '
         f'classes {classes} (loaded in {time.time() - t0:.1f} s)')
    aurocs = one_class_knn_aurocs(train.images, train.labels, test.images, test.labels,
                                  classes, k=args.k, metric=args.metric)
    result = {
        'dataset': args.dataset if args.config is None else data_cfg.source,
        'config': args.config or DATASETS[args.dataset][0],
        'image_shape': list(np.asarray(train.images[0]).shape),
        'method': f'raw_pixel_{args.k}nn_{args.metric}',
        'exact': (args.k == 1 and args.metric == 'l2' and _is_uint8(train.images)
                  and _is_uint8(test.images)),  # jaxad.baseline.raw_pixel_1nn
        'per_class': {class_names[c]: round(a, 6) for c, a in aurocs.items()},
        'mean_image_AUROC': round(float(np.mean(list(aurocs.values()))), 6),
        'num_train_per_class': {class_names[c]: int(np.sum(train.labels == c)) for c in classes},
        'num_test': len(test),
        'seconds': round(time.time() - t0, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
