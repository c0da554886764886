"""A self-contained scoring artifact: `jax.export` StableHLO of predict's score function.

`--mode=export --workdir=DIR [--output=OUT]` (default OUT = DIR/export) writes

  score_fn.jax_export  the serialized `jax.export.Exported` of
                       `jaxad.scoring.make_score_fn(...)`: uint8 (B, H, W, C) ->
                       {score name: (B,) float32}. The model variables, the
                       scoring state (feature bank, weights) and the test-time
                       augmentation key are constants inside it; uint8 -> float
                       conversion and the test-time augmentations run inside it.
                       B is symbolic when the method allows it (any batch size),
                       else fixed (`input.batch` in the meta; the loader pads).
                       Lowered for `export.platforms` (default cpu,cuda,tpu: one
                       module that a CPU, GPU or TPU host loads; it is made here
                       on any machine, `model.conv_impl='auto'` resolving per
                       platform). A platform it cannot lower for is an error.
  export_meta.json     input shape/dtype, channels, image size and how host-side
                       decoding/resizing is done, score names, the headline score,
                       the threshold (rule, value) and jaxad/jax versions.

`load(OUT)` needs jax and NumPy only (plus Pillow for `score_files`, and
flatbuffers for jax.export's deserialization), not the packages of training
(Flax, Orbax, Optax, Grain, ml_collections, absl, tensorflow_datasets): only
`export_run`/`export_model` import them (tests/test_export.py checks this).
`load(OUT).score(images)` gives the scores, `.predict(images)` adds `pred_score`,
`is_anomaly` (pred_score >= threshold value) and `threshold_rule`. Images must
already be image_size x image_size with the run's channels;
`score_files(spec)` decodes and resizes files exactly as `--mode=predict` does.
"""
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxad import storage
from jaxad.errors import ConfigError, DataError, JaxadError

ARTIFACT = 'score_fn.jax_export'
META = 'export_meta.json'
FORMAT_VERSION = 1
PLATFORMS = ('cpu', 'cuda', 'tpu')
_BATCH_HINT = 64  # the loader's chunk for a symbolic batch


def _check_serialization():
    """jax.export's serialization needs the small `flatbuffers` package."""
    if importlib.util.find_spec('flatbuffers') is None:
        raise JaxadError('exporting and loading need the flatbuffers package (jax.export '
                         'serialization): pip install flatbuffers')


def parse_platforms(value):
    """`export.platforms` ('cpu,cuda,tpu' or a sequence) -> a tuple of known platforms."""
    items = value.split(',') if isinstance(value, str) else list(value)
    platforms = tuple(p.strip().lower() for p in items if p.strip())
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise ConfigError(f'export.platforms={value!r}: choose one or more of '
                          f'{",".join(PLATFORMS)} (comma-separated)')
    return tuple(dict.fromkeys(platforms))


def _export(fn, image_shape, fixed_batch, platforms):
    """(Exported, fixed batch or None) for `platforms`: a symbolic batch if the function
    allows it, else `fixed_batch`. Every platform asked for is in the artifact or this
    raises, naming the platform that failed."""
    jitted = jax.jit(fn)
    from absl import logging

    (b,) = jax.export.symbolic_shape('b')
    symbolic_error = None
    for batch in (b, fixed_batch):
        spec = jax.ShapeDtypeStruct((batch,) + tuple(image_shape), jnp.uint8)
        try:
            exported = jax.export.export(jitted, platforms=platforms)(spec)
            return exported, (None if batch is b else int(batch))
        except Exception as e:  # noqa: BLE001 shape polymorphism or a platform's lowering
            if batch is b:
                symbolic_error = e
                logging.info('symbolic-batch export failed (%s: %s); trying batch %d',
                             type(e).__name__, e, fixed_batch)
                continue
            failed = []
            for platform in platforms:  # which platform is it?
                try:
                    jax.export.export(jitted, platforms=(platform,))(spec)
                except Exception as one:  # noqa: BLE001
                    failed.append(f'{platform}: {type(one).__name__}: {one}')
            where = ('; '.join(failed) if failed else
                     f'{type(e).__name__}: {e} (symbolic batch: {symbolic_error})')
            raise JaxadError(f'cannot export the score function for platforms '
                             f'{",".join(platforms)}: {where}. Set --config.export.platforms '
                             'to the platforms it should run on.') from e


