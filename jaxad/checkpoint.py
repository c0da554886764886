"""The one place that talks to Orbax.

A checkpoint step holds the item 'state' (train state) and, for the final
step, 'scoring' (what the evaluator needs: feature bank and normalising
weights). Orbax writes each step to a temporary directory and renames it
when complete, so an interrupted save never becomes the latest step.

Every read goes through `Checkpoints.restore(step, item, like=None, sharding=None)`:
the train state into the abstract tree the run builds with `jax.eval_shape` (its
shardings; no initial state is computed), the scoring state (and, in predict and
export, the state too) from the item's own Orbax metadata.

Damage and failures are never silent:

* A step that cannot be read (truncated or missing array files, missing or
  corrupt `_METADATA`, a missing item directory) raises `CheckpointDamaged`.
  `restore_newest` then moves it out of Orbax's view, to
  `<checkpoints>_damaged/<step>` (kept for the user), and resumes from the newest
  readable step; when no step is readable it raises one TrainingError and moves
  nothing.
* Damage is told from a config change by the item's own metadata: when it reads
  and its tree or shapes differ from what this config builds, the error says
  so and the (good) checkpoint stays where it is.
* The directory is checked for writability when it is opened; a save that fails
  (at once or later in Orbax's async thread: at the next save, `wait` or `close`)
  raises a TrainingError naming the directory and the step, and the previous
  step stays the latest.
"""
import functools
import gc
import json
import logging as py_logging
import os
import socket
import sys
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jaxad import distributed, storage
from jaxad.errors import TrainingError

_ITEMS = ('state', 'scoring')


class CheckpointDamaged(TrainingError):
    """A step (or one of its items) that exists but cannot be read."""

    def __init__(self, directory, step, item, reason):
        self.directory, self.step, self.item, self.reason = directory, step, item, reason
        super().__init__(f'checkpoint {directory} step {step} is damaged ({item}: {reason})')


def error_reason(error, limit=300):
    """One line from an Orbax/TensorStore exception: its innermost cause, without the
    multi-kilobyte TensorStore spec."""
    e = error
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e)
    for cut in (' [tensorstore_spec', ' See full TensorStore details'):
        if cut in text:
            text = text[:text.index(cut)]
    text = ' '.join(text.split()) or repr(e)
    if len(text) > limit:
        text = text[:limit] + '...'
    return f'{type(e).__name__}: {text}'


class _AbandonedReadsFilter:
    """Drops asyncio's 'Task exception was never retrieved' for Orbax's abandoned reads."""

    def filter(self, record):
        message = record.getMessage()
        return not (message.startswith('Task exception was never retrieved')
                    and 'orbax' in message)


def quiet_abandoned_reads(collect=True):
    """Silences the echoes of a failed read (installed before reading; `collect`: after
    a failure, which is reported as damage, collect the abandoned coroutines now).

    When one array of an item fails to read, Orbax gives up on the item while
    TensorStore still has its other reads in flight; their late failures (an
    'Event loop is closed' from TensorStore's threads, the abandoned coroutines when
    collected, asyncio's never-retrieved tasks) would print hundreds of tracebacks
    that repeat the damage already reported. Only those are dropped; every other
    unraisable exception and log record still reaches the previous hook.
    """
    if not getattr(sys.unraisablehook, 'jaxad_quiet', False):  # (pytest swaps hooks)
        previous = sys.unraisablehook

        def hook(unraisable):
            exc, obj = unraisable.exc_value, unraisable.object
            code = getattr(obj, 'cr_code', None)
            if ((isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed'
                 and obj is None)
                    or (code is not None and 'orbax' in code.co_filename)):
                return
            previous(unraisable)
        hook.jaxad_quiet = True
        sys.unraisablehook = hook
    asyncio_logger = py_logging.getLogger('asyncio')
    if not any(isinstance(f, _AbandonedReadsFilter) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_AbandonedReadsFilter())
    if collect:
        # The abandoned coroutines go now, quietly: one that never started warns 'coroutine
        # ... was never awaited' when collected (a warning, not an unraisable exception).
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', r"coroutine '.*' was never awaited",
                                    RuntimeWarning)
            gc.collect()


