"""The shared trainer: `train_and_evaluate(config, workdir)`.

Order of work: validate the config, load and check the data (every input
error surfaces here, before any compile), build mesh/model/optimizer, resume
from the latest checkpoint if there is one, train with a jitted donated step,
then fit the scoring state on the normal training images, save it with the
final checkpoint and evaluate on the test split.
"""
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxad import checkpoint as ckpt_lib
from jaxad import evaluate as eval_lib
from jaxad import fingerprint, optim, predict, sharding, thresholds
from jaxad.config import validate_config
from jaxad.data import pipeline, sources
from jaxad.errors import ConfigError, DataError, TrainingError
from jaxad.methods import get_method
from jaxad.writers import MetricWriter, Progress


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    # Method constants fixed before the first step and never trained (MSC's centre of the
    # initial features): part of the state so the step stays a pure function and
    # checkpoints carry them. {} for methods without any.
    consts: dict


def make_train_step(method, tx, schedule, steps_per_epoch):
    """A pure `(state, batch, rng) -> (state, metrics)` step.

    A method with `needs_step` also finds the update count in `batch['step']`; its
    `configure(steps_per_epoch)` is called first, so schedules given in epochs (OECL's
    outlier-exposure warm-up) become step counts.

    `rng` is the run's base key; the step folds in `state.step`, so a resumed
    run draws exactly the augmentations an uninterrupted one would.
    """
    if hasattr(method, 'configure'):
        method.configure(steps_per_epoch)  # step-based schedules inside the loss (OECL's alpha)
    needs_step = getattr(method, 'needs_step', False)

    def train_step(state, batch, rng):
        key = jax.random.fold_in(rng, state.step)
        if needs_step:
            batch = dict(batch, step=state.step)
        grad_fn = jax.value_and_grad(method.loss, has_aux=True)
        (_, (metrics, batch_stats)), grads = grad_fn(state.params, state.batch_stats,
                                                     state.consts, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                             opt_state=opt_state), metrics
    return train_step


def jit_train_step(train_step, mesh):
    """The step jitted on `mesh`, traced with the mesh as ambient context so that explicit
    collectives (the chunked NT-Xent's `shard_map`) find its axes."""
    repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh)

    def step_on_mesh(state, batch, rng):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return train_step(state, batch, rng)
    return jax.jit(step_on_mesh, donate_argnums=(0,),
                   in_shardings=(repl, data, repl), out_shardings=(repl, repl))


def make_init_fn(method, tx, image_shape):
    """key -> initial TrainState (pure, so a stack is `jax.vmap` of it).

    A method with `fit_consts` gets zero constants of the right shapes here; `init_consts`
    fills them from the data before the first step.
    """
    def init(key):
        variables = method.init_variables(key, image_shape)
        consts = {}
        if hasattr(method, 'fit_consts'):
            shapes = jax.eval_shape(method.fit_consts, eval_lib.feature_shapes(
                method, variables, image_shape, 1, jax.random.key(0)))
            consts = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return TrainState(jnp.zeros((), jnp.int32), variables['params'],
                          variables['batch_stats'], tx.init(variables['params']), consts)
    return init


def init_consts(method, state, train_set, indices, config, mesh):
    """`state` with the method's constants computed from its *initial* model on the normal
    training images (MSC: the centre of the pretrained features, §3.1); unchanged for
    methods without constants. Called once, before step 1, never on resume."""
    if not hasattr(method, 'fit_consts'):
        return state
    logging.info('computing the method constants from the initial model on %d images',
                 len(indices))
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    feats = eval_lib.extract_features(method, variables, train_set, indices,
                                      batch_size=config.eval.batch_size, mesh=mesh,
                                      key=eval_lib.eval_bank_key(config.seed),
                                      label='initial features')
    consts = jax.device_put(jax.jit(method.fit_consts)(feats), sharding.replicated(mesh))
    return state.replace(consts=consts)


