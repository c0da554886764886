"""The one training loop, and everything single runs and one-class tables share.

A `Run` is one training program with its own checkpoint directory: a single detector
(`jaxad.train.Setup`, in WORKDIR) or a stack of K detectors whose state carries a leading
model axis (`jaxad.table.Group`, in WORKDIR/groups/<classes>). A subclass says how its
state is initialised and sharded, how its step is jitted (`jit_train_step` or
`jit_stacked_step`, both here), where its batches come from and how per-detector pieces
(features, constants, scoring states, results) map onto its layout; `Run` builds the
method (for the run's `StepBudget`), optimizer and checkpoints, restores (abstract state
from `jax.eval_shape`: no initial state is built to restore into), fits the method
constants, trains, logs, saves, and fits, restores or refits the scoring state the same
way for both (`jaxad.train` drives a list of them).

Also here: TrainState, the pure step (`make_train_step`) and its jitted forms, the init
function, input checks, log/save cadence and the outlier-exposure stream.
"""
import abc
import functools
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxad import checkpoint as ckpt_lib
from jaxad import distributed, fingerprint, optim, preemption, reuse, sharding, stacking
from jaxad import storage
from jaxad import evaluate as eval_lib
from jaxad.config import ON_DEVICE_SETTINGS
from jaxad.data import pipeline, sources
from jaxad.errors import ConfigError, DataError, TrainingError
from jaxad.writers import MetricWriter


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    # Method constants fixed before the first step and never trained (MSC's centre of the
    # initial features): part of the state so the step stays a pure function and
    # checkpoints carry them. {} for methods without any (`method.uses_consts` False).
    consts: dict


# Cached: runs with equal settings share the method and optimizer (`jaxad.reuse`), so they
# get the same step function and the same jitted step below, traced once per process.
@functools.lru_cache(maxsize=reuse.MAX_KEPT)
def make_train_step(method, tx, schedule):
    """A pure `(state, batch, rng) -> (state, metrics)` step.

    A method with `needs_step` also finds the update count in `batch['step']` (schedules
    given in epochs were turned into steps by the method's own `StepBudget`).

    `rng` is the run's base key; the step folds in `state.step`, so a resumed
    run draws exactly the augmentations an uninterrupted one would.
    """
    def train_step(state, batch, rng):
        key = jax.random.fold_in(rng, state.step)
        if method.needs_step:
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


def make_init_fn(method, tx, image_shape):
    """key -> initial TrainState (pure, so a stack is `jax.vmap` of it, and its shapes are
    `jax.eval_shape` of it).

    A method with `uses_consts` gets zero constants of the right shapes here; `Run.resume`
    fills them from the data before the first step.
    """
    def init(key):
        variables = method.init_variables(key, image_shape)
        consts = {}
        if method.uses_consts:
            shapes = jax.eval_shape(method.fit_consts, eval_lib.feature_shapes(
                method, variables, image_shape, 1, jax.random.key(0)))
            consts = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return TrainState(jnp.zeros((), jnp.int32), variables['params'],
                          variables['batch_stats'], tx.init(variables['params']), consts)
    return init


def gather_on_device(step):
    """`step` fed from images already on the devices (`DeviceInput`): the batch brings
    `positions` (rows, per batch key) and `tables` (the images), and `step` gets
    `batch[key] = tables[key][positions[key]]`: the batch the host would have sent."""
    @functools.wraps(step)  # the jitted program keeps the step's name
    def step_with_gather(state, batch, rng):
        batch = dict(batch)
        tables, positions = batch.pop('tables'), batch.pop('positions')
        batch.update({key: tables[key][rows] for key, rows in positions.items()})
        return step(state, batch, rng)
    return step_with_gather


@functools.lru_cache(maxsize=reuse.MAX_KEPT)
def jit_train_step(train_step, mesh, on_device=False):
    """The step of one detector jitted on `mesh` (batch on 'data', state and key replicated,
    state donated), traced with the mesh as ambient context so that explicit collectives
    (the chunked NT-Xent's `shard_map`) find its axes. `on_device`: the batch holds positions
    into on-device images (`gather_on_device`), placed as `Run.batches` placed them
    (positions and labels on 'data', the images replicated)."""
    repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh)

    def step_on_mesh(state, batch, rng):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return train_step(state, batch, rng)
    if on_device:
        return jax.jit(gather_on_device(step_on_mesh), donate_argnums=(0,),
                       in_shardings=(repl, None, repl), out_shardings=(repl, repl))
    return jax.jit(step_on_mesh, donate_argnums=(0,),
                   in_shardings=(repl, data, repl), out_shardings=(repl, repl))


