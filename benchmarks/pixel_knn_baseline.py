"""Raw-pixel nearest-neighbour one-class baseline: image AUROC per normal class.

cd /work/main && python benchmarks/pixel_knn_baseline.py --dataset fashion_mnist

For each normal class c the bank is every TRAINING image of class c, flattened
to a float32 vector in [0, 1] (uint8 / 255). Every TEST image (all classes) is
scored by its Euclidean distance to the nearest bank vector (with --k > 1: the
mean distance to its k nearest; with --metric cosine: 1 - cosine similarity), higher = more anomalous; the anomaly label is
(test label != c). Prints progress to stderr and one JSON object to stdout:
image AUROC per class (jaxad.metrics.auroc) and their mean.

No learning and no augmentation: it is the reference baseline that RESULTS.md
sets the learned detectors (CSI etc.) against. Data come from the project's
loaders (jaxad.data.sources.load_split) with the `.data` of the matching
config (configs/csi_fmnist.py, configs/quickstart.py, configs/csi_cifar.py): --dataset
cifar10_jpg reads the CIFAR-10 JPEG archive given as --path, cifar10 TFDS's cifar10
(downloaded and prepared on first use, as the CIFAR configs do).
Grey data sets are read with one channel rather than the configs' three
repeated ones; that scales every distance by sqrt(3) and leaves the AUROC as is.

Distances are computed blockwise (||a||^2 - 2 a.b + ||b||^2, clipped at 0,
~1024 test rows at a time) so memory stays bounded by block x bank size.
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


def data_config(dataset, path=None):
    """The `.data` ConfigDict of the config module that `dataset` names."""
    if dataset not in DATASETS:
        raise ValueError(f'unknown dataset {dataset!r}; choose {", ".join(DATASETS)}')
    config_file, arg = DATASETS[dataset]
    if dataset == 'cifar10_jpg':  # the JPEG archive has no default: the config needs it
        arg = f'{arg},path={path or ""}'
    spec = importlib.util.spec_from_file_location(
        f'_pixel_knn_config_{dataset}', os.path.join(REPO_ROOT, config_file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data_cfg = module.get_config(arg).data
    if path:
        data_cfg.path = path
    if data_cfg.source in ('fashion_mnist', 'idx'):
        data_cfg.channels = 1  # no triplicated grey pixels; AUROC unchanged
    return data_cfg


def load_data(dataset, path=None):
    """(train, test) `ImageSet`s of `dataset` through the project's loaders."""
    data_cfg = data_config(dataset, path)
    return sources.load_split(data_cfg, 'train'), sources.load_split(data_cfg, 'test')


def knn_scores(bank, queries, k=1, block_rows=BLOCK_ROWS):
    """Mean Euclidean distance from each query row to its k nearest bank rows, float64 (Q,)
    (`jaxad.baseline.knn_distances`, which every result's baseline uses)."""
    return baseline.knn_distances(bank, queries, k, block_rows)


def one_class_knn_aurocs(train_images, train_labels, test_images, test_labels, classes, k=1,
                         metric='l2'):
    """{class index: image AUROC} of k-NN distance to that class's training images.

    Images are uint8 NHWC (flattened and scaled to [0, 1] here) or float
    arrays, flattened and used as they are. metric 'cosine' scales every
    vector to unit length first (the distance between unit vectors is
    sqrt(2 - 2 cos), so the ranking is that of 1 - cos).
    """
    if metric not in ('l2', 'cosine'):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    def as_vectors(images):
        if not isinstance(images, np.ndarray) or images.dtype == np.uint8:
            return baseline.flatten(images)
        return images.reshape(len(images), -1).astype(np.float32)

    train_x, test_x = as_vectors(train_images), as_vectors(test_images)
    if metric == 'cosine':
        train_x, test_x = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
                           for x in (train_x, test_x))
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
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
    parser.add_argument('--path', default=None, help="override the config's data.path")
    parser.add_argument('--classes', default=None,
                        help='comma-separated class indices (default: all classes)')
    parser.add_argument('--k', type=int, default=1, help='neighbours averaged (default 1)')
    parser.add_argument('--metric', choices=('l2', 'cosine'), default='l2',
                        help='Euclidean distance, or 1 - cosine similarity')
    args = parser.parse_args(argv)

    t0 = time.time()
    train, test = load_data(args.dataset, args.path)
    class_names = train.class_names
    classes = (list(range(len(class_names))) if args.classes is None
               else [int(c) for c in args.classes.split(',')])
    _log(f'{args.dataset}: {len(train)} train, {len(test)} test images, '
         f'classes {classes} (loaded in {time.time() - t0:.1f} s)')
    aurocs = one_class_knn_aurocs(train.images, train.labels, test.images, test.labels,
                                  classes, k=args.k, metric=args.metric)
    result = {
        'dataset': args.dataset,
        'method': f'raw_pixel_{args.k}nn_{args.metric}',
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
