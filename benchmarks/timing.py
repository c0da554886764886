"""Timing helpers shared by the benchmark scripts (imported as `timing` from benchmarks/)."""
import statistics
import time
import types

import jax
import numpy as np


def compiled_train_step(config, batch_size):
    """The trainer's jitted step for `config` at `batch_size`, compiled on synthetic uint8
    images of the config's size (the step's cost does not depend on pixel values).

    A namespace: mesh, method, state, images, batch, rng, compiled, compile_s.
    """
    from jaxad import loop, optim, sharding
    from jaxad.methods import get_method

    config.batch_size = batch_size
    mesh = sharding.make_mesh(config.num_devices)
    method = get_method(config)
    tx, schedule = optim.make_optimizer(config.optim, steps_per_epoch=100, total_steps=10_000,
                                        global_batch=batch_size)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    state = loop.init_state(method, tx, jax.random.key(0), shape, mesh)
    step_fn = loop.jit_train_step(loop.make_train_step(method, tx, schedule), mesh)
    images = np.random.default_rng(0).integers(0, 256, (batch_size,) + shape, dtype=np.uint8)
    batch = sharding.to_global({'image': images}, mesh)
    rng = jax.random.key(1)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, rng).compile()
    return types.SimpleNamespace(mesh=mesh, method=method, state=state, images=images,
                                 batch=batch, rng=rng, compiled=compiled,
                                 compile_s=time.perf_counter() - t0)


def median_step_seconds(compiled, state, batch, rng, steps, warmup):
    """Median wall time of `steps` calls of a compiled train step after `warmup` untimed ones.

    Each call is ended with block_until_ready, so the time is the device's, not dispatch's.
    """
    for _ in range(warmup):
        state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, rng)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compiled_flops(compiled):
    """FLOPs of a compiled program from XLA's cost analysis, or None where it has none."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get('flops', 0.0)) or None
    except Exception:  # cost analysis is best effort on some backends
        return None


# Dense peaks per device (TFLOP/s) for the dtypes the step computes in, keyed by
# (jax device_kind, config.model.dtype). float32 on NVIDIA GPUs counts TF32 tensor cores,
# which XLA uses for float32 convolutions and matmuls by default. Devices not listed
# (the CPU among them) need --peak_tflops for an MFU.
PEAK_TFLOPS = {('NVIDIA H100 80GB HBM3', 'bfloat16'): 989.0,
               ('NVIDIA H100 80GB HBM3', 'float32'): 494.0,
               ('NVIDIA H100 PCIe', 'bfloat16'): 756.0,
               ('NVIDIA H100 PCIe', 'float32'): 378.0,
               ('NVIDIA H200', 'bfloat16'): 989.0,
               ('NVIDIA H200', 'float32'): 494.0,
               ('NVIDIA A100-SXM4-80GB', 'bfloat16'): 312.0,
               ('NVIDIA A100-SXM4-80GB', 'float32'): 156.0,
               ('NVIDIA A100-SXM4-40GB', 'bfloat16'): 312.0,
               ('NVIDIA A100-SXM4-40GB', 'float32'): 156.0}


def peak_tflops(device_kind, dtype, override=0.0):
    """Peak TFLOP/s of one device: `override` when > 0, else PEAK_TFLOPS, else None."""
    return override if override and override > 0 else PEAK_TFLOPS.get((device_kind, dtype))


def mfu(flops, step_seconds, peak_tflops_per_device, num_devices=1):
    """Model FLOP utilisation: XLA's FLOPs of the step / step time / the devices' peak.

    `flops` is XLA's cost analysis of the whole (global) program; None where unknown.
    """
    if not flops or not peak_tflops_per_device:
        return None
    return flops / step_seconds / (peak_tflops_per_device * 1e12 * num_devices)


def peak_memory_bytes(devices):
    """The largest `peak_bytes_in_use` over `devices`, or None where a backend has no stats.

    The peak is the process's high-water mark since start-up, not per measurement.
    """
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # not implemented on some backends
            stats = None
        if stats and 'peak_bytes_in_use' in stats:
            peaks.append(int(stats['peak_bytes_in_use']))
    return max(peaks) if peaks else None
