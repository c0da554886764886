"""The programs a run compiles, jitted as training and evaluation jit them, on abstract inputs.

Nothing here computes or allocates: every argument is a `jax.ShapeDtypeStruct`, so a
ResNet-18 step at 512 images, a stack of ten, or a program for a GPU or TPU can be lowered
on a CPU-only machine. Used to check that every program lowers for every target platform
(tests/test_lowering.py), and to read XLA's cost and memory analyses before a device is at
hand (benchmarks/).

    prog = programs.train_step(config, image_shape=(32, 32, 3))
    prog.lower(('cuda',)).as_text()      # StableHLO for a GPU, built here
    prog.lower().compile().cost_analysis()

Each `Program` holds the jitted function (the same wrapper the trainer, the table or the
evaluator uses: shardings, donation) and its abstract arguments.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxad import evaluate as eval_lib
from jaxad import loop, optim, sharding
from jaxad.methods import StepBudget, get_method

# A schedule needs a length; shapes and the traced program do not depend on it.
DEFAULT_BUDGET = StepBudget(steps_per_epoch=10, total_steps=1000)


@dataclasses.dataclass
class Program:
    """A jitted function and the abstract arguments it is traced with (traced once, then
    lowered for as many platforms as asked)."""
    name: str
    fn: Any
    args: tuple
    _traced: Any = dataclasses.field(default=None, repr=False)

    def trace(self):
        if self._traced is None:
            self._traced = self.fn.trace(*self.args)
        return self._traced

    def lower(self, platforms=None):
        """`jax.stages.Lowered` for `platforms` (e.g. ('cuda',); None: this machine's)."""
        if platforms is None:
            return self.trace().lower()
        return self.trace().lower(lowering_platforms=tuple(platforms))


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _stack(tree, k):
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct((k,) + tuple(s.shape), s.dtype), tree)


def abstract_key():
    return jax.eval_shape(lambda: jax.random.key(0))


def abstract_batch(method, batch_size, image_shape):
    """The training batch `method` asks for (`method.inputs`): uint8 images, plus int32
    labels and uint8 outlier images where it trains with them."""
    images = jax.ShapeDtypeStruct((batch_size,) + tuple(image_shape), jnp.uint8)
    batch = {'image': images}
    if 'label' in method.inputs:
        batch['label'] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    if 'outlier' in method.inputs:
        batch['outlier'] = images
    return batch


def method_and_optimizer(config, budget=DEFAULT_BUDGET):
    """(method, tx, schedule) of `config` as a run builds them."""
    method = get_method(config, budget)
    tx, schedule = optim.make_optimizer(config.optim, budget.steps_per_epoch,
                                        budget.total_steps, config.batch_size,
                                        freeze=method.frozen_params)
    return method, tx, schedule


def on_device_batch(batch, table_rows):
    """`batch` as a run with its training images on the devices feeds it
    (`loop.DeviceInput`): int32 positions into `table_rows` uint8 images per image key."""
    images = {k: v for k, v in batch.items() if v.dtype == jnp.uint8}
    out = {k: v for k, v in batch.items() if k not in images}
    out['positions'] = {k: jax.ShapeDtypeStruct(v.shape[:1], jnp.int32)
                        for k, v in images.items()}
    out['tables'] = {k: jax.ShapeDtypeStruct((table_rows,) + v.shape[1:], jnp.uint8)
                     for k, v in images.items()}
    return out


def train_step(config, image_shape, *, stack=0, mesh=None, budget=DEFAULT_BUDGET,
               table_rows=0):
    """The train step at `config.batch_size` images: jitted as `loop.jit_train_step`, or
    with `stack` = K > 0 as a table's K-model step under vmap (`loop.jit_stacked_step`).
    `table_rows` > 0 (one detector): the step gathering its batch from that many training
    images on the devices (`data.on_device`)."""

    method, tx, schedule = method_and_optimizer(config, budget)
    init = loop.make_init_fn(method, tx, image_shape)
    step = loop.make_train_step(method, tx, schedule)
    batch = abstract_batch(method, config.batch_size, image_shape)
    key = jax.eval_shape(loop.init_key, 0)
    if not stack:
        mesh = mesh or sharding.make_mesh(1)
        state = jax.eval_shape(init, key)
        if table_rows:
            return Program('train_step_on_device',
                           loop.jit_train_step(step, mesh, on_device=True),
                           (state, on_device_batch(batch, table_rows), abstract_key()))
        return Program('train_step', loop.jit_train_step(step, mesh),
                       (state, batch, abstract_key()))
    mesh = mesh or sharding.make_mesh(1, num_models=stack)
    state = jax.eval_shape(jax.vmap(init), _stack(key, stack))
    return Program(f'train_step_stack{stack}', loop.jit_stacked_step(step, mesh, 'vmap'),
                   (state, _stack(batch, stack), _stack(abstract_key(), stack)))


def abstract_variables(method, image_shape):
    return jax.eval_shape(lambda k: method.init_variables(k, image_shape), abstract_key())


def feature_program(method, image_shape, batch_size, *, mesh=None):
    """The evaluator's feature pass (`evaluate.make_feature_fn`) over `batch_size` images."""
    mesh = mesh or sharding.make_mesh(1)
    variables = abstract_variables(method, image_shape)
    images = jax.ShapeDtypeStruct((batch_size,) + tuple(image_shape), jnp.uint8)
    indices = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return Program('features', eval_lib.make_feature_fn(method, mesh),
                   (variables, images, indices, abstract_key()))


def bank_features(method, image_shape, num_bank):
    """Abstract features of a bank of `num_bank` images (with bank labels where the method
    fits per class)."""
    variables = abstract_variables(method, image_shape)
    feats = eval_lib.feature_shapes(method, variables, image_shape, num_bank, abstract_key())
    if method.needs_bank_labels:
        feats = dict(feats, label=jax.ShapeDtypeStruct((num_bank,), jnp.int32))
    return feats


def fit_scoring_program(method, image_shape, num_bank):
    """`method.fit_scoring` on the features of `num_bank` bank images."""
    return Program('fit_scoring', jax.jit(method.fit_scoring),
                   (bank_features(method, image_shape, num_bank),))


def score_program(method, image_shape, num_bank, num_test):
    """`method.score` (the evaluator's jitted scorer) of `num_test` test images against the
    scoring state fitted on `num_bank` bank images."""
    scoring = jax.eval_shape(method.fit_scoring, bank_features(method, image_shape, num_bank))
    variables = abstract_variables(method, image_shape)
    test = eval_lib.feature_shapes(method, variables, image_shape, num_test, abstract_key())
    return Program('score', eval_lib.jit_score(method), (_abstract(scoring), test))
