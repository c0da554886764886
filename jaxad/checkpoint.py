"""The one place that talks to Orbax.

A checkpoint step holds the item 'state' (train state) and, for the final
step, 'scoring' (what the evaluator needs: feature bank and normalising
weights). Orbax writes each step to a temporary directory and renames it
when complete, so an interrupted save never becomes the latest step.
"""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxad.errors import TrainingError


class Checkpoints:
    """Async saves, `max_to_keep` rotation, resume from the latest step."""

    def __init__(self, directory, *, max_to_keep=3, use_async=True):
        self.directory = os.path.abspath(directory)
        # The trainer decides when to save; Orbax only keeps and rotates.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=use_async, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=('state', 'scoring'))

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step, state, scoring=None):
        items = {'state': ocp.args.StandardSave(state)}
        if scoring is not None:
            items['scoring'] = ocp.args.StandardSave(scoring)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore_state(self, step, abstract_state):
        """Restores 'state' with the shardings/dtypes of `abstract_state`."""
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))
        except (ValueError, KeyError, TypeError) as e:
            raise TrainingError(
                f'checkpoint {self.directory} step {step} does not match this config '
                f'(model or optimizer changed?): {e}') from e
        return out['state']

    def has_scoring(self, step):
        return os.path.isdir(os.path.join(self.directory, str(step), 'scoring'))

    def restore_scoring(self, step, abstract_scoring):
        out = self.manager.restore(step, args=ocp.args.Composite(
            scoring=ocp.args.StandardRestore(abstract_scoring)))
        return out['scoring']

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) describing `tree`, for restore."""
    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
    return jax.tree_util.tree_map(one, tree)
