"""Mesh and shardings: one `data` axis over all devices (DESIGN.md §2).

Batches are global arrays sharded on their leading axis; params, batch stats
and optimizer state are replicated. Under `jax.jit` this makes BatchNorm
statistics and the NT-Xent negatives global with no hand-written collective.
"""
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxad.errors import ConfigError


def make_mesh(num_devices=None):
    """A 1-D ('data',) mesh with Auto axis type over the first `num_devices`."""
    devices = jax.devices()
    n = len(devices) if not num_devices else num_devices
    if n > len(devices):
        raise ConfigError(f'mesh asks for {n} devices but only {len(devices)} are visible')
    return jax.make_mesh((n,), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices[:n])


def data_sharding(mesh):
    return NamedSharding(mesh, P('data'))


def replicated(mesh):
    return NamedSharding(mesh, P())


def check_batch_divides(global_batch_size, mesh, what='batch_size'):
    n = mesh.devices.size
    if global_batch_size % n:
        raise ConfigError(
            f'{what}={global_batch_size} does not divide over the {n} devices of the mesh; '
            f'use a multiple of {n}')


def to_global(batch, mesh):
    """Host-local NumPy batch (dict of arrays) -> global arrays sharded on axis 0.

    Each process passes its own contiguous slice of the global batch
    (multi-host safe).
    """
    sharding = data_sharding(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