def _key_name(k):
    for attr in ('key', 'name', 'idx'):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _shapes(tree):
    """{'a/b/c': shape} of the array leaves of `tree` (empty nodes and None dropped)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {'/'.join(_key_name(k) for k in path): tuple(getattr(v, 'shape', np.shape(v)))
            for path, v in leaves}


def _difference(saved, wanted):
    """How the checkpoint's {path: shape} differs from this config's, or ''."""
    only_saved = sorted(set(saved) - set(wanted))
    only_wanted = sorted(set(wanted) - set(saved))
    shapes = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f'{len(shapes)} array(s) differ in shape, e.g. {k} is {saved[k]} in the '
                     f'checkpoint but {wanted[k]} in this config')
    if only_wanted:
        parts.append(f'{len(only_wanted)} array(s) of this config are not in the checkpoint, '
                     f'e.g. {only_wanted[0]}')
    if only_saved:
        parts.append(f'{len(only_saved)} array(s) of the checkpoint are not in this config, '
                     f'e.g. {only_saved[0]}')
    return '; '.join(parts)


def item_metadata(path):
    """The tree of ArrayMetadata (shape, dtype) an item saved with StandardSave."""
    from etils import epath
    handler = ocp.StandardCheckpointHandler()
    try:
        meta = handler.metadata(epath.Path(path))
    finally:
        handler.close()
    return getattr(meta, 'tree', meta)


# Orbax saves a replicated array "replica-parallel": each replica writes a slice of it, cut
# by a small compiled slice program per replica and array shape. For arrays of a few KiB
# (biases, BatchNorm vectors, small models) the slices only cost: a small CSI model's first
# save compiled 120 such programs, 2-3 s of a 12 s run on 8 emulated CPU devices (issue 29).
# Orbax's own threshold keeps whole any array whose slice per replica would be smaller.
MIN_REPLICA_SLICE_BYTES = 1 << 20


@functools.cache  # once per process
def _split_only_large_arrays():
    """Register Orbax's jax.Array handler with MIN_REPLICA_SLICE_BYTES where the registered
    handler is Orbax's own (not one a user registered) and this Orbax has the option;
    otherwise leave Orbax's default. Restoring is not affected."""
    handlers = ocp.type_handlers
    try:
        if type(handlers.get_type_handler(jax.Array)) is not handlers.ArrayHandler:
            return
        handler = handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
    except (ValueError, TypeError):  # no handler registered; an Orbax without the option
        return
    handlers.register_type_handler(jax.Array, handler, override=True)


