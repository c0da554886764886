"""The scoring program of a finished run: the one score function and the model it closes over.

Everything scoring needs is in the workdir: `config.json` (model, image size,
channels, test-time augmentation) and the final checkpoint (model variables and
the method's scoring state: feature bank and weights). No training data is read.
`load_model(workdir)` restores them into a `Model`.

One function scores: `score_images(method, variables, scoring, key, images)`,
uint8 (B, H, W, C) -> {score name: (B,)}. Every image is scored with the same
test-time augmentation draws whatever its position or batch (`indices` are all
0 under the fixed key `predict_key(config)`), so an image's score depends on
the image alone. `make_score_fn` closes it over a model; `jaxad.export`
serialises exactly that closure; predict and calibration (`jaxad.predict`) run
the same function jitted with the variables as arguments (`score_batches`,
`score_array`, `score_inputs`: one compile per method and batch shape, no
model-sized constants in the program).

The method object is read through `jaxad.methods.base.Method`'s members only
(`features`, `score`, `headline_score`).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxad import checkpoint as ckpt_lib
from jaxad import evaluate as eval_lib
from jaxad import fingerprint, reuse, storage
from jaxad import inputs as inputs_lib
from jaxad.config import load_run_config
from jaxad.errors import ConfigError, TrainingError
from jaxad.inputs import pad_batch
from jaxad.writers import Progress


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


def score_array(model, images, batch_size=None):
    """Scores of a uint8 (N, H, W, C) array at the model's size, in fixed padded batches."""
    images = np.asarray(images)
    batch_size = batch_size or model.config.eval.batch_size
    n = len(images)
    batches = (pad_batch(images[s:s + batch_size], batch_size) for s in range(0, n, batch_size))
    scores = score_batches(model.method, model.variables, model.scoring, model.key, batches)
    return {k: v[:n] for k, v in scores.items()}


def score_inputs(model, inputs, batch_size=None, label='predict'):
    """(names, {score: (N,)}, skipped) for `jaxad.inputs.list_inputs`' `inputs`, decoded
    and scored in padded batches."""
    batch_size = batch_size or model.config.eval.batch_size
    d = model.config.data
    skipped, names, valid = [], [], []
    progress = Progress(len(inputs.items), label=label)

    def batches():
        for batch_names, images, n in inputs_lib.decoded_batches(
                inputs, d.image_size, d.channels, batch_size, skipped, progress):
            names.extend(batch_names)
            valid.append(n)
            yield images

    scores = score_batches(model.method, model.variables, model.scoring, model.key, batches())
    if not names:
        return names, {}, skipped
    keep = np.concatenate([np.arange(n) + i * batch_size for i, n in enumerate(valid)])
    return names, {k: v[keep] for k, v in scores.items()}, skipped


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
    workdir = storage.normalize(workdir)
    storage.check_url(workdir, write=False)
    config = config if config is not None else load_run_config(workdir)
    fingerprint.check_scoring_use(config, workdir)  # the checkpoint's scoring state as saved
    if config.table.classes:
        raise ConfigError(f'workdir {workdir} holds a one-class table (table.classes='
                          f'{config.table.classes!r}); predict, calibrate and export score a '
                          'single detector')
    method = _method_for(config)
    directory = storage.join(workdir, 'checkpoints')
    if not storage.isdir(directory):
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
                # Shapes from the items' own metadata (no bank size or optimizer rebuilt),
                # read onto this process's first device whatever mesh saved them.
                state = jax.device_get(checkpoints.restore(step, 'state'))
                scoring = jax.device_get(checkpoints.restore(step, 'scoring'))
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


def _method_for(config):
    """One method object per distinct config (`jaxad.reuse`; the threshold settings do not
    change the method), so repeated loads share compiled scorers."""
    return reuse.method(config, ignore=('threshold',))
