"""The evaluator: jitted feature extraction, scoring and metrics.

Separate from training: it needs only the model variables (and, when saved,
the scoring state), so `--mode=eval` runs it from a checkpoint alone.
"""
import functools
import io
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxad import baseline, distributed, fingerprint, plots, storage
from jaxad import metrics as metrics_lib
from jaxad import sharding, stacking
from jaxad.data import pipeline, sources
from jaxad.writers import Progress


@functools.lru_cache(maxsize=None)
def make_feature_fn(method, mesh):
    """jit(method.features) with the batch sharded and variables replicated.

    Cached so the train-bank and test passes share one traced program.
    """
    data, repl = sharding.data_sharding(mesh), sharding.replicated(mesh)
    return jax.jit(method.features, in_shardings=(repl, data, data, repl), out_shardings=data)


@functools.lru_cache(maxsize=None)
def make_stacked_feature_fn(method, mesh, shared_images, mode):
    """jit of method.features over a stack of K models' variables.

    shared_images: every model sees the same (B, ...) batch (the test set);
    otherwise model k gets its own row of a (K, B, ...) batch (its train bank).
    `mode`: 'vmap' or 'unroll' (jaxad.stacking).
    """
    models, repl = sharding.model_sharding(mesh), sharding.replicated(mesh)
    stacked = sharding.stacked_data_sharding(mesh)
    if shared_images:
        fn = stacking.stacked(method.features, mode, in_axes=(0, None, None, None))
        data = sharding.data_sharding(mesh)
        return jax.jit(fn, in_shardings=(models, data, data, repl), out_shardings=stacked)
    fn = stacking.stacked(method.features, mode, in_axes=(0, 0, 0, None))
    return jax.jit(fn, in_shardings=(models, stacked, stacked, repl), out_shardings=stacked)


def _feature_pass(apply, batches, n_batches, label):
    """`apply(batch)` on every batch; (device outputs, host masks) in order."""
    progress = Progress(n_batches, label=label)
    outputs, masks = [], []
    for i, batch in enumerate(batches):
        # Left on device: fetching every batch would stall the dispatch pipeline.
        outputs.append(apply(batch))
        masks.append(batch['mask'])
        if (i + 1) % max(1, n_batches // 10) == 0 or i + 1 == n_batches:
            jax.block_until_ready(outputs[-1])
            progress.update(i + 1)
    return outputs, masks


def _concat(outputs, axis):
    # to_host: with several processes each batch's rows live on all of them.
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(distributed.to_host(xs), axis=axis),
                                  *outputs)


def _global_masks(masks, mesh, where):
    """Each process's batch masks -> the global batches' masks (laid out as the features)."""
    if jax.process_count() == 1:
        return masks
    return [distributed.to_host(sharding.to_global(m, mesh, where)) for m in masks]