class Checkpoints:
    """Async saves, `max_to_keep` rotation, resume from the newest readable step.

    `read_only=True` (predict, export) neither creates nor probes the directory.
    """

    def __init__(self, directory, *, max_to_keep=3, use_async=True, read_only=False):
        self.directory = storage.absolute(directory)
        self.use_async = use_async
        self._pending = None  # the step of an async save not yet known to be committed
        self._failed = False  # a save failure was raised already (close stays quiet)
        self._set_aside_count = 0
        if not read_only:
            self._check_writable()
            _split_only_large_arrays()
        # The trainer decides when to save; Orbax only keeps and rotates.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep, read_only=read_only,
            enable_async_checkpointing=use_async and not read_only, create=not read_only)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=_ITEMS)

    def _check_writable(self):
        """TrainingError now, before any compute, when the directory cannot be written."""
        if storage.is_url(self.directory):
            storage.check_url(self.directory)  # bucket, server and credentials, bounded
            return
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise TrainingError(f'checkpoint directory {self.directory} is a file, not a '
                                'directory; move it away or choose another --workdir')
        probe = os.path.join(self.directory,
                             f'.jaxad_write_test.{socket.gethostname()}.{os.getpid()}')
        try:
            os.makedirs(self.directory, exist_ok=True)
            with open(probe, 'w') as f:
                f.write('ok')
            os.remove(probe)
        except OSError as e:
            raise TrainingError(
                f'checkpoint directory {self.directory} is not writable '
                f'({type(e).__name__}: {e.strerror or e}); choose another --workdir or fix '
                'its permissions') from e

    # ------------------------------------------------------------------ steps

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self):
        return sorted(self.manager.all_steps())

    def step_path(self, step):
        return storage.join(self.directory, str(step))

    def item_path(self, step, item):
        return storage.join(self.directory, str(step), item)

    def saved_items(self, step):
        """The items Orbax recorded for `step` (its _CHECKPOINT_METADATA); () if unreadable."""
        try:
            text = storage.read_text(storage.join(self.step_path(step), '_CHECKPOINT_METADATA'))
            return tuple(json.loads(text).get('item_handlers') or ())
        except Exception:  # pylint: disable=broad-except  (missing, unreadable or not JSON)
            return ()

    def has_scoring(self, step):
        """Whether `step` was saved with a scoring state (even one since damaged)."""
        return (storage.isdir(self.item_path(step, 'scoring'))
                or 'scoring' in self.saved_items(step))

    # ------------------------------------------------------------------ saving

    def _save_failed(self, step, error):
        """The TrainingError of a failed save of `step`; Orbax's step list re-read from disk."""
        self._failed = True
        try:
            self.manager.reload()
            latest = self.manager.latest_step()
        except Exception:  # pylint: disable=broad-except
            latest = None
        keep = (f'the latest complete checkpoint is still step {latest}' if latest is not None
                else 'there is no complete checkpoint')
        reason = error if isinstance(error, str) else error_reason(error)
        return TrainingError(f'saving checkpoint step {step} to {self.directory} failed '
                             f'({reason}); {keep}')

    def _check_committed(self, step):
        if distributed.is_main_process() and not storage.isdir(self.step_path(step)):
            raise self._save_failed(step, f'{self.step_path(step)} was not written')

    def _finish_pending(self):
        """Waits for the async save in flight; an error of it names its step."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-except
            raise self._save_failed(step if step is not None else '(unknown)', e) from e
        if step is not None:
            self._check_committed(step)

    def save(self, step, state, scoring=None):
        self._finish_pending()
        items = {'state': ocp.args.StandardSave(state)}
        if scoring is not None:
            items['scoring'] = ocp.args.StandardSave(scoring)
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # pylint: disable=broad-except
            raise self._save_failed(step, e) from e
        if self.use_async:
            self._pending = step
        else:
            self._check_committed(step)

    def wait(self):
        self._finish_pending()

    def close(self):
        try:
            self._finish_pending()
        finally:
            try:
                self.manager.close()
            except Exception as e:  # pylint: disable=broad-except
                if not self._failed:  # else: the failure was reported already
                    raise TrainingError(f'closing checkpoints {self.directory} failed '
                                        f'({error_reason(e)})') from e
                logging.warning('closing checkpoints %s: %s', self.directory, error_reason(e))

    # ------------------------------------------------------------------ restoring

    def _diagnose(self, step, item, abstract, error):
        """Damage (CheckpointDamaged) or a config mismatch (TrainingError) behind `error`."""
        path = self.item_path(step, item)
        if not storage.isdir(self.step_path(step)):
            return CheckpointDamaged(self.directory, step, item,
                                     f'{self.step_path(step)} is missing')
        if not storage.isdir(path):
            return CheckpointDamaged(self.directory, step, item, f'{path} is missing')
        try:
            saved = _shapes(item_metadata(path))
        except Exception as e:  # pylint: disable=broad-except
            return CheckpointDamaged(self.directory, step, item,
                                     f'unreadable metadata: {error_reason(e)}')
        difference = _difference(saved, _shapes(abstract))
        if difference:
            return TrainingError(
                f'checkpoint {self.directory} step {step} does not match this config '
                f'({item}: {difference}): it was written by a different model, optimizer or '
                'data config. Rerun with that config, or use a new --workdir; the checkpoint '
                'was left in place')
        return CheckpointDamaged(self.directory, step, item, error_reason(error))

    def restore(self, step, item, like=None, sharding=None):
        """Item `item` ('state' or 'scoring') of `step`: the one way a checkpoint is read
        (training, evaluation, tables, predict and export).

        like: the abstract tree this config builds (ShapeDtypeStructs with shardings: the
        train state's is `jax.eval_shape` of its init function, so no state is built to
        restore into). The arrays come back with those shardings, and a failed read is told
        apart: CheckpointDamaged when the step cannot be read, TrainingError when it reads
        but another config wrote it.
        like=None: shapes and dtypes from the item's own Orbax metadata (no config needed:
        the scoring state, whose bank size is the data's; predict and export), every array
        placed with `sharding` (default: this process's first device); any failure is then
        damage (CheckpointDamaged).
        """
        path = self.item_path(step, item)
        quiet_abandoned_reads(collect=False)
        try:
            if like is None:
                if not storage.isdir(path):
                    raise CheckpointDamaged(self.directory, step, item, f'{path} is missing')
                where = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
                abstract = jax.tree_util.tree_map(
                    lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=where),
                    item_metadata(path))
            else:
                abstract = like
            out = self.manager.restore(step, args=ocp.args.Composite(
                **{item: ocp.args.StandardRestore(abstract)}))
            return out[item]
        except CheckpointDamaged:
            raise
        except Exception as e:  # pylint: disable=broad-except
            error = e
        quiet_abandoned_reads()
        if like is None:
            # The shapes are the checkpoint's own, so no config can mismatch: any failure
            # (TensorStore raises bare Exception/ValueError for truncated or missing array
            # files, json/FileNotFoundError for _METADATA) is damage.
            raise CheckpointDamaged(self.directory, step, item,
                                    error_reason(error)) from error
        raise self._diagnose(step, item, like, error) from error

    def set_aside(self, step):
        """Moves damaged `step` to `<checkpoints>_damaged/<step>`; returns where it went."""
        src = self.step_path(step)
        root = self.directory + '_damaged'
        dest, n = storage.join(root, str(step)), 2
        while storage.exists(dest):
            dest, n = storage.join(root, f'{step}-{n}'), n + 1
        self._set_aside_count += 1
        distributed.barrier(f'jaxad_set_aside_{self._set_aside_count}_start')
        if distributed.is_main_process() and storage.exists(src):
            try:
                storage.move(src, dest)
            except Exception as e:  # pylint: disable=broad-except  (OSError, a store's own)
                raise TrainingError(
                    f'checkpoint {self.directory} step {step} is damaged and could not be '
                    f'moved to {dest} ({e}); move or delete {src} by hand, then rerun') from e
        distributed.barrier(f'jaxad_set_aside_{self._set_aside_count}_done')
        self.manager.reload()  # Orbax caches its step list
        return dest

    def restore_newest(self, abstract_state, *, using='resuming from'):
        """(state, step) of the newest readable step, or None when there is no step.

        Damaged newer steps are set aside (with a warning saying where) once a readable
        one is found; none readable: TrainingError, nothing moved. A config mismatch
        raises at once and moves nothing.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        damaged = []
        for step in steps:
            try:
                state = self.restore(step, 'state', abstract_state)
            except CheckpointDamaged as e:
                logging.info('%s; trying an older step', e)
                damaged.append(e)
                continue
            for e in damaged:
                where = self.set_aside(e.step)
                logging.warning('%s; moved it to %s (kept for you to inspect) and %s step %d, '
                                'the newest readable step', e, where, using, step)
            return state, step
        tried = '; '.join(f'step {e.step}: {e.item}: {e.reason}' for e in damaged)
        raise TrainingError(
            f'no readable checkpoint in {self.directory}: tried steps '
            f'{", ".join(str(e.step) for e in damaged)} ({tried}). Nothing was moved; move or '
            f'delete {self.directory} to train from scratch')

    def restore_or_refit_scoring(self, step, state, refit):
        """The scoring state saved with `step` (host arrays, shapes from its own metadata,
        as `refit` gives them); when it is damaged, the step is set aside, `refit()`
        recomputes the scoring state from `state` (read fine) and the step is saved again,
        whole."""
        try:
            return jax.device_get(self.restore(step, 'scoring'))
        except CheckpointDamaged as e:
            where = self.set_aside(step)
            logging.warning('%s; moved it to %s (kept for you to inspect); recomputing the '
                            'scoring state from its train state and saving step %d again',
                            e, where, step)
        scoring = refit()
        self.save(step, state, scoring=scoring)
        self.wait()
        return scoring

