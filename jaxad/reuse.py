"""Runs in one process share their programs when their settings are equal.

A notebook, a sweep or a test session trains several runs in one Python process. `jax.jit`
keeps its traced and compiled programs per *function object*, and every run used to build
its method, optimizer and train step afresh: each run traced and lowered all its programs
again, seconds per run even when XLA's compilation itself came from the persistent cache.

Here the method object and the optimizer are kept per distinct settings, so a later run
with equal settings gets the same objects; `jaxad.loop` jits the train step once per
(method, optimizer, mesh), and the evaluator keys its programs on the method object
(`jaxad.evaluate`), so jax's own caches serve the later run. The settings are the whole
config (as JSON) and the step budget; a file the config names enters by its size and
modification time, so a weights file rewritten at the same path builds a new method.

Sharing is safe because what is shared is immutable: a `Method` is fixed once built (its
attributes are set in `__init__` only), optax transformations and schedules are pure
functions, and a train step is a pure function of (state, batch, rng). The initial-state
program is not shared: it reads `model.init_from` weights when it is traced.
"""
import collections
import json
import os

from jaxad import optim
from jaxad.methods import get_method

# Distinct settings kept per process (least recently used dropped first): a sweep in a
# notebook holds at most this many methods and optimizers alive.
MAX_KEPT = 32


class _LRU:
    def __init__(self, size):
        self.size, self.items = size, collections.OrderedDict()

    def get(self, key, make):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.items[key] = make()
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


_METHODS = _LRU(MAX_KEPT)
_OPTIMIZERS = _LRU(MAX_KEPT)


def _file_signatures(tree):
    """(path, size, mtime_ns) of every existing local file named by a string in `tree`."""
    out = []

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, str) and x and '://' not in x and os.path.isfile(x):
            st = os.stat(x)
            out.append((os.path.abspath(x), st.st_size, st.st_mtime_ns))
    walk(tree)
    return sorted(out)


def settings_key(config, ignore=()):
    """A string equal for two configs exactly when their settings (top-level sections but
    those in `ignore`) and the files they name are equal."""
    described = {k: v for k, v in config.to_dict().items() if k not in ignore}
    return json.dumps([described, _file_signatures(described)], sort_keys=True, default=repr)


def method(config, budget=None, ignore=()):
    """`get_method(config, budget)`, the same object for equal settings and budget."""
    return _METHODS.get((settings_key(config, ignore), budget),
                        lambda: get_method(config, budget))


def optimizer(optim_cfg, steps_per_epoch, total_steps, global_batch=None, freeze=()):
    """`optim.make_optimizer(...)`'s (tx, schedule), the same objects for equal arguments."""
    key = (settings_key(optim_cfg), steps_per_epoch, total_steps, global_batch, tuple(freeze))
    return _OPTIMIZERS.get(key, lambda: optim.make_optimizer(
        optim_cfg, steps_per_epoch, total_steps, global_batch, freeze=freeze))


def clear():
    """Forgets every shared method and optimizer: the next run builds its own and traces its
    programs afresh (tests that count compilations start from here)."""
    _METHODS.items.clear()
    _OPTIMIZERS.items.clear()