def extract_features(method, variables, image_set, indices, *, batch_size, mesh, key,
                     label='features'):
    """Features of `image_set[indices]` as host NumPy arrays (padding removed)."""
    sharding.check_batch_divides(batch_size, mesh, 'eval.batch_size')
    feature_fn = make_feature_fn(method, mesh)

    def apply(batch):
        arrays = sharding.to_global({'image': batch['image'], 'index': batch['index']}, mesh)
        return feature_fn(variables, arrays['image'], arrays['index'], key)

    batches = pipeline.eval_batches(image_set, indices, batch_size=batch_size,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
    outputs, masks = _feature_pass(apply, batches,
                                   pipeline.num_eval_batches(len(indices), batch_size), label)
    mask = np.concatenate(_global_masks(masks, mesh, sharding.data_sharding(mesh)))
    return jax.tree_util.tree_map(lambda x: x[mask], _concat(outputs, 0))


def extract_stacked_features(method, variables, image_set, index_lists, *, batch_size, mesh,
                             key, mode, label='features'):
    """Features of K stacked models, one pass over the images.

    index_lists None: all models score `image_set` in full (the test split);
    returns one tree with leading axis K. Otherwise model k reads
    `image_set[index_lists[k]]` (its own train bank); returns a list of K trees.
    """
    sharding.check_batch_divides(batch_size, mesh, 'eval.batch_size')
    shared = index_lists is None
    feature_fn = make_stacked_feature_fn(method, mesh, shared, mode)
    where = sharding.data_sharding(mesh) if shared else sharding.stacked_data_sharding(mesh)

    def apply(batch):
        arrays = sharding.to_global({'image': batch['image'], 'index': batch['index']}, mesh,
                                    where)
        return feature_fn(variables, arrays['image'], arrays['index'], key)

    proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if shared:
        n = len(image_set)
        batches = pipeline.eval_batches(image_set, None, batch_size=batch_size, **proc)
    else:
        n = max(len(ix) for ix in index_lists)
        batches = pipeline.stacked_eval_batches(image_set, index_lists, batch_size=batch_size,
                                                **proc)
    outputs, masks = _feature_pass(apply, batches, pipeline.num_eval_batches(n, batch_size),
                                   label)
    masks = _global_masks(masks, mesh, where)
    feats = _concat(outputs, 1)  # (K, N_padded, ...)
    if shared:
        mask = np.concatenate(masks)
        return jax.tree_util.tree_map(lambda x: x[:, mask], feats)
    mask = np.concatenate(masks, axis=1)
    return [jax.tree_util.tree_map(lambda x, k=k: x[k][mask[k]], feats)
            for k in range(len(index_lists))]


@functools.lru_cache(maxsize=None)
def jit_score(method):
    """jit(method.score), one per method (the scorer `score_features` runs)."""
    return jax.jit(method.score)


def score_features(method, scoring, test_features, block=1024):
    """Scores in blocks of test rows so the test x bank matrix stays bounded.

    Every block has the same shape (the last is padded; scores are per row), so the
    scorer compiles once per (method, block) and repeated evaluations reuse it.
    """
    score_fn = jit_score(method)
    n = len(jax.tree_util.tree_leaves(test_features)[0])
    block = max(min(block, n), 1)
    out = []
    for start in range(0, n, block):
        def rows(x):
            part = np.asarray(x[start:start + block])
            pad = block - len(part)
            return np.pad(part, [(0, pad)] + [(0, 0)] * (part.ndim - 1)) if pad else part
        scores = score_fn(scoring, jax.tree_util.tree_map(rows, test_features))
        out.append(jax.tree_util.tree_map(lambda s: np.asarray(s)[:min(block, n - start)],
                                          scores))
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def compute_results(method, score_dict, test_labels, anomaly, normal_classes, class_names):
    """Metrics for every score, the headline score first, and a per-class breakdown."""
    results = {'headline_score': method.headline_score, 'scores': {}}
    for name, s in score_dict.items():
        results['scores'][name] = metrics_lib.image_metrics(s, anomaly)
    per_class = metrics_lib.per_class_auroc(score_dict[method.headline_score], anomaly,
                                            test_labels, normal_classes)
    results['per_class_image_AUROC'] = {class_names[int(c)]: v for c, v in per_class.items()}
    results.update(results['scores'][method.headline_score])
    from jaxad.pixel_metrics import image_f1max
    results['image_F1max'] = image_f1max(np.asarray(score_dict[method.headline_score]), anomaly)
    results['FPR@95TPR_positive_class'] = 'anomaly'
    return results


def format_table(results):
    """A plain-text table of the results for the console."""
    lines = [f"{'score':<12} {'image_AUROC':>11} {'image_AUPR':>10} {'FPR@95TPR':>9}"]
    for name, m in results['scores'].items():
        mark = ' *' if name == results['headline_score'] else ''
        lines.append(f"{name:<12} {m['image_AUROC']:>11.4f} {m['image_AUPR']:>10.4f} "
                     f"{m['FPR@95TPR']:>9.4f}{mark}")
    lines.append('* headline score. FPR@95TPR: anomaly = positive class.')
    for name, m in results.get('pixel', {}).items():
        lines.append(f"pixel ({name}): pixel_AUROC {m['pixel_AUROC']:.4f}  "
                     f"AUPRO@0.3 {m['AUPRO']:.4f}")
        for cls, v in m.get('per_class_pixel_AUROC', {}).items():
            lines.append(f'  pixel_AUROC normal + {cls:<20} {v:.4f}')
    if 'baseline' in results:
        lines.append(baseline.verdict(results) + '.')
    lines.append(f"image_AUROC of the normal class vs each anomalous class "
                 f"({results['headline_score']} score):")
    for name, v in results['per_class_image_AUROC'].items():
        lines.append(f'  {name:<20} {v:.4f}')
    return '\n'.join(lines)


def results_for(method, score_dict, test_set, normal_classes, method_name):
    """The results dict of one detector: metrics plus what was evaluated."""
    labels = np.asarray(test_set.labels)
    anomaly = sources.anomaly_labels(labels, normal_classes)
    results = compute_results(method, score_dict, labels, anomaly, normal_classes,
                              test_set.class_names)
    results.update({
        'method': method_name, 'dataset': test_set.name,
        'normal_classes': [int(c) for c in normal_classes],
        'normal_class_names': [test_set.class_names[int(c)] for c in normal_classes],
        'num_test': int(len(labels)), 'num_test_anomalies': int(anomaly.sum())})
    return results


def results_with_maps(method, scores, test_set, normal_classes, method_name, bank=None):
    """(results, image scores, maps) of one detector's scores: image metrics from the (N,)
    scores and, when the test set has masks, pixel metrics from the (N, h, w) maps (the
    first map is the headline one). `bank`: (train set, indices) of the detector's normal
    training images, for the raw-pixel baseline (`jaxad.baseline`; None: no baseline)."""
    score_dict, maps = split_maps(scores)
    results = results_for(method, score_dict, test_set, normal_classes, method_name)
    if bank is not None:
        anomaly = sources.anomaly_labels(np.asarray(test_set.labels), normal_classes)
        results['baseline'] = {baseline.NAME: baseline.raw_pixel_1nn(
            bank[0].images, bank[1], test_set.images, anomaly)}
        (logging.warning if baseline.below(results) else logging.info)(
            '%s: %s', '+'.join(results['normal_class_names']), baseline.verdict(results))
    if maps and test_set.masks is not None:
        results['pixel'] = {name: pixel_results(m, test_set.masks, test_set.labels,
                                                test_set.class_names, normal_classes)
                            for name, m in maps.items()}
        results.update(results['pixel'][next(iter(maps))])
    return results, score_dict, maps


def eval_test_key(seed):
    """The test-time augmentation key: fixed per seed, shared by single and stacked runs."""
    return jax.random.fold_in(jax.random.key(seed), 1)


def eval_bank_key(seed):
    """The key of the train-bank features."""
    return jax.random.fold_in(jax.random.key(seed), 2)


def baseline_bank(config, train_set, indices):
    """`results_with_maps`'s `bank`: the detector's normal training images, or None when
    `eval.pixel_baseline` is off."""
    return (train_set, indices) if config.eval.get('pixel_baseline', True) else None


def evaluate(method, variables, scoring, test_set, normal_classes, *, config, mesh, workdir,
             extra=None, bank=None):
    """Scores the whole test split; writes results.json and prints a table. `bank`: as
    `results_with_maps` takes it (`baseline_bank`)."""
    t0 = time.time()
    all_idx = np.arange(len(test_set.labels))
    feats = extract_features(method, variables, test_set, all_idx,
                             batch_size=config.eval.batch_size, mesh=mesh,
                             key=eval_test_key(config.seed), label='eval test')
    results, score_dict, maps = results_with_maps(
        method, score_features(method, scoring, feats), test_set, normal_classes,
        config.method, bank=bank)
    results.update(eval_seconds=round(time.time() - t0, 2), **(extra or {}))
    results.update(fingerprint.results_record(config))  # the settings behind these numbers
    if jax.process_index() == 0:
        storage.write_json(storage.join(workdir, 'results.json'), results, indent=2)
        print(format_table(results), flush=True)
        logging.info('results written to %s', storage.join(workdir, 'results.json'))
        if config.eval.get('plots', True):
            threshold = (extra or {}).get('threshold') or {}
            plots.write_evaluation_plots(
                score_dict, sources.anomaly_labels(np.asarray(test_set.labels), normal_classes),
                method.headline_score, storage.join(workdir, 'plots'),
                title=f'{test_set.name}, normal {list(results["normal_class_names"])}',
                threshold=threshold.get('value'))
            if maps:
                write_overlays(maps, score_dict[method.headline_score], test_set,
                               storage.join(workdir, 'plots', 'overlays'),
                               config.eval.get('num_overlays', 16))
        if maps and config.eval.get('save_maps', True):
            save_maps(storage.join(workdir, 'anomaly_maps.npz'), maps, score_dict, test_set)
    return results


def split_maps(scores):
    """({name: (N,)} image scores, {name: (N, h, w)} anomaly maps) of a method's scores."""
    image = {k: v for k, v in scores.items() if np.ndim(v) == 1}
    maps = {k: v for k, v in scores.items() if np.ndim(v) > 1}
    return image, maps


def save_maps(path, maps, image_scores, test_set):
    """Every test image's anomaly maps (as scored: the method's resolution, float32) with
    its label, class name and image scores, row i = test image i, as one .npz."""
    labels = np.asarray(test_set.labels)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, labels=labels, class_names=np.asarray(test_set.class_names)[labels],
        **{f'map_{k}': np.asarray(v, np.float32) for k, v in maps.items()},
        **{f'score_{k}': np.asarray(v) for k, v in image_scores.items()})
    storage.write_bytes(path, buffer.getvalue())
    logging.info('anomaly maps written to %s', path)


