"""Scoring new images from a finished run's checkpoint alone: `--mode=predict` and
`--mode=calibrate`, and the threshold a finished training run calibrates.

Three modules, one job each:
  jaxad.scoring  the score function and the restored run (`load_model`, `Model`,
                 `score_array`, `score_inputs`, `make_score_fn`: what `jaxad.export`
                 serialises);
  jaxad.inputs   what to score: `list_inputs` (folder, glob, list file, image,
                 .npz) and decoding with the training sources' image reader;
  jaxad.predict  this module: the modes and their outputs, predictions.{csv,json}
                 (`write_predictions`, pixel methods' maps `write_anomaly_maps`),
                 and threshold.json (`calibrate`, `calibrate_after_training`).

Predict and calibrate read the workdir only (config.json, the final checkpoint and,
once calibrated, threshold.json: `jaxad.thresholds`), never the training data.
"""
import csv
import io
import os

import jax
import numpy as np
from absl import logging
from PIL import Image

from jaxad import evaluate as eval_lib
from jaxad import storage, thresholds
from jaxad.config import load_run_config
from jaxad.errors import DataError
from jaxad.inputs import IMAGE_EXTENSIONS, list_inputs
from jaxad.scoring import Model, load_model, predict_key, score_array, score_inputs


# ------------------------------------------------------------------ predict


def predict(workdir, input_spec, output=None, config=None):
    """Scores `input_spec` with the run in `workdir`; writes predictions.{csv,json}.

    Returns the dict written to predictions.json.
    """
    workdir = storage.normalize(workdir)
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
    output = storage.normalize(output) if output else storage.join(workdir, 'predictions')
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
        folder = storage.join(output, key)
        storage.makedirs(folder)
        paths[key] = []
        for i, (name, m) in enumerate(zip(names, values)):
            m = np.asarray(m, np.float64).reshape(m.shape[0], m.shape[1])
            span = m.max() - m.min()
            png = np.uint8(np.round(255 * (m - m.min()) / span)) if span > 0 else \
                np.zeros(m.shape, np.uint8)
            stem = os.path.splitext(os.path.basename(str(name)))[0] or 'image'
            path = storage.join(folder, f'{i:06d}_{stem}.png')
            buffer = io.BytesIO()
            Image.fromarray(png).save(buffer, format='PNG')
            storage.write_bytes(path, buffer.getvalue())
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
        'workdir': storage.absolute(model.workdir), 'step': model.step,
        'input': inputs.what, 'score_name': headline, 'threshold_rule': rule,
        'threshold': threshold, 'num_images': len(records), 'num_skipped': len(skipped),
        'num_ignored_non_images': inputs.ignored, 'images': records, 'skipped': skipped}
    if threshold is None:
        result['threshold_note'] = thresholds.HOW_TO_GET_ONE
    if jax.process_index() != 0:
        return result
    storage.makedirs(output)
    if maps:
        for key, paths in write_anomaly_maps(output, names, maps).items():
            for record, path in zip(records, paths):
                record[key] = path
        # The raw maps too (the PNGs are min-max scaled per image): row i is names[i].
        buffer = io.BytesIO()
        np.savez_compressed(buffer, names=np.asarray(names),
                            **{k: np.asarray(v, np.float32) for k, v in maps.items()})
        result['anomaly_maps_file'] = storage.join(output, 'anomaly_maps.npz')
        storage.write_bytes(result['anomaly_maps_file'], buffer.getvalue())
    storage.write_json(storage.join(output, 'predictions.json'), result, indent=2)
    columns = ['path', 'pred_score', 'is_anomaly', 'threshold_rule'] + \
        [k for k in image_scores if k not in ('pred_score',)] + sorted(maps)
    table = io.StringIO(newline='')
    writer = csv.writer(table)
    writer.writerow(columns)
    for record in records:
        writer.writerow(['' if record.get(c) is None else record.get(c) for c in columns])
    storage.write_text(storage.join(output, 'predictions.csv'), table.getvalue())
    n_flag = sum(bool(r['is_anomaly']) for r in records)
    flagged = f'{n_flag} flagged anomalous ({rule} threshold)' if threshold else 'no threshold'
    print(f'jaxad: scored {len(records)} images ({len(skipped)} skipped), {flagged}; wrote '
          f'{storage.join(output, "predictions.csv")} and predictions.json', flush=True)
    return result


# ---------------------------------------------------------------- calibrate


def calibrate(workdir, normal_spec, anomalies_spec=None, config=None):
    """`--mode=calibrate`: threshold from user-given normal (and anomalous) images.

    Rule normal_quantile (config threshold.quantile), or f1_max with anomalies;
    a set threshold.value wins (rule fixed). Writes and returns threshold.json's record.
    """
    workdir = storage.normalize(workdir)
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


def calibrate_after_training(config, method, workdir, variables, scoring, step, *,
                             train_images, holdout_indices):
    """Saves the threshold of a single run just finished, when the config asks for one
    (called by `jaxad.train.Setup.after_final_save`).

    threshold.value set: rule fixed. threshold.holdout_fraction > 0: rule
    normal_quantile over the held-out normal training images (`train_images` at
    `holdout_indices`, empty when threshold.holdout_fraction is 0), scored exactly as
    predict scores. Otherwise nothing (returns None).
    """
    name = method.headline_score
    holdout = holdout_indices
    if 'threshold' in config and config.threshold.value is not None:
        record = thresholds.fixed(config.threshold.value, score_name=name, step=step)
    elif len(holdout):
        model = Model(config, method, jax.device_get(variables), jax.device_get(scoring),
                      step, predict_key(config), workdir)
        images = np.stack([np.asarray(train_images[i], np.uint8) for i in holdout])
        scores = score_array(model, images)
        fraction = config.threshold.holdout_fraction
        record = thresholds.calibrate(
            scores[name], config.threshold.quantile, score_name=name, step=step,
            source=f'{len(holdout)} held-out normal training images '
                   f'(threshold.holdout_fraction={fraction})')
        record['holdout_fraction'] = fraction
    else:
        return None
    thresholds.save(workdir, record)
    return record
