"""Runs in one process share their programs when their methods are equal.

A notebook, a sweep or a test session trains several runs in one Python process. `jax.jit`
keeps its traced and compiled programs per *function object*, and every run used to build
its method, optimizer and train step afresh: each run traced and lowered all its programs
again, seconds per run even when XLA's compilation itself came from the persistent cache.

Here a run's method object is the earlier run's when the two are equal in state (same class,
every attribute equal, arrays by content: `state_key`), and its optimizer the earlier one's
for equal optimizer settings and step budget. `jaxad.loop` jits the train step once per
(method, optimizer, mesh) and the evaluator keys its programs on the method object
(`jaxad.evaluate`), so jax's own caches serve the later run: runs that differ only in what a
method does not hold (the seed, the normal class, the data path, checkpoint and logging
cadence) trace nothing again. A method whose state cannot be described that way (a lambda
among its attributes) is shared only with runs of an equal config, whose named files have
the same size and modification time.

Sharing is safe because what is shared is immutable: a `Method` is fixed once built (its
attributes are set in `__init__` only), so its behaviour is its class's code applied to that
state; optax transformations and schedules are pure functions, and a train step is a pure
function of (state, batch, rng). The initial-state program is not shared: it reads
`model.init_from` weights when it is traced.
"""
import collections
import dataclasses
import enum
import functools
import hashlib
import json
import os
import types

import ml_collections
import numpy as np

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


class _Opaque(Exception):
    """A value `state_key` cannot describe exactly."""


def state_key(obj):
    """A hashable description of `obj`'s state, equal for two objects exactly when they are
    equal in class and state: scalars and strings by value, containers and config dicts by
    their items, arrays by dtype, shape and a digest of their bytes, module-level functions
    and classes by name, dataclasses (flax modules: their fields but the parent) and jaxad
    objects by their attributes. Raises `_Opaque` for anything else (closures, lambdas,
    PRNG keys, foreign objects)."""
    return _describe(obj, set())


def _describe(x, active):
    if x is None or isinstance(x, (bool, int, str, bytes)):
        return (type(x).__name__, x)
    if isinstance(x, float):
        return ('float', repr(x))  # nan equals nan, -0.0 is not 0.0
    if id(x) in active:
        raise _Opaque('a cycle')
    active = active | {id(x)}
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_describe(v, active) for v in x))
    if isinstance(x, dict):
        items = sorted(((_describe(k, active), _describe(v, active)) for k, v in x.items()),
                       key=repr)
        return ('dict', tuple(items))
    if isinstance(x, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        return ('config', _describe(x.to_dict(), active))
    if isinstance(x, enum.Enum):
        return ('enum', type(x).__module__, type(x).__qualname__, x.name)
    if isinstance(x, type):
        return ('type', x.__module__, x.__qualname__)
    if isinstance(x, np.generic) or hasattr(x, '__array__') and hasattr(x, 'dtype'):
        if 'key' in str(x.dtype):  # typed PRNG keys have no plain bytes
            raise _Opaque('a PRNG key')
        a = np.ascontiguousarray(np.asarray(x))
        return ('array', str(a.dtype), a.shape, hashlib.sha256(a.tobytes()).hexdigest())
    if isinstance(x, types.FunctionType):
        if x.__closure__ or '<' in x.__qualname__:  # a closure, a lambda, a local function
            raise _Opaque(f'function {x.__qualname__}')
        return ('function', x.__module__, x.__qualname__)
    if isinstance(x, types.BuiltinFunctionType):
        return ('builtin', getattr(x, '__module__', None), x.__qualname__)
    if isinstance(x, types.MethodType):
        return ('bound', _describe(x.__func__, active), _describe(x.__self__, active))
    if isinstance(x, functools.partial):
        return ('partial', _describe(x.func, active), _describe(x.args, active),
                _describe(x.keywords, active))
    if dataclasses.is_dataclass(x):
        return ('dataclass', _describe(type(x), active),
                tuple((f.name, _describe(getattr(x, f.name), active))
                      for f in dataclasses.fields(x) if f.name != 'parent'))
    if type(x).__module__.startswith('jaxad.') and hasattr(x, '__dict__'):
        return ('object', _describe(type(x), active), _describe(vars(x), active))
    raise _Opaque(f'a {type(x).__module__}.{type(x).__qualname__}')


def method(config, budget=None, ignore=()):
    """`get_method(config, budget)`, or the earlier run's method when it is equal in state
    (`state_key`); without a state key, the earlier method of equal settings (the config but
    its sections in `ignore`, the budget, the named files)."""
    built = get_method(config, budget)
    try:
        key = ('state', state_key(built))
    except _Opaque:
        key = ('settings', settings_key(config, ignore), budget)
    return _METHODS.get(key, lambda: built)


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