def resize_maps(maps, size, block=64):
    """Bilinear resize of (N, h, w) maps to (N, H, W), in blocks of images (bounded memory)."""
    maps = np.asarray(maps, np.float32)
    if maps.shape[1:] == tuple(size):
        return maps
    return np.concatenate([np.asarray(jax.image.resize(maps[i:i + block],
                                                       (len(maps[i:i + block]),) + tuple(size),
                                                       'bilinear'))
                           for i in range(0, len(maps), block)])


def pixel_results(maps, masks, labels=None, class_names=None, normal_classes=(0,)):
    """pixel_AUROC and AUPRO (MVTec protocol, FPR <= 0.3) of anomaly maps against the test
    set's ground-truth masks; maps are resized to the masks' size first. With labels:
    also per_class_pixel_AUROC, each anomalous class (an MVTec defect type) with the normal
    test images, so one defect type's localisation can be read on its own."""
    from jaxad import pixel_metrics
    masks = np.asarray(masks)
    maps = resize_maps(maps, masks.shape[1:])
    out = pixel_metrics.pixel_metrics(maps, masks)
    if labels is not None:
        labels = np.asarray(labels)
        normal = np.isin(labels, normal_classes)
        out['per_class_pixel_AUROC'] = {
            class_names[int(c)]: pixel_metrics.pixel_auroc(maps[normal | (labels == c)],
                                                           masks[normal | (labels == c)])
            for c in np.unique(labels[~normal]) if masks[labels == c].any()}
    return out