@functools.lru_cache(maxsize=reuse.MAX_KEPT)
def jit_stacked_step(train_step, mesh, mode, on_device=False):
    """The step of a stack of detectors (`stacking.stacked(train_step, mode)`) jitted: state
    and keys on 'model', batches on ('model', 'data'), state donated. `on_device`: as for
    `jit_train_step`; the gather runs once for the whole (K, B) stack of positions."""
    models = sharding.model_sharding(mesh)
    batch = sharding.stacked_data_sharding(mesh)  # every batch key
    step = stacking.stacked(train_step, mode)
    if on_device:
        step, batch = gather_on_device(step), None  # placed by Run.batches
    return jax.jit(step, donate_argnums=(0,),
                   in_shardings=(models, batch, models), out_shardings=(models, models))


def init_state(method, tx, key, image_shape, mesh):
    """Initial TrainState of one detector, created directly replicated on the mesh."""
    return jax.jit(make_init_fn(method, tx, image_shape),
                   out_shardings=sharding.replicated(mesh))(key)


def variables_of(state):
    """The model variables of a TrainState (one detector's, or a stack's)."""
    return {'params': state.params, 'batch_stats': state.batch_stats}


def init_key(seed):
    """The params init key of a run with `seed` (single and stacked runs alike)."""
    return jax.random.fold_in(jax.random.key(seed), 0)


def check_image_shape(image_set, data_cfg):
    """(H, W, C) of the set; DataError unless it is data.image_size / data.channels."""
    shape = tuple(int(d) for d in np.shape(image_set.images[0]))
    want = (data_cfg.image_size, data_cfg.image_size, data_cfg.channels)
    if shape != want:
        raise DataError(f'{image_set.name}: images are {shape[0]}x{shape[1]}x{shape[2]} (HxWxC) '
                        f'but the config expects {want[0]}x{want[1]}x{want[2]} '
                        '(data.image_size, data.channels)')
    return shape


def start_record(config, workdir):
    """Creates `workdir` and, when it holds no checkpoint yet, records the run's config
    and training fingerprint there (an existing run's record was checked, not rewritten)."""
    storage.check_url(workdir)  # a URL's bucket, server and credentials, in bounded time
    try:
        storage.makedirs(workdir)
        if not fingerprint.has_checkpoints(workdir):
            fingerprint.write_run_record(config, workdir)
    except OSError as e:
        raise TrainingError(f'cannot write to workdir {workdir}: {e}') from e


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
    logging.info('global batch %d images = %d per device x %d devices (%d processes); %s',
                 config.batch_size, per_device, geometry['data_devices'],
                 geometry['process_count'],
                 optim.describe_schedule(config.optim, schedule, steps_per_epoch))
    return geometry


def check_finite(step, metrics, last_saved, members=None, group=None):
    """TrainingError when a logged metric is not finite: naming the metrics (one detector)
    or the members of stack `group` (`members`: their names, in stack order)."""
    if members is None:
        bad = {k: float(v) for k, v in metrics.items() if not np.all(np.isfinite(v))}
        where = f': {bad}'
    else:
        bad = sorted({m for v in metrics.values() for m, x in zip(members, np.ravel(v))
                      if not np.isfinite(x)})
        where = f' for class(es) {bad} (group {group})'
    if bad:
        raise TrainingError(
            f'non-finite training metrics at step {step}{where}. Stopping; the last good '
            f'checkpoint is step {last_saved} (lower optim.lr or check the data).')


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
    if not method.needs_outliers:
        return None
    if not config.oe.source:
        raise ConfigError(f'method {config.method!r} trains with outlier exposure: set '
                          'oe.source (normal, other_classes, or a data source such as folder)')
    if config.oe.source in ('normal', 'other_classes'):
        return None
    return sources.load_auxiliary(config.oe, 'train', image_shape, 'outlier exposure')


