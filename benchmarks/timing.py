"""Timing helpers shared by the benchmark scripts (imported as `timing` from benchmarks/)."""
import statistics
import time

import jax


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
