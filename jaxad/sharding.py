"""Mesh and shardings: a ('model', 'data') mesh over the devices (docs/architecture.md §5).

A single detector uses model size 1: batches are global arrays sharded on
their leading axis over 'data'; params, batch stats and optimizer state are
replicated. Under `jax.jit` this makes BatchNorm statistics and the NT-Xent
negatives global with no hand-written collective.

A stack of K detectors (`jaxad.table`) puts its leading model axis on 'model'
(size gcd(K, devices)) and each model's batch on 'data', so ten one-class
detectors on eight devices run as 2 x 4.
"""
import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxad.errors import ConfigError


def make_mesh(num_devices=None, num_models=1):
    """A ('model', 'data') mesh (Auto axes) over the first `num_devices` devices.

    The model axis gets gcd(num_models, devices) devices, so a stack shards
    over models only as far as it divides evenly; the rest is data parallel.
    """
    devices = jax.devices()
    n = len(devices) if not num_devices else num_devices
    if n > len(devices):
        raise ConfigError(f'mesh asks for {n} devices but only {len(devices)} are visible')
    model = math.gcd(max(num_models, 1), n)
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((model, n // model), ('model', 'data'), axis_types=(auto, auto),
                         devices=devices[:n])


def data_sharding(mesh):
    """Leading axis over 'data' (replicated over 'model')."""
    return NamedSharding(mesh, P('data'))


def model_sharding(mesh):
    """Leading (stack) axis over 'model'."""
    return NamedSharding(mesh, P('model'))


def stacked_data_sharding(mesh):
    """(K, B, ...) arrays: models over 'model', each model's batch over 'data'."""
    return NamedSharding(mesh, P('model', 'data'))


def replicated(mesh):
    return NamedSharding(mesh, P())


def data_size(mesh):
    return mesh.shape['data']


def check_batch_divides(global_batch_size, mesh, what='batch_size'):
    n = data_size(mesh)
    if global_batch_size % n:
        raise ConfigError(
            f'{what}={global_batch_size} does not divide over the {n} devices of the mesh\'s '
            f'data axis; use a multiple of {n}')


def to_global(batch, mesh, sharding=None):
    """Host-local NumPy batch (dict of arrays) -> global arrays.

    Sharded on axis 0 over 'data' by default (each process passes its own
    contiguous slice of the global batch: multi-host safe); pass
    `stacked_data_sharding(mesh)` for (K, B, ...) stacks.
    """
    sharding = sharding or data_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