# data.on_device='auto' keeps the training images on the devices when they take at most
# this fraction of the smallest device's memory: the rest is for the model, its
# activations and XLA's buffers.
ON_DEVICE_MAX_FRACTION = 0.25


def input_on_device(setting, nbytes, devices):
    """(keep the training images on the devices?, why) for `data.on_device` = `setting` and
    images of `nbytes` bytes. 'auto' needs every device to report its memory (GPUs and TPUs
    do; XLA:CPU does not, and there the host and the "device" share one memory anyway)."""
    if setting not in ON_DEVICE_SETTINGS:
        raise ConfigError(f'data.on_device must be one of {ON_DEVICE_SETTINGS}, got {setting!r}')
    if setting != 'auto':
        return setting == 'true', f'data.on_device={setting}'
    smallest = _smallest_device_memory(devices)
    if not smallest:
        return False, 'data.on_device=auto: the devices do not report their memory'
    fits = nbytes <= ON_DEVICE_MAX_FRACTION * smallest
    return fits, (f'data.on_device=auto: {nbytes / 2**20:.0f} MiB of images '
                  f'{"<=" if fits else ">"} {ON_DEVICE_MAX_FRACTION:.0%} of the smallest '
                  f'device memory ({smallest / 2**30:.1f} GiB)')


def _smallest_device_memory(devices):
    """Bytes of the smallest memory among `devices`, 0 when one does not report it. A process
    can only ask its own devices; several processes agree on the smallest of all (one
    collective), so they all take the same path."""
    local = [d for d in devices if d.process_index == jax.process_index()]
    limits = [(d.memory_stats() or {}).get('bytes_limit', 0) for d in local]
    smallest = min(limits) if limits and all(limits) else 0
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        smallest = int(np.min(multihost_utils.process_allgather(np.array([smallest],
                                                                         np.int64))))
    return smallest


class DeviceInput:
    """The training images of a run's detectors, placed on its devices once (replicated on
    the mesh), so each step's batch is gathered there from a few integers the host sends.

    `sources`: per detector, {batch key: (image set, indices)} its stream reads ('image',
    and 'outlier' for outlier exposure). `tables[key]` holds every detector's
    `image_set.images[indices]` one after the other; detector d's rows start at
    `offsets[key][d]`. An outlier stream that reads a detector's own normal images
    (self-OECL) shares the 'image' table instead of holding a second copy.
    """

    def __init__(self, sources, mesh):
        repl = sharding.replicated(mesh)
        self.tables, self.offsets = {}, {}
        for key in sources[0]:
            if key != 'image' and all(_same_source(s[key], s['image']) for s in sources):
                self.tables[key], self.offsets[key] = self.tables['image'], self.offsets['image']
                continue
            parts = [_rows(*s[key]) for s in sources]
            self.offsets[key] = np.cumsum([0] + [len(p) for p in parts[:-1]])
            table = np.concatenate(parts)
            # Every process holds the whole table on the host; each places its devices' copy.
            self.tables[key] = jax.make_array_from_callback(table.shape, repl,
                                                            lambda index, t=table: t[index])

    @staticmethod
    def nbytes(sources):
        """Bytes the tables of `sources` take (nothing read)."""
        def rows(key):
            if key != 'image' and all(_same_source(s[key], s['image']) for s in sources):
                return 0
            return sum(len(s[key][1]) for s in sources)
        shape = np.shape(sources[0]['image'][0].images[0])
        return int(np.prod(shape)) * sum(rows(key) for key in sources[0])


def _same_source(a, b):
    return a[0] is b[0] and np.array_equal(a[1], b[1])


def _rows(image_set, indices):
    images = image_set.images
    if isinstance(images, np.ndarray):
        return np.asarray(images[np.asarray(indices, np.int64)], np.uint8)
    return np.stack([np.asarray(images[i], np.uint8) for i in indices])  # a lazy sequence


