"""Running K models' functions as one program: `vmap` or `unroll` over a model axis.

A stack's params, batch stats and optimizer states carry a leading model
axis. `stacked(fn, mode)` applies a per-model function to every model:

- 'vmap' vectorises: one program whose convolutions are grouped over the
  models. Accelerators run grouped convolutions natively; this is the mode
  that fills a GPU/TPU with ten small one-class detectors.
- 'unroll' traces `fn` K times into the same jitted program (dense
  convolutions, K-fold compile time). On XLA:CPU it is the fast one:
  measured in BENCHMARKS.md, vmap's grouped convolutions and the backward
  pass inside a `lax.map` loop are both several times slower there than K
  ordinary steps.

'auto' picks 'unroll' on CPU and 'vmap' elsewhere. Both give each model
exactly its own computation, so results do not depend on the mode beyond
float rounding.
"""
import functools

import jax
import jax.numpy as jnp

from jaxad.errors import ConfigError

MODES = ('auto', 'vmap', 'unroll')


def resolve_mode(mode):
    if mode not in MODES:
        raise ConfigError(f'table.stack_mode must be one of {", ".join(MODES)}, got {mode!r}')
    if mode == 'auto':
        return 'unroll' if jax.default_backend() == 'cpu' else 'vmap'
    return mode


def stacked(fn, mode, in_axes=0):
    """`fn` applied per model along axis 0 of the arguments whose in_axes is 0.

    Arguments with in_axes None are shared by all models (e.g. a test batch).
    """
    if mode == 'vmap':
        return jax.vmap(fn, in_axes=in_axes)

    @functools.wraps(fn)  # the stack's program keeps the function's name (compile logs)
    def run(*args):
        axes = tuple(in_axes) if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
        k = next(jax.tree_util.tree_leaves(a)[0].shape[0] for a, ax in zip(args, axes)
                 if ax == 0)
        outs = [fn(*(a if ax is None else jax.tree_util.tree_map(lambda x, i=i: x[i], a)
                     for a, ax in zip(args, axes)))
                for i in range(k)]
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)
    return run
