"""Scoring new images from a finished run's checkpoint alone (`--mode=predict`).

Everything scoring needs is in the workdir: `config.json` (model, image size,
channels, test-time augmentation), the final checkpoint (model variables and
the method's scoring state: feature bank and weights) and, when calibrated,
`threshold.json`. No training data is read.

One function scores: `score_images(method, variables, scoring, key, images)`,
uint8 (B, H, W, C) -> {score name: (B,)}. Every image is scored with the same
test-time augmentation draws whatever its position or batch (`indices` are all
0 under the fixed key `predict_key(config)`), so an image's score depends on
the image alone. `make_score_fn` closes it over a model; `jaxad.export`
serialises exactly that closure; predict and calibration run the same function
jitted with the variables as arguments (one compile per method and batch shape,
no model-sized constants in the program).

Inputs (`list_inputs`): a folder (recursive, image extensions), a glob, a text
file listing one path per line (relative paths are relative to the list
file's folder; '#' starts a comment), a single image, or a `.npz` holding
`images` (uint8 NHWC or NHW) and optionally `names`. Files are decoded with
Pillow, converted to the run's channels (L or RGB, as the training folder
reader does) and, when not already image_size x image_size, resized to it with
Pillow's bilinear filter (antialiased when shrinking; aspect ratio not kept).
Training images were already that size for every source except sklearn digits,
which were resized with the same bilinear filter. Unreadable files are logged
once each, listed under `skipped` with the reason, and never stop the run.
"""
import csv
import dataclasses
import functools
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from jaxad import checkpoint as ckpt_lib
from jaxad import evaluate as eval_lib
from jaxad import fingerprint
from jaxad import thresholds
from jaxad.config import load_run_config
from jaxad.data import images as image_files
from jaxad.errors import ConfigError, DataError, TrainingError
from jaxad.methods import get_method
from jaxad.writers import Progress

IMAGE_EXTENSIONS = image_files.IMAGE_EXTENSIONS  # the one list, shared with the data sources
_PIL_MODES = image_files.PIL_MODES
_GLOB_CHARS = '*?['


# ------------------------------------------------------------------ the score


def predict_key(config):
    """The test-time augmentation key of predict, calibrate and export."""
    return eval_lib.eval_test_key(config.seed)


def score_images(method, variables, scoring, key, images):
    """uint8 (B, H, W, C) -> {score name: (B,) float32}, each image on its own.

    All images use augmentation index 0 of `key`: an image's score does not
    depend on its batch, its position in it or the batch size.
    """
    indices = jnp.zeros(images.shape[:1], jnp.int32)
    return method.score(scoring, method.features(variables, images, indices, key))


def make_score_fn(method, variables, scoring, key):
    """`f(uint8 images (B, H, W, C)) -> dict of scores` closed over one model."""
    return functools.partial(score_images, method, variables, scoring, key)


@functools.lru_cache(maxsize=None)
def _jitted(method):
    return jax.jit(functools.partial(score_images, method))


def score_batches(method, variables, scoring, key, batches):
    """Scores an iterable of uint8 batches (all of one shape); host arrays, in order."""
    fn = _jitted(method)
    variables, scoring = jax.device_put((variables, scoring))  # once, not per batch
    outs = [fn(variables, scoring, key, b) for b in batches]  # dispatch all, then fetch
    outs = jax.device_get(outs)
    if not outs:
        return {}
    return {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in outs[0]}


def pad_batch(images, batch_size):
    """`images` (n <= batch_size) padded with copies of its first row to batch_size."""
    n = len(images)
    if n == batch_size:
        return images
    return np.concatenate([images, np.repeat(images[:1], batch_size - n, axis=0)])


def score_array(model, images, batch_size=None):
    """Scores of a uint8 (N, H, W, C) array at the model's size, in fixed padded batches."""
    images = np.asarray(images)
    batch_size = batch_size or model.config.eval.batch_size
    n = len(images)
    batches = (pad_batch(images[s:s + batch_size], batch_size) for s in range(0, n, batch_size))
    scores = score_batches(model.method, model.variables, model.scoring, model.key, batches)
    return {k: v[:n] for k, v in scores.items()}


# ------------------------------------------------------------------ the model


