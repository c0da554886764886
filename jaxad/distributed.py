"""Multi-process (multi-host) start-up: `jax.distributed.initialize` on request.

Why a module of its own: `jax.distributed.initialize` must run before
anything touches a device, and its values come from three places that the
CLI should treat alike: flags, `JAXAD_*` environment variables (handy for
launchers that set per-process env) and, opt-in, JAX's own cluster
auto-detection (SLURM with more than one task, Cloud TPU pods, Open MPI...).
A single process (the default) initializes nothing.

On CPU the processes need a cross-process collectives backend, or the first
all-reduce of a sharded step fails; `initialize` selects Gloo when none is
set (it is already the default in jax 0.10).

After initialization every process runs the same program on its slice of
each global batch (`jaxad.data.pipeline`); arrays are global
(`jaxad.sharding.to_global`); Orbax coordinates checkpoint saves itself;
`to_host` brings sharded outputs back to every process; only process 0
writes files (`jaxad.writers`). The workdir must be one file system that all
processes share: Orbax writes each process's shards there and resume reads it.
"""
import os
import re

import jax
import numpy as np
from absl import logging

from jaxad.errors import ConfigError

ENV = {'coordinator_address': 'JAXAD_COORDINATOR_ADDRESS',
       'num_processes': 'JAXAD_NUM_PROCESSES',
       'process_id': 'JAXAD_PROCESS_ID',
       'local_device_ids': 'JAXAD_LOCAL_DEVICE_IDS'}
MODES = ('env', 'auto', 'off')


def _int(name, value, source):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f'{name}={value!r} ({source}) is not an integer') from None


def _explicit_values(coordinator_address, num_processes, process_id, local_device_ids):
    """Arguments, else JAXAD_* env vars, checked; {} when neither names any."""
    given = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                 process_id=process_id, local_device_ids=local_device_ids)
    source = {}
    for key, value in list(given.items()):
        if value in (None, ''):
            given[key] = os.environ.get(ENV[key]) or None
            source[key] = f'env {ENV[key]}'
        else:
            source[key] = f'--{key}'
    if all(v is None for k, v in given.items() if k != 'local_device_ids'):
        return {}
    missing = [f'--{k} (or {ENV[k]})' for k in ('coordinator_address', 'num_processes',
                                               'process_id') if given[k] is None]
    if missing:
        raise ConfigError('multi-process run: also set ' + ', '.join(missing))
    address = str(given['coordinator_address'])
    if not re.fullmatch(r'\[?[\w.:-]+\]?:\d{1,5}', address):
        raise ConfigError(f'coordinator_address={address!r} ({source["coordinator_address"]}) '
                          'must be host:port, e.g. 10.0.0.1:1234')
    n = _int('num_processes', given['num_processes'], source['num_processes'])
    pid = _int('process_id', given['process_id'], source['process_id'])
    if n < 1:
        raise ConfigError(f'num_processes={n} ({source["num_processes"]}) must be >= 1')
    if not 0 <= pid < n:
        raise ConfigError(f'process_id={pid} ({source["process_id"]}) must be in '
                          f'0..{n - 1} for num_processes={n}')
    ids = given['local_device_ids']
    if isinstance(ids, str):
        ids = [_int('local_device_ids', i, source['local_device_ids'])
               for i in ids.split(',') if i.strip()]
    return dict(coordinator_address=address, num_processes=n, process_id=pid,
                local_device_ids=ids)


def _enable_cpu_collectives():
    """Gloo for cross-process CPU collectives unless another one is chosen."""
    try:
        current = jax.config.jax_cpu_collectives_implementation
    except AttributeError:  # a jax without the option: nothing to choose
        return
    if current in (None, '', 'none'):
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               local_device_ids=None, mode='env'):
    """Starts JAX's multi-process runtime when asked; returns True if it did.

    mode 'env': when the arguments or the JAXAD_* environment variables name a
    coordinator (all of address, process count and process id are then
    required). 'auto': as 'env', else JAX's cluster auto-detection
    (`jax.distributed.initialize()` with no arguments). 'off': never.
    Must be called before any device is touched. One process initializes nothing.
    """
    if mode not in MODES:
        raise ConfigError(f'distributed={mode!r}: expected one of {", ".join(MODES)}')
    if mode == 'off':
        return False
    values = _explicit_values(coordinator_address, num_processes, process_id,
                              local_device_ids)
    if not values and mode == 'env':
        return False
    if values and values['num_processes'] == 1:
        return False
    _enable_cpu_collectives()
    try:
        jax.distributed.initialize(**values)
    except (RuntimeError, ValueError) as e:
        how = ('auto-detection found no cluster; pass --coordinator_address, '
               '--num_processes and --process_id' if not values else
               f'coordinator {values["coordinator_address"]}, process '
               f'{values["process_id"]}/{values["num_processes"]}')
        raise ConfigError(f'jax.distributed.initialize failed ({how}): {e}') from e
    logging.info('process %d of %d: %d local / %d global devices', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_main_process():
    return jax.process_index() == 0


def barrier(name):
    """Waits until every process reaches `name` (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def to_host(tree):
    """NumPy copy of a pytree of (possibly sharded) arrays, on every process.

    `jax.device_get` only reads this process's shards, so an array sharded
    over devices of other processes is first gathered (all processes must call).
    """
    def one(x):
        if (isinstance(x, jax.Array) and not x.is_fully_addressable
                and not x.is_fully_replicated):
            from jax.experimental import multihost_utils
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(jax.device_get(x))
    return jax.tree_util.tree_map(one, tree)
