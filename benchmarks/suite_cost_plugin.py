"""A pytest plugin that records what each test costs: CPU time and JAX's compile work.

Loaded by `python benchmarks/suite_time.py --cost` (or by hand:
`PYTHONPATH=benchmarks JAXAD_SUITE_COST_DIR=DIR python -m pytest -p suite_cost_plugin ...`).
Each pytest process (the xdist workers) appends one JSON line per test to
DIR/<pid>.jsonl, timed over the test's setup, call and teardown on its worker:

  wall_s, cpu_s     wall and CPU seconds (user + system) of the worker itself
  children_cpu_s    CPU seconds of the subprocesses the worker waited for meanwhile (a
                    `python -m jaxad.main` run, a notebook kernel); a subprocess counts when
                    it is reaped, so a module fixture's server is charged to its last test
  trace_s, lower_s  jax's tracing to a jaxpr and its lowering to StableHLO, in the worker
  compile_s         XLA's compilation in the worker (a persistent-cache hit compiles nothing)
  compiles, small_compiles, small_compile_s
                    how many programs XLA compiled, and those that took under SMALL_S: on a
                    2-core CPU one eagerly run op (`x + 1` outside jit) compiles in ~15-25 ms
                    as a program of its own; a tiny network's train step takes seconds

Durations come from `jax.monitoring` (the events jax itself records), so nothing is patched.
"""
import json
import os
import resource
import time

import pytest

SMALL_S = 0.08
_EVENTS = {'/jax/core/compile/jaxpr_trace_duration': 'trace_s',
           '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower_s',
           '/jax/core/compile/backend_compile_duration': 'compile_s'}
_totals = {'trace_s': 0.0, 'lower_s': 0.0, 'compile_s': 0.0, 'compiles': 0,
           'small_compiles': 0, 'small_compile_s': 0.0}


def _listener(event, duration, **_):
    key = _EVENTS.get(event)
    if key is None:
        return
    _totals[key] += duration
    if key == 'compile_s':
        _totals['compiles'] += 1
        if duration < SMALL_S:
            _totals['small_compiles'] += 1
            _totals['small_compile_s'] += duration


def pytest_configure(config):
    import jax.monitoring
    jax.monitoring.register_event_duration_secs_listener(_listener)


def _cpu(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before = dict(_totals)
    t0, cpu0, children0 = time.time(), _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    yield
    row = {'test': item.nodeid.split('@')[0], 'wall_s': time.time() - t0,
           'cpu_s': _cpu(resource.RUSAGE_SELF) - cpu0,
           'children_cpu_s': _cpu(resource.RUSAGE_CHILDREN) - children0}
    row.update({k: _totals[k] - before[k] for k in _totals})
    directory = os.environ.get('JAXAD_SUITE_COST_DIR')
    if directory:
        with open(os.path.join(directory, f'{os.getpid()}.jsonl'), 'a') as f:
            f.write(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                for k, v in row.items()}) + '\n')