@dataclasses.dataclass
class Model:
    """A finished run, restored for scoring: host arrays, no training data."""
    config: object
    method: object
    variables: dict
    scoring: dict
    step: int
    key: jax.Array
    workdir: str

    @property
    def image_shape(self):
        d = self.config.data
        return (d.image_size, d.image_size, d.channels)

    @property
    def score_name(self):
        return self.method.headline_score

    def score_fn(self):
        return make_score_fn(self.method, self.variables, self.scoring, self.key)


def load_model(workdir, config=None):
    """The model and scoring state of the latest checkpoint of `workdir`."""
    workdir = os.fspath(workdir)
    config = config if config is not None else load_run_config(workdir)
    fingerprint.check_scoring_use(config, workdir)  # the checkpoint's scoring state as saved
    if config.table.classes:
        raise ConfigError(f'workdir {workdir} holds a one-class table (table.classes='
                          f'{config.table.classes!r}); predict, calibrate and export score a '
                          'single detector')
    method = _method_for(config)
    directory = os.path.join(workdir, 'checkpoints')
    if not os.path.isdir(directory):
        raise TrainingError(f'no checkpoint in {directory}; train first (--mode=train)')
    checkpoints = ckpt_lib.Checkpoints(directory, use_async=False, read_only=True)
    try:
        steps = sorted(checkpoints.all_steps(), reverse=True)
        if not steps:
            raise TrainingError(f'no checkpoint in {directory}; train first (--mode=train)')
        # The newest step with a scoring state that reads. A damaged one is reported and
        # skipped (left in place: predict does not write to the run; --mode=train sets it
        # aside and repairs the run).
        damaged = []
        for step in steps:
            if not checkpoints.has_scoring(step):
                if damaged:
                    continue
                raise TrainingError(
                    f'checkpoint {directory} step {step} has no scoring state (training did '
                    'not finish); rerun the same --mode=train command to finish it')
            try:
                state = _restore_item(checkpoints, step, 'state')
                scoring = _restore_item(checkpoints, step, 'scoring')
            except ckpt_lib.CheckpointDamaged as e:
                damaged.append(e)
                continue
            break
        else:
            raise TrainingError(
                f'{damaged[0]}; no other step has a readable scoring state (steps tried: '
                f'{", ".join(str(e.step) for e in damaged)}). Rerun the same --mode=train '
                'command: it sets the damaged step aside and resumes from the newest '
                'readable one')
        for e in damaged:
            logging.warning('%s; using step %d, the newest readable step with a scoring '
                            'state (rerun --mode=train to repair the run)', e, step)
    finally:
        checkpoints.close()
    variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
    return Model(config, method, variables, scoring, int(step), predict_key(config), workdir)


_METHODS = {}


def _method_for(config):
    """One method object per distinct config, so repeated loads share compiled scorers."""
    described = {k: v for k, v in config.to_dict().items() if k != 'threshold'}
    key = json.dumps(described, sort_keys=True, default=repr)
    if key not in _METHODS:
        _METHODS[key] = get_method(config)
    return _METHODS[key]