def export_model(model, output, threshold=None):
    """Writes the artifact of a `jaxad.scoring.Model` to `output`; returns the meta dict."""
    import jaxad
    from jaxad.data import images as image_files

    _check_serialization()
    config = model.config
    image_shape = model.image_shape
    platforms = parse_platforms(config.get('export', {}).get('platforms', ','.join(PLATFORMS)))
    exported, batch = _export(model.score_fn(), image_shape, config.eval.batch_size, platforms)
    score_names = sorted(exported.out_tree.unflatten(list(range(exported.out_tree.num_leaves))))
    meta = {
        'format': 'jaxad.export', 'format_version': FORMAT_VERSION, 'artifact': ARTIFACT,
        'input': {'shape': ['b' if batch is None else batch] + list(image_shape),
                  'dtype': 'uint8', 'layout': 'NHWC', 'batch': batch,
                  'value_range': '0..255 (uint8); converted to float inside the artifact'},
        'image_size': int(config.data.image_size), 'channels': int(config.data.channels),
        'color_mode': image_files.PIL_MODES[int(config.data.channels)],
        'host_preprocessing': ('decode with Pillow, convert to color_mode, resize to '
                               'image_size x image_size with Pillow BILINEAR when the size '
                               'differs (jaxad.inputs.load_image)'),
        'score_names': score_names, 'headline_score': model.score_name,
        'higher_is_more_anomalous': True,
        'threshold': threshold, 'threshold_rule': threshold['rule'] if threshold else 'none',
        'threshold_value': threshold['value'] if threshold else None,
        'is_anomaly': 'pred_score >= threshold_value',
        'method': config.method, 'step': model.step, 'seed': int(config.seed),
        'test_time_augmentation': {'num_samples': int(config.eval.num_samples),
                                   'crop_scale': float(config.eval.crop_scale),
                                   'key': 'jaxad.evaluate.eval_test_key(seed), index 0 for '
                                          'every image'},
        'platforms': list(exported.platforms),
        'workdir': storage.absolute(model.workdir),
        'jaxad_version': jaxad.__version__, 'jax_version': jax.__version__,
    }
    if jax.process_index() == 0:
        storage.makedirs(output)
        storage.write_bytes(storage.join(output, ARTIFACT), exported.serialize())
        storage.write_json(storage.join(output, META), meta, indent=2)
        print(f"jaxad: exported {model.workdir} step {model.step} to {output} "
              f"(batch {'symbolic' if batch is None else batch}, platforms "
              f"{', '.join(meta['platforms'])}, threshold rule {meta['threshold_rule']})",
              flush=True)
    return meta


def export_run(workdir, output=None, config=None):
    """`--mode=export`: the artifact of the run in `workdir` (default output workdir/export)."""
    from jaxad import scoring, thresholds

    model = scoring.load_model(workdir, config)
    threshold = thresholds.resolve(model.config, workdir, model.score_name, model.step)
    output = storage.normalize(output) if output else storage.join(workdir, 'export')
    return export_model(model, output, threshold)


class ScoringArtifact:
    """A loaded artifact: `score(images)`, `predict(images)`, `score_files(spec)`."""

    def __init__(self, directory):
        directory = storage.normalize(directory)
        meta_path = storage.join(directory, META)
        if not storage.isfile(meta_path):
            raise DataError(f'{directory} is not a jaxad export (no {META}); write one with '
                            '--mode=export')
        _check_serialization()
        self.meta = json.loads(storage.read_text(meta_path))
        self.exported = jax.export.deserialize(bytearray(storage.read_bytes(
            storage.join(directory, self.meta.get('artifact', ARTIFACT)))))
        self.directory = directory
        self.image_shape = tuple(self.meta['input']['shape'][1:])
        self.batch = self.meta['input']['batch']
        self.headline_score = self.meta['headline_score']
        self.threshold = self.meta['threshold']
        self._call = jax.jit(self.exported.call)

    def _check(self, images):
        images = np.asarray(images)
        if images.ndim == 3 and self.image_shape[-1] == 1:
            images = images[..., None]
        if images.ndim != 4 or images.shape[1:] != self.image_shape:
            raise DataError(f'images of shape {images.shape}; this artifact scores uint8 '
                            f'(N,) + {self.image_shape} (decode and resize files with '
                            'score_files)')
        if images.dtype != np.uint8:
            raise DataError(f'images must be uint8 (0..255), got {images.dtype}')
        return images

    def score(self, images, batch_size=None):
        """{score name: (N,) float32} for uint8 images (N, H, W, C) at the artifact's size."""
        images = self._check(images)
        chunk = self.batch or batch_size or _BATCH_HINT
        out = []
        for start in range(0, len(images), chunk):
            part = images[start:start + chunk]
            n = len(part)
            if n < chunk:  # one compiled shape
                part = np.concatenate([part, np.repeat(part[:1], chunk - n, axis=0)])
            out.append({k: np.asarray(v)[:n] for k, v in self._call(part).items()})
        if not out:
            return {name: np.zeros((0,), np.float32) for name in self.meta['score_names']}
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]}

    def predict(self, images, batch_size=None):
        """Scores plus pred_score, is_anomaly (None without a threshold) and threshold_rule."""
        scores = self.score(images, batch_size)
        pred = scores[self.headline_score]
        flags = None if self.threshold is None else pred >= self.threshold['value']
        return dict(scores, pred_score=pred, is_anomaly=flags,
                    threshold_rule=self.meta['threshold_rule'])

    def score_files(self, spec, batch_size=None):
        """(names, scores, skipped) for files named like --input, decoded as predict does."""
        from jaxad import inputs as inputs_lib
        size, channels = self.meta['image_size'], self.meta['channels']
        inputs = inputs_lib.list_inputs(spec)
        skipped, names, arrays = [], [], []
        for batch_names, images, n in inputs_lib.decoded_batches(
                inputs, size, channels, len(inputs.items), skipped):
            names.extend(batch_names)
            arrays.append(images[:n])
        if not names:
            return names, {}, skipped
        return names, self.score(np.concatenate(arrays), batch_size), skipped


def load(directory):
    """The artifact written by `--mode=export` / `export_model` in `directory`."""
    return ScoringArtifact(directory)