def train_batches(method, config, train_set, indices, normal_classes, outlier_set, start_step,
                  **kwargs):
    """Host batches of one detector from `start_step` (`pipeline.method_train_iterator`);
    `images=False`: positions instead of images (`DeviceInput`)."""
    return pipeline.method_train_iterator(
        method.inputs, train_set, indices, normal_classes,
        global_batch_size=config.batch_size, seed=config.seed,
        outliers=outlier_source(config, train_set, indices, normal_classes, outlier_set),
        start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count(), **kwargs)


def offset_positions(stream, offsets):
    """A detector's position batches shifted to its rows of the `DeviceInput` tables
    (`offsets`: per batch key)."""
    for batch in stream:
        yield dict(batch, positions={k: (p + offsets[k]).astype(np.int32)
                                     for k, p in batch['positions'].items()})


class Run(abc.ABC):
    """One training program with its own checkpoints; the loop that drives it.

    Subclasses call `_build` once their data is known and define the hooks declared
    abstract below: how the state is made and placed (init_fn, init_keys, state_sharding,
    rng), how the step is jitted and fed (jit_step, batches), and the per-layout pieces
    (member_features, stack, unstack, pack_scoring, evaluate). Everything else is written
    once here: restore, the method constants, the loop, the scoring state (fitted, restored
    or refitted) and the final save. `member_names` is None for one detector, else the
    stack's member names.
    """
    member_names = None

    # ------------------------------------------------------------------ hooks

    @abc.abstractmethod
    def init_fn(self):
        """The pure init function, key(s) -> initial TrainState (`make_init_fn`, stacked for
        a stack)."""

    @abc.abstractmethod
    def init_keys(self):
        """The key(s) `init_fn()` takes."""

    @property
    @abc.abstractmethod
    def state_sharding(self):
        """Where every array of the state lives."""

    @property
    @abc.abstractmethod
    def rng(self):
        """The run's base key(s), passed to every step (the step folds in the step number)."""

    @abc.abstractmethod
    def jit_step(self, train_step):
        """`train_step` jitted for this run's shardings (`jit_train_step`,
        `jit_stacked_step`)."""

    @abc.abstractmethod
    def batches(self, start_step):
        """Iterator of global batches from `start_step`."""

    @abc.abstractmethod
    def member_features(self, state, label):
        """Each detector's features of its own normal training images (a list, in stack
        order), for its method constants and its scoring bank."""

    @abc.abstractmethod
    def stack(self, trees):
        """Per-detector trees (a list) in this run's layout: the one tree, or stacked on a
        leading model axis."""

    @abc.abstractmethod
    def unstack(self, tree):
        """A tree in this run's layout as per-detector trees (a list)."""

    @abc.abstractmethod
    def pack_scoring(self, scorings):
        """Per-detector scoring states (a list) as the checkpoint saves them."""

    @abc.abstractmethod
    def evaluate(self, state, scoring, step, extra):
        """Scores the test split; writes and returns each detector's results (a list)."""

    def after_final_save(self, state, scoring, step):
        """Called once the final checkpoint is committed; returns fields for the results."""
        return {}

    def saved_results(self, step):
        """Results already written for finished checkpoint `step` with this config (reused
        instead of evaluating again), or None."""
        return None

    def preempted_fields(self):
        """What a preemption message says of this run beyond its step (tables: the group)."""
        return {}

    # ------------------------------------------------------------------ building

    def _build(self, config, directory, data, detectors, mesh, name, method=None):
        """The run's method (`method`, or one built for the detectors' step budget), optimizer
        and checkpoint directory. `data`: the run's `jaxad.detectors.RunData`; `detectors`:
        those this run trains (one, or a stack with equal budgets)."""
        self.config, self.directory, self.data = config, directory, data
        self.detectors, self.budget = list(detectors), detectors[0].budget
        self.mesh, self.image_shape, self.name = mesh, data.image_shape, name
        budget = self.budget
        sharding.check_batch_divides(config.batch_size, mesh)
        self.method = method if method is not None else reuse.method(config, budget)
        self.tx, self.schedule = reuse.optimizer(
            config.optim, budget.steps_per_epoch, budget.total_steps, config.batch_size,
            freeze=self.method.frozen_params)
        if not self.method.trains:  # no step: no optimiser state in the state or checkpoints
            self.tx = optax.identity()
        self.checkpoints = ckpt_lib.Checkpoints(
            storage.join(directory, 'checkpoints'), max_to_keep=config.checkpoint.max_to_keep,
            use_async=config.checkpoint.use_async)
        preemption.keep_orbax_off(self.checkpoints.manager)  # the sync point is the loop's

    @property
    def steps_per_epoch(self):
        return self.budget.steps_per_epoch

    # ------------------------------------------------------------------ input

    def stream_sources(self):
        """Per detector, {batch key: (image set, indices)} its training stream reads."""
        data, out = self.data, []
        for d in self.detectors:
            sources = {'image': (data.train_set, d.indices)}
            if self.method.needs_outliers:  # others never read the oe.source stream
                outliers = outlier_source(self.config, data.train_set, d.indices,
                                          d.normal_classes, data.outlier_set)
                if outliers is not None:
                    sources['outlier'] = outliers
            out.append(sources)
        return out

    @functools.cached_property
    def device_input(self):
        """The run's `DeviceInput` when its training images stay on the devices
        (`data.on_device`), else None (the host sends every batch's images)."""
        sources = self.stream_sources()
        on, why = input_on_device(self.config.data.get('on_device', 'auto'),
                                  DeviceInput.nbytes(sources), self.mesh.devices.flat)
        logging.info('%s: training images %s (%s)', self.name,
                     'on the devices, gathered by index in each step' if on
                     else 'sent from the host every step', why)
        return DeviceInput(sources, self.mesh) if on else None

    def host_streams(self, start_step, **kwargs):
        """Each detector's host batches from `start_step`: images, or with `device_input`
        the positions of its rows in the device tables."""
        device_input = self.device_input
        streams = []
        for d, detector in enumerate(self.detectors):
            stream = train_batches(self.method, self.config, self.data.train_set,
                                   detector.indices, detector.normal_classes,
                                   self.data.outlier_set, start_step,
                                   images=device_input is None, **kwargs)
            if device_input is not None:
                stream = offset_positions(stream, {k: int(o[d]) for k, o in
                                                    device_input.offsets.items()})
            streams.append(stream)
        return streams

    def with_tables(self, batch):
        """A global batch as the jitted step takes it: with the device tables when
        `device_input` is set."""
        if self.device_input is None:
            return batch
        return dict(batch, tables=self.device_input.tables)

    @property
    def total_steps(self):
        return self.budget.total_steps

    # ------------------------------------------------------------------ state

    @functools.cached_property
    def _jitted_init(self):
        # One jitted init per run: its shapes (abstract_state) and the initial state share
        # one trace of the model's init instead of tracing it twice.
        return jax.jit(self.init_fn(), out_shardings=self.state_sharding)

    def initial_state(self):
        """The state before step 1 (constants still zero), created with its shardings."""
        return self._jitted_init(self.init_keys())

    def abstract_state(self):
        """Shapes, dtypes and shardings of the state (`eval_shape`: nothing computed)."""
        shapes = self._jitted_init.eval_shape(self.init_keys())
        return jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.state_sharding),
            shapes)

    def restore_latest(self):
        """(state, step) of the newest readable checkpoint, or (None, 0) when there is none.

        A damaged newest step is set aside and the newest readable one used
        (`Checkpoints.restore_newest`); a config mismatch is an error.
        """
        restored = self.checkpoints.restore_newest(self.abstract_state(), using='using')
        if restored is None:
            return None, 0
        logging.info('resuming from %s step %d', self.checkpoints.directory, restored[1])
        return restored

    def resume(self):
        """(state, step) to train from: the newest readable checkpoint's, or the initial
        state with the method's constants fitted and 0."""
        state, step = self.restore_latest()
        if state is None:
            return self.fit_consts(self.initial_state()), 0
        return state, step

    # ------------------------------------------------------------------ constants, scoring

    def fit_consts(self, state):
        """`state` with each detector's method constants computed from its *initial* model
        on its normal training images (MSC: the centre of the pretrained features, §3.1);
        unchanged for methods without constants. Once, before step 1, never on resume."""
        if not self.method.uses_consts:
            return state
        logging.info('%s: computing the method constants from the initial model', self.name)
        fit = jax.jit(self.method.fit_consts)
        consts = [jax.device_get(fit(f))
                  for f in self.member_features(state, 'initial features')]
        return state.replace(consts=jax.device_put(self.stack(consts), self.state_sharding))

    def fit_scoring(self, state):
        """Each detector's scoring state (feature bank, weights) from its normal training
        images, packed as the checkpoint saves it."""
        method, seed = self.method, self.config.seed
        if not eval_lib.needs_bank_pass(method):
            one = self.unstack(variables_of(state))[0]  # shapes only
            return self.pack_scoring([
                eval_lib.bankless_scoring(method, one, self.image_shape, len(d.indices),
                                          eval_lib.eval_bank_key(seed))
                for d in self.detectors])
        labels = np.asarray(self.data.train_set.labels)
        feats = self.member_features(state, 'train bank')
        return self.pack_scoring([
            eval_lib.scoring_from_features(
                method, eval_lib.with_bank_labels(method, f, labels[d.indices]))
            for f, d in zip(feats, self.detectors)])

    def finished_scoring(self, state, step, workdir):
        """(scoring state, results fields) of restored checkpoint `step`: the saved scoring
        state; or, when this config's scoring fields differ from those it was fitted with,
        one refitted now (the results name the changes; the checkpoint keeps the saved one);
        or, when the step has none, one fitted now. A damaged saved one: the step is set
        aside, the scoring state refitted from `state` and the step saved again."""
        if not self.checkpoints.has_scoring(step):
            logging.info('%s: checkpoint step %d has no scoring state; computing it',
                         self.name, step)
            return self.fit_scoring(state), {}
        changes = fingerprint.scoring_changes(self.config, self.directory, workdir)
        if changes:
            logging.warning('%s: scoring settings differ from those of the saved scoring state '
                            '(%s): refitting it on the training images; the checkpoint keeps '
                            'the saved one', self.name, '; '.join(changes))
            return self.fit_scoring(state), dict(scoring_state='refitted',
                                                 scoring_changes=changes)
        return self.checkpoints.restore_or_refit_scoring(
            step, state, lambda: self.fit_scoring(state)), {}

    def finish(self, state, watch=None, extra=None):
        """Fits the scoring state, saves it with the final checkpoint, evaluates; returns each
        detector's results.

        watch: the run's `jaxad.preemption.Watch`, active until the final checkpoint (and a
        single run's threshold) is written; a signal by then raises `Preempted` there (the
        rerun evaluates the saved run), and the evaluation itself is not watched.
        """
        scoring = self.fit_scoring(state)
        step = int(self.unstack(state.step)[0])  # a stack's members share the step
        self.checkpoints.save(step, state, scoring=scoring)
        self.checkpoints.wait()
        # The scoring settings now describe the saved scoring state.
        fingerprint.write_scoring_settings(self.config, self.directory)
        extra = dict(extra or {}, **self.after_final_save(state, scoring, step))
        if watch is not None:
            if watch.reached():
                raise watch.preempted(step, self.total_steps, self.checkpoints.directory,
                                      final=True, **self.preempted_fields())
            watch.disarm()  # evaluation: the signals act as without jaxad again
        return self.evaluate(state, scoring, step, extra)

    # ------------------------------------------------------------------ the loop

    def train(self, state, start_step, progress, progress_offset=0, watch=None,
              **progress_fields):
        """Steps `start_step + 1 .. total_steps` of the jitted, donated step: every `log_every`
        steps a line in DIRECTORY/metrics.jsonl (for a stack: member means and each member's
        losses) and a `progress` update, a checkpoint every `checkpoint.every_steps` (the
        final save, with the scoring state, is the caller's). Returns the state.

        The host never reads from the device between log points: the step is dispatched
        under a transfer guard that forbids device-to-host copies (a stray `float(x)` in
        the hot loop is an error, not a silent stall; tests/test_hot_loop.py), and a log
        point's metrics are copied asynchronously and read after the next step has been
        dispatched, so the device is not idle while the host logs. At a checkpoint and
        at the last step they are read at once: a non-finite loss is never saved.

        watch: a `jaxad.preemption.Watch`, armed once the first step is dispatched and asked
        after each step is dispatched (a host-only check, the same step on every process).
        When it says stop before the last step, the steps in flight are finished, the last
        one's metrics read (and logged if it is a log step), a checkpoint of that step saved
        and committed, and `Preempted` raised (the metric writer is closed on the way out).
        At the last step the loop ends as usual; the caller's final save is that step's
        checkpoint. With a watch the host also stays at most one step ahead of the device:
        once step s is dispatched it waits for step s - 1 to complete (no copy; the device
        has step s queued meanwhile), then asks the watch. Without that bound it would run up
        to `log_every` steps ahead between log points, and a signal would wait for all of
        them; with it, for at most two steps (the one running and the one queued)."""
        config, mesh, total = self.config, self.mesh, self.total_steps
        step_fn = self.jit_step(make_train_step(self.method, self.tx, self.schedule))
        batches = self.batches(start_step)
        models = len(self.member_names) if self.member_names else 1
        logging.info('%s: %d steps (%d per epoch), %d model(s) x %d images per step, mesh %s',
                     self.name, total, self.steps_per_epoch, models, config.batch_size,
                     dict(mesh.shape))
        geometry = batch_geometry(config, mesh, self.schedule, self.steps_per_epoch)
        self._last_saved, self._t_last, self._step_last = start_step, time.time(), start_step
        pending = None  # (step, metrics, is_log) read after the next step is dispatched
        with MetricWriter(self.directory, tensorboard=config.get('tensorboard', False)) as writer:
            previous = None  # with a watch: an output of the previous step
            for step in range(start_step + 1, total + 1):
                with jax.transfer_guard_device_to_host('disallow_explicit'):
                    state, metrics = step_fn(state, next(batches), self.rng)
                if watch is not None and step == start_step + 1:
                    watch.arm()  # from now on there is training to save
                if pending:
                    self._read_metrics(*pending, writer, geometry, models, progress,
                                       progress_offset, progress_fields)
                    pending = None
                if watch is not None:
                    # At most this step in flight past the previous one (no copy; the device
                    # has this step queued meanwhile). Not state.step: the state is donated.
                    if previous is not None:
                        previous.block_until_ready()
                    previous = jax.tree_util.tree_leaves(metrics)[0]
                is_log, is_save = log_and_save_flags(step, total, config)
                # Preempted: this step's checkpoint (at the last step: the caller's final one).
                stop = watch is not None and watch.reached() and step < total
                is_save = is_save or stop
                if not (is_log or is_save):
                    continue
                for leaf in jax.tree_util.tree_leaves(metrics):
                    if leaf.is_fully_addressable:  # else to_host gathers it across hosts
                        leaf.copy_to_host_async()
                if is_save or step == total:
                    self._read_metrics(step, metrics, is_log, writer, geometry, models,
                                       progress, progress_offset, progress_fields)
                    if is_save:
                        self.checkpoints.save(step, state)
                        self._last_saved = step
                    if stop:
                        self.checkpoints.wait()  # committed before anyone is told it is
                        raise watch.preempted(step, total, self.checkpoints.directory,
                                              **self.preempted_fields())
                else:
                    pending = (step, metrics, is_log)
        return state

    def _read_metrics(self, step, metrics, is_log, writer, geometry, models, progress,
                      progress_offset, progress_fields):
        """Fetches a log point's metrics, stops on a non-finite one, writes the log line."""
        config = self.config
        metrics = {k: np.asarray(v, np.float64) for k, v in distributed.to_host(metrics).items()}
        check_finite(step, metrics, self._last_saved, self.member_names, self.name)
        if not is_log:
            return
        rate = (step - self._step_last) / max(time.time() - self._t_last, 1e-9)
        record = {k: float(v.mean()) for k, v in metrics.items()}
        for k, v in metrics.items():
            if self.member_names and k.startswith('loss'):
                record.update({f'{k}/{m}': float(x) for m, x in zip(self.member_names, v)})
        record.update(steps_per_sec=rate, images_per_sec=rate * config.batch_size * models,
                      epoch=step / self.steps_per_epoch, **geometry)
        writer.write(step, record)
        progress.update(progress_offset + step, **progress_fields, loss=record['loss'],
                        lr=record['lr'], img_s=round(record['images_per_sec'], 1))
        self._t_last, self._step_last = time.time(), step