def _restore_item(checkpoints, step, name):
    """Item `name` of `step` as host arrays.

    Shapes come from the checkpoint's own metadata, so neither the bank size
    nor the optimizer has to be rebuilt from the training data; the item is read
    onto this process's first device, whatever mesh saved it.
    """
    import orbax.checkpoint as ocp
    from etils import epath

    path = epath.Path(checkpoints.directory) / str(step) / name
    if not path.is_dir():
        raise ckpt_lib.CheckpointDamaged(checkpoints.directory, step, name, f'{path} is missing')
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    handler = ocp.StandardCheckpointHandler()  # the handler that saved the item
    ckpt_lib.quiet_abandoned_reads(collect=False)
    try:
        meta = handler.metadata(path)
        tree = getattr(meta, 'tree', meta)
        abstract = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree)
        restored = handler.restore(path, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except
        # The shapes are the checkpoint's own, so no config can mismatch here: any failure
        # (TensorStore raises bare Exception/ValueError for truncated or missing array
        # files, json/FileNotFoundError for _METADATA) is damage.
        ckpt_lib.quiet_abandoned_reads()
        raise ckpt_lib.CheckpointDamaged(checkpoints.directory, step, name,
                                         ckpt_lib.error_reason(e)) from e
    finally:
        handler.close()
    return jax.device_get(restored)


# ------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    """What to score: (name, path or uint8 array) items, and what was left out."""
    items: list
    ignored: int = 0  # files of a folder/glob without an image extension
    what: str = ''


def list_inputs(spec):
    """The images `spec` names; DataError when it names none."""
    spec = os.fspath(spec)
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
        except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as e:
            reason = f'{type(e).__name__}: {e}'
            logging.warning('skipping %s: %s', name, reason)
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


def score_inputs(model, inputs, batch_size=None, label='predict'):
    """(names, {score: (N,)}, skipped) for `inputs`, decoded and scored in padded batches."""
    batch_size = batch_size or model.config.eval.batch_size
    d = model.config.data
    skipped, names, valid = [], [], []
    progress = Progress(len(inputs.items), label=label)

    def batches():
        for batch_names, images, n in decoded_batches(inputs, d.image_size, d.channels,
                                                      batch_size, skipped, progress):
            names.extend(batch_names)
            valid.append(n)
            yield images

    scores = score_batches(model.method, model.variables, model.scoring, model.key, batches())
    if not names:
        return names, {}, skipped
    keep = np.concatenate([np.arange(n) + i * batch_size for i, n in enumerate(valid)])
    return names, {k: v[keep] for k, v in scores.items()}, skipped


# ------------------------------------------------------------------ predict


def predict(workdir, input_spec, output=None, config=None):
    """Scores `input_spec` with the run in `workdir`; writes predictions.{csv,json}.

    Returns the dict written to predictions.json.
    """
    workdir = os.fspath(workdir)
    config = config if config is not None else load_run_config(workdir)
    inputs = list_inputs(input_spec)  # a bad input fails before the model loads
    model = load_model(workdir, config)
    threshold = thresholds.resolve(config, workdir, model.score_name, model.step)
    logging.info('scoring %d images from %s with %s step %d', len(inputs.items), inputs.what,
                 workdir, model.step)
    if inputs.ignored:
        logging.info('ignored %d files without an image extension (%s)', inputs.ignored,
                     '/'.join(IMAGE_EXTENSIONS))
    names, scores, skipped = score_inputs(model, inputs)
    output = os.fspath(output) if output else os.path.join(workdir, 'predictions')
    result = write_predictions(output, names, scores, skipped, model, threshold, inputs)
    if threshold is None:
        print(f'jaxad: {thresholds.HOW_TO_GET_ONE}', flush=True)
    return result


def write_anomaly_maps(output, names, maps):
    """Hook for pixel methods: one PNG per image and map, min-max scaled per image.

    Returns {map name: [png path per image]} (ReContrast: one `map` PNG per image). The
    unscaled maps go to OUTPUT/anomaly_maps.npz (`write_predictions`).
    """
    paths = {}
    for key, values in maps.items():
        folder = os.path.join(output, key)
        os.makedirs(folder, exist_ok=True)
        paths[key] = []
        for i, (name, m) in enumerate(zip(names, values)):
            m = np.asarray(m, np.float64).reshape(m.shape[0], m.shape[1])
            span = m.max() - m.min()
            png = np.uint8(np.round(255 * (m - m.min()) / span)) if span > 0 else \
                np.zeros(m.shape, np.uint8)
            stem = os.path.splitext(os.path.basename(str(name)))[0] or 'image'
            path = os.path.join(folder, f'{i:06d}_{stem}.png')
            Image.fromarray(png).save(path)
            paths[key].append(path)
    return paths


def write_predictions(output, names, scores, skipped, model, threshold, inputs):
    image_scores, maps = eval_lib.split_maps(scores)
    headline = model.score_name
    rule = threshold['rule'] if threshold else 'none'
    flags = None
    if names and threshold is not None:
        flags = thresholds.apply(threshold, image_scores.get(threshold['score'],
                                                             image_scores[headline]))
    records = []
    for i, name in enumerate(names):
        record = {'path': name, 'pred_score': float(image_scores[headline][i]),
                  'is_anomaly': None if flags is None else bool(flags[i]),
                  'threshold_rule': rule}
        record.update({k: float(v[i]) for k, v in image_scores.items()})
        records.append(record)
    result = {
        'workdir': os.path.abspath(model.workdir), 'step': model.step,
        'input': inputs.what, 'score_name': headline, 'threshold_rule': rule,
        'threshold': threshold, 'num_images': len(records), 'num_skipped': len(skipped),
        'num_ignored_non_images': inputs.ignored, 'images': records, 'skipped': skipped}
    if threshold is None:
        result['threshold_note'] = thresholds.HOW_TO_GET_ONE
    if jax.process_index() != 0:
        return result
    os.makedirs(output, exist_ok=True)
    if maps:
        for key, paths in write_anomaly_maps(output, names, maps).items():
            for record, path in zip(records, paths):
                record[key] = path
        # The raw maps too (the PNGs are min-max scaled per image): row i is names[i].
        np.savez_compressed(os.path.join(output, 'anomaly_maps.npz'), names=np.asarray(names),
                            **{k: np.asarray(v, np.float32) for k, v in maps.items()})
        result['anomaly_maps_file'] = os.path.join(output, 'anomaly_maps.npz')
    with open(os.path.join(output, 'predictions.json'), 'w') as f:
        json.dump(result, f, indent=2)
    columns = ['path', 'pred_score', 'is_anomaly', 'threshold_rule'] + \
        [k for k in image_scores if k not in ('pred_score',)] + sorted(maps)
    with open(os.path.join(output, 'predictions.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for record in records:
            writer.writerow(['' if record.get(c) is None else record.get(c) for c in columns])
    n_flag = sum(bool(r['is_anomaly']) for r in records)
    flagged = f'{n_flag} flagged anomalous ({rule} threshold)' if threshold else 'no threshold'
    print(f'jaxad: scored {len(records)} images ({len(skipped)} skipped), {flagged}; wrote '
          f'{os.path.join(output, "predictions.csv")} and predictions.json', flush=True)
    return result


# ---------------------------------------------------------------- calibrate


def calibrate(workdir, normal_spec, anomalies_spec=None, config=None):
    """`--mode=calibrate`: threshold from user-given normal (and anomalous) images.

    Rule normal_quantile (config threshold.quantile), or f1_max with anomalies;
    a set threshold.value wins (rule fixed). Writes and returns threshold.json's record.
    """
    workdir = os.fspath(workdir)
    config = config if config is not None else load_run_config(workdir)
    normal_inputs = list_inputs(normal_spec)
    anomaly_inputs = list_inputs(anomalies_spec) if anomalies_spec else None
    model = load_model(workdir, config)
    if config.threshold.value is not None:
        record = thresholds.fixed(config.threshold.value, score_name=model.score_name,
                                  step=model.step)
    else:
        _, normal, skipped = score_inputs(model, normal_inputs, label='calibrate normal')
        if not normal:
            raise DataError(f'none of the images in {normal_inputs.what} could be read')
        anomalous = None
        if anomaly_inputs is not None:
            _, anomalous, more = score_inputs(model, anomaly_inputs, label='calibrate anomalies')
            skipped += more
            if not anomalous:
                raise DataError(f'none of the images in {anomaly_inputs.what} could be read')
            anomalous = anomalous[model.score_name]
        record = thresholds.calibrate(
            normal[model.score_name], config.threshold.quantile, anomalous,
            score_name=model.score_name, step=model.step,
            source=f'--mode=calibrate on {normal_inputs.what}'
                   + (f' and {anomaly_inputs.what}' if anomaly_inputs else ''))
        record['num_skipped'] = len(skipped)
    thresholds.save(workdir, record)
    print(f"jaxad: threshold {record['value']:.6g} on score {record['score']!r} "
          f"(rule {record['rule']}) written to {thresholds.path_in(workdir)}", flush=True)
    return record


def calibrate_after_training(setup, variables, scoring, step):
    """`train.finish`: saves the threshold of a finished run when the config asks for one.

    threshold.value set: rule fixed. threshold.holdout_fraction > 0: rule
    normal_quantile over the held-out normal training images, scored exactly as
    predict scores. Otherwise nothing (returns None).
    """
    config, name = setup.config, setup.method.headline_score
    holdout = getattr(setup, 'holdout_indices', ())
    if 'threshold' in config and config.threshold.value is not None:
        record = thresholds.fixed(config.threshold.value, score_name=name, step=step)
    elif len(holdout):
        model = Model(config, setup.method, jax.device_get(variables), jax.device_get(scoring),
                      step, predict_key(config), setup.workdir)
        images = np.stack([np.asarray(setup.train_set.images[i], np.uint8) for i in holdout])
        scores = score_array(model, images)
        fraction = config.threshold.holdout_fraction
        record = thresholds.calibrate(
            scores[name], config.threshold.quantile, score_name=name, step=step,
            source=f'{len(holdout)} held-out normal training images '
                   f'(threshold.holdout_fraction={fraction})')
        record['holdout_fraction'] = fraction
    else:
        return None
    thresholds.save(setup.workdir, record)
    return record