def outlier_source(config, train_set, normal_indices, normal_classes, auxiliary=None):
    """(image set, indices) of the outlier-exposure stream (`oe.source`), or None.

    'normal': the normal images again, independently shuffled (self-OECL rotates them);
    'other_classes': the training images of every non-normal class (this leaks the test
    anomalies' classes into training: for outlier-exposure studies, not the one-class
    protocol); any data source: `auxiliary`, loaded once by `load_auxiliary_outliers`.
    """
    source = config.oe.source
    if not source:
        return None
    if source == 'normal':
        return train_set, normal_indices
    if source == 'other_classes':
        others = np.flatnonzero(~np.isin(train_set.labels, normal_classes))
        if not len(others):
            raise DataError(f'oe.source=other_classes: {train_set.name} has no images outside '
                            f'the normal classes {list(normal_classes)}')
        return train_set, limit_outliers(config, others)
    return auxiliary, limit_outliers(config, np.arange(len(auxiliary)))


def limit_outliers(config, indices):
    """`indices` cut to a seeded subset of `oe.max_images` (0 = all; the few-anomaly protocol,
    AnoMem). The subset (seed = config.seed, sorted) is repeated to at least one global batch,
    each outlier equally often, since the outlier stream reads whole batches."""
    max_images = int(config.oe.get('max_images', 0))
    if max_images < 0:
        raise ConfigError(f'oe.max_images must be >= 0 (0 = all), got {max_images}')
    if not max_images or max_images >= len(indices):
        return indices
    subset = np.sort(np.random.default_rng(config.seed).choice(indices, max_images,
                                                                 replace=False))
    return np.tile(subset, -(-config.batch_size // max_images))


def load_auxiliary_outliers(method, config, image_shape):
    """The outlier-exposure data set when `oe.source` names a data source, else None."""
    if 'outlier' not in getattr(method, 'inputs', ()):
        return None
    if not config.oe.source:
        raise ConfigError(f'method {config.method!r} trains with outlier exposure: set '
                          'oe.source (normal, other_classes, or a data source such as folder)')
    if config.oe.source in ('normal', 'other_classes'):
        return None
    return sources.load_auxiliary(config.oe, 'train', image_shape, 'outlier exposure')


def init_state(method, tx, key, image_shape, mesh):
    """Initial TrainState, created directly replicated on the mesh."""
    return jax.jit(make_init_fn(method, tx, image_shape),
                   out_shardings=sharding.replicated(mesh))(key)


def init_key(seed):
    """The params init key of a run with `seed` (single and stacked runs alike)."""
    return jax.random.fold_in(jax.random.key(seed), 0)


def step_budget(config, num_normal, what):
    """(steps_per_epoch, total_steps) for `num_normal` normal training images."""
    steps_per_epoch = num_normal // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f'batch_size={config.batch_size} is larger than the {num_normal} '
                          f'normal training images of {what}')
    total = config.total_steps if config.total_steps > 0 else config.optim.epochs * steps_per_epoch
    return steps_per_epoch, total


class Setup:
    """Everything a run needs that does not depend on the train state."""

    def __init__(self, config, workdir):
        validate_config(config)
        self.config, self.workdir = config, workdir
        self.method = get_method(config)
        data = config.data
        self.train_set = sources.load_split(data, 'train')
        self.test_set = sources.with_ood(sources.load_split(data, 'test'), config.eval.ood)
        self.normal_classes = [int(c) for c in data.normal_classes]
        num_classes = len(self.train_set.class_names)
        self.normal_indices = sources.one_class_indices(
            self.train_set.labels, self.normal_classes, num_classes, self.train_set.name)
        # threshold.holdout_fraction > 0: kept out of training and the scoring bank,
        # calibrates the decision threshold in `finish` (jaxad.thresholds).
        self.normal_indices, self.holdout_indices = thresholds.holdout_split(
            self.normal_indices, thresholds.holdout_fraction(config), config.seed)
        sources.one_class_indices(self.test_set.labels, self.normal_classes, num_classes,
                                  self.test_set.name)
        sources.check_has_anomalies(self.test_set, self.normal_classes)
        self.image_shape = check_image_shape(self.train_set, data)
        check_image_shape(self.test_set, data)
        self.mesh = sharding.make_mesh(config.num_devices)
        sharding.check_batch_divides(config.batch_size, self.mesh)
        self.steps_per_epoch, self.total_steps = step_budget(
            config, len(self.normal_indices), f'class(es) {self.normal_classes}')
        self.tx, self.schedule = optim.make_optimizer(
            config.optim, self.steps_per_epoch, self.total_steps, config.batch_size,
            freeze=getattr(self.method, 'frozen_params', ()))
        self.checkpoints = ckpt_lib.Checkpoints(
            os.path.join(workdir, 'checkpoints'), max_to_keep=config.checkpoint.max_to_keep,
            use_async=config.checkpoint.use_async)
        self.rng = jax.random.key(config.seed)
        self.outlier_set = load_auxiliary_outliers(self.method, config, self.image_shape)

    def train_batches(self, start_step):
        """The method's training batches from `start_step` (`pipeline.method_train_iterator`)."""
        config = self.config
        return pipeline.method_train_iterator(
            getattr(self.method, 'inputs', ()), self.train_set, self.normal_indices,
            self.normal_classes, global_batch_size=config.batch_size, seed=config.seed,
            outliers=outlier_source(config, self.train_set, self.normal_indices,
                                    self.normal_classes, self.outlier_set),
            start_step=start_step, process_index=jax.process_index(),
            process_count=jax.process_count())

    def initial_state(self):
        return init_state(self.method, self.tx, init_key(self.config.seed), self.image_shape,
                          self.mesh)

    def restore_latest(self):
        """(state, step) from the latest checkpoint, or a fresh state and 0."""
        state = self.initial_state()
        # A damaged newest step is set aside and the newest readable one used
        # (`Checkpoints.restore_newest`); a config mismatch is an error.
        restored = self.checkpoints.restore_newest(ckpt_lib.abstract_like(state),
                                                   using='using')
        if restored is None:
            return init_consts(self.method, state, self.train_set, self.normal_indices,
                               self.config, self.mesh), 0
        state, step = restored
        logging.info('resuming from %s step %d', self.checkpoints.directory, step)
        return state, step


def check_image_shape(image_set, data_cfg):
    """(H, W, C) of the set; DataError unless it is data.image_size / data.channels."""
    shape = tuple(int(d) for d in np.shape(image_set.images[0]))
    want = (data_cfg.image_size, data_cfg.image_size, data_cfg.channels)
    if shape != want:
        raise DataError(f'{image_set.name}: images are {shape[0]}x{shape[1]}x{shape[2]} (HxWxC) '
                        f'but the config expects {want[0]}x{want[1]}x{want[2]} '
                        '(data.image_size, data.channels)')
    return shape


def write_config(config, workdir):
    """config.json and fingerprint.json of `config` in `workdir` (jaxad.fingerprint)."""
    fingerprint.write_run_record(config, workdir)


def log_and_save_flags(step, total_steps, config):
    """(log this step?, save a periodic checkpoint now?); the final save is the caller's."""
    is_log = step % config.log_every == 0 or step == total_steps
    is_save = step % config.checkpoint.every_steps == 0 and step < total_steps
    return is_log, is_save


def batch_geometry(config, mesh, schedule, steps_per_epoch):
    """What a scaling study needs to know about a run's batch, logged once and per line."""
    per_device = config.batch_size // sharding.data_size(mesh)
    geometry = dict(global_batch=config.batch_size, per_device_batch=per_device,
                    data_devices=sharding.data_size(mesh), process_count=jax.process_count())
    lr = f'base lr {config.optim.lr:g} -> {float(schedule(0)):g} at step 0'
    if 'warmup' in config.optim.schedule:  # the other schedules have no warm-up
        warm = optim.warmup_steps(config.optim, steps_per_epoch)
        lr += f', {float(schedule(warm)):g} after warm-up'
    logging.info('global batch %d images = %d per device x %d devices (%d processes); '
                 'lr rule %s: %s', config.batch_size, per_device, geometry['data_devices'],
                 geometry['process_count'], config.optim.lr_rule, lr)
    return geometry


def check_finite(step, metrics, last_saved):
    bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
    if bad:
        raise TrainingError(
            f'non-finite training metrics at step {step}: {bad}. Stopping; the last good '
            f'checkpoint is step {last_saved} (lower optim.lr or check the data).')


def train(setup, state, start_step):
    """The training loop from `start_step` to `setup.total_steps`."""
    config, mesh = setup.config, setup.mesh
    step_fn = jit_train_step(make_train_step(setup.method, setup.tx, setup.schedule,
                                             setup.steps_per_epoch), mesh)
    batches = setup.train_batches(start_step)
    writer = MetricWriter(setup.workdir, tensorboard=config.get('tensorboard', False))
    progress = Progress(setup.total_steps, first=start_step)
    logging.info('training %d steps (%d per epoch)', setup.total_steps, setup.steps_per_epoch)
    geometry = batch_geometry(config, mesh, setup.schedule, setup.steps_per_epoch)
    last_saved, t_last, step_last = start_step, time.time(), start_step
    for step in range(start_step + 1, setup.total_steps + 1):
        batch = sharding.to_global(next(batches), mesh)
        state, metrics = step_fn(state, batch, setup.rng)
        is_log, is_save = log_and_save_flags(step, setup.total_steps, config)
        if is_log or is_save:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            check_finite(step, metrics, last_saved)
        if is_log:
            dt = time.time() - t_last
            rate = (step - step_last) / max(dt, 1e-9)
            metrics.update(steps_per_sec=rate, images_per_sec=rate * config.batch_size,
                           epoch=step / setup.steps_per_epoch, **geometry)
            writer.write(step, metrics)
            progress.update(step, loss=metrics['loss'], lr=metrics['lr'],
                            img_s=round(metrics['images_per_sec'], 1))
            t_last, step_last = time.time(), step
        if is_save:
            setup.checkpoints.save(step, state)
            last_saved = step
    return state


def finish(setup, state, extra=None):
    """Fits the scoring state, saves the final checkpoint, evaluates."""
    config = setup.config
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    scoring = eval_lib.fit_scoring(setup.method, variables, setup.train_set,
                                   setup.normal_indices, config=config, mesh=setup.mesh)
    step = int(state.step)
    setup.checkpoints.save(step, state, scoring=scoring)
    setup.checkpoints.wait()
    # config.json and the scoring settings now describe the saved scoring state.
    fingerprint.write_run_record(config, setup.workdir)
    fingerprint.write_scoring_settings(config, setup.workdir)
    threshold = predict.calibrate_after_training(setup, variables, scoring, step)
    extra = dict(extra or {}, **({'threshold': threshold} if threshold else {}))
    return eval_lib.evaluate(setup.method, variables, scoring, setup.test_set,
                             setup.normal_classes, config=config, mesh=setup.mesh,
                             workdir=setup.workdir, extra=dict(step=step, **extra))


def train_and_evaluate(config, workdir):
    """Trains (or resumes) the configured detector and evaluates it.

    A workdir whose checkpoints another training config made is refused first
    (`jaxad.fingerprint`). Rerunning a finished run trains nothing and rescores from its
    checkpoint (refitting the scoring state when the scoring settings changed). Returns
    the results dict also written to `workdir/results.json`. With `table.classes` set
    this trains the one-class table (`jaxad.table`).
    """
    workdir = os.fspath(workdir)
    fingerprint.check_workdir(config, workdir)  # before any data is read or compiled
    if config.table.classes:
        from jaxad import table
        return table.train_table(config, workdir)
    t0 = time.time()
    start_record(config, workdir)
    setup = Setup(config, workdir)
    try:
        state, start = setup.restore_latest()
        if start >= setup.total_steps and setup.checkpoints.has_scoring(start):
            logging.info('run already finished at step %d; evaluating only', start)
            return _evaluate_finished(setup, state, start)
        state = train(setup, state, start)
        return finish(setup, state, extra=dict(train_seconds=round(time.time() - t0, 2)))
    finally:
        setup.checkpoints.close()


def start_record(config, workdir):
    """Creates `workdir` and, when it holds no checkpoint yet, records the run's config
    and training fingerprint there (an existing run's record was checked, not rewritten)."""
    try:
        os.makedirs(workdir, exist_ok=True)
        if not fingerprint.has_checkpoints(workdir):
            fingerprint.write_run_record(config, workdir)
    except OSError as e:
        raise TrainingError(f'cannot write to workdir {workdir}: {e}') from e


def evaluate_checkpoint(config, workdir):
    """`--mode=eval`: scores the test split from the latest checkpoint, no training."""
    workdir = os.fspath(workdir)
    fingerprint.check_workdir(config, workdir)
    if config.table.classes:
        from jaxad import table
        return table.evaluate_table(config, workdir)
    setup = Setup(config, workdir)
    try:
        state, step = setup.restore_latest()
        if step == 0:
            raise TrainingError(f'no checkpoint in {setup.checkpoints.directory}; '
                                'train first (--mode=train)')
        return _evaluate_finished(setup, state, step)
    finally:
        setup.checkpoints.close()


def _evaluate_finished(setup, state, step):
    """Evaluates a restored state: with its saved scoring state, or, when this config's
    scoring fields differ from those it was fitted with, a scoring state refitted now
    (results.json names the changes; the saved one is kept)."""
    changes = []
    if setup.checkpoints.has_scoring(step):
        changes = fingerprint.scoring_changes(setup.config, setup.workdir, setup.workdir)
    if not changes:
        return _evaluate_saved(setup, state, step)
    logging.warning('scoring settings differ from those of the saved scoring state (%s): '
                    'refitting it on the training images; the checkpoint keeps the saved '
                    'one', '; '.join(changes))
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    scoring = eval_lib.fit_scoring(setup.method, variables, setup.train_set,
                                   setup.normal_indices, config=setup.config, mesh=setup.mesh)
    return eval_lib.evaluate(setup.method, variables, scoring, setup.test_set,
                             setup.normal_classes, config=setup.config, mesh=setup.mesh,
                             workdir=setup.workdir,
                             extra=dict(step=step, scoring_state='refitted', scoring_changes=changes))


def _evaluate_saved(setup, state, step):
    """Evaluates a restored state, with its saved scoring state when it has one."""
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    if setup.checkpoints.has_scoring(step):
        abstract = scoring_shapes(setup.method, variables, setup.image_shape,
                                  len(setup.normal_indices), setup.rng)
        # Damaged: the step is set aside, its scoring state refitted from `state` (exactly
        # what `finish` fitted) and the step saved again.
        scoring = setup.checkpoints.restore_or_refit_scoring(
            step, state, abstract, lambda: eval_lib.fit_scoring(
                setup.method, variables, setup.train_set, setup.normal_indices,
                config=setup.config, mesh=setup.mesh))
    else:
        logging.info('checkpoint step %d has no scoring state; computing it', step)
        scoring = eval_lib.fit_scoring(setup.method, variables, setup.train_set,
                                       setup.normal_indices, config=setup.config, mesh=setup.mesh)
    return eval_lib.evaluate(setup.method, variables, scoring, setup.test_set,
                             setup.normal_classes, config=setup.config, mesh=setup.mesh,
                             workdir=setup.workdir, extra=dict(step=step))


def scoring_shapes(method, variables, image_shape, num_bank, rng):
    """Abstract scoring state for a bank of `num_bank` images (no compute)."""
    bank = eval_lib.feature_shapes(method, variables, image_shape, num_bank, rng)
    if 'label' in getattr(method, 'inputs', ()):
        bank = dict(bank, label=jax.ShapeDtypeStruct((num_bank,), jnp.int32))
    return jax.eval_shape(method.fit_scoring, bank)