def write_overlays(maps, image_scores, test_set, out_dir, count):
    """Overlay PNGs (image, anomaly map, ground truth) for `count` test images spread evenly
    over the test set (its anomalous classes included), for the first map."""
    if count <= 0:
        return []
    n = len(test_set.labels)
    idx = np.unique(np.linspace(0, n - 1, min(count, n)).astype(int))
    images = np.stack([np.asarray(test_set.images[i]) for i in idx])
    masks = None if test_set.masks is None else np.asarray(test_set.masks)[idx]
    names = [f'{test_set.class_names[int(test_set.labels[i])]}_{i}' for i in idx]
    first = np.asarray(next(iter(maps.values())))[idx]
    return plots.write_anomaly_overlays(images, first, out_dir, masks=masks, names=names,
                                        scores=np.asarray(image_scores)[idx], limit=len(idx))


@functools.lru_cache(maxsize=None)
def _jit_fit_scoring(method):
    return jax.jit(method.fit_scoring)


def scoring_from_features(method, train_features):
    """The scoring state (host NumPy) from train-bank features."""
    return jax.tree_util.tree_map(np.asarray, _jit_fit_scoring(method)(train_features))


def with_bank_labels(method, train_features, bank_labels):
    """Adds 'label' (each bank image's position among the normal classes) to the bank
    features of a method that trains with labels (`method.needs_bank_labels`: MCL fits one
    Gaussian per class)."""
    if not method.needs_bank_labels:
        return train_features
    bank_labels = np.asarray(bank_labels)
    positions = np.searchsorted(np.unique(bank_labels), bank_labels).astype(np.int32)
    return dict(train_features, label=positions)


def feature_shapes(method, variables, image_shape, num_images, rng):
    """Abstract `method.features` of `num_images` images (no compute)."""
    shapes = jax.eval_shape(
        method.features, variables, jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.uint8),
        jax.ShapeDtypeStruct((1,), jnp.int32), rng)
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct((num_images,) + s.shape[1:], s.dtype), shapes)


def needs_bank_pass(method):
    """`method.needs_bank`: False for density-free scores (OECL's norms) with no eval.density
    attached (a method with evaluators attached needs the bank): then the bank's features
    are never computed (OECL would run 1 + T views over every image)."""
    return method.needs_bank


def bankless_scoring(method, variables, image_shape, num_bank, key):
    """The scoring state of a method whose scores use no bank features (`needs_bank_pass`
    False): fit_scoring on zero features made inside the program, so no bank-sized array
    (ReContrast: one map per training image) is ever built on the host."""
    shapes = feature_shapes(method, variables, image_shape, num_bank, key)
    zeros = lambda: jax.tree_util.tree_map(  # noqa: E731
        lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.tree_util.tree_map(np.asarray, jax.jit(lambda: method.fit_scoring(zeros()))())


def fit_scoring(method, variables, train_set, normal_indices, *, config, mesh):
    """The scoring state (feature bank, weights) from the normal training images."""
    if not needs_bank_pass(method):
        return bankless_scoring(method, variables, np.shape(train_set.images[0]),
                                len(normal_indices), eval_bank_key(config.seed))
    feats = extract_features(method, variables, train_set, normal_indices,
                             batch_size=config.eval.batch_size, mesh=mesh,
                             key=eval_bank_key(config.seed), label='eval train bank')
    feats = with_bank_labels(method, feats, np.asarray(train_set.labels)[normal_indices])
    return scoring_from_features(method, feats)
