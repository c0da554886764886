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
  cache_hits, cache_hit_s
                    of those, the ones the persistent compilation cache served (compile_s
                    then is the time to load the stored executable, not to compile it)
  programs, program_s
                    programs XLA compiled from scratch (cache misses) that took SMALL_S or
                    more: the distinct programs the worker built

Durations come from `jax.monitoring` (the events jax itself records), so nothing is patched.

With JAXAD_SUITE_PROGRAMS=1 the plugin also wraps jax's `compile_or_get_cached` (a private
function) and adds DIR/programs-<pid>.jsonl: for every compile of SMALL_S or more, the test,
the program's name, hit or miss, seconds, and two fingerprints of its StableHLO text without
source locations: `exact`, and `scalars` with every scalar constant blanked (programs that
differ only in a learning rate, a step count or another baked-in number share it).
`suite_time.py --cost --programs` sums them up. Each fingerprint costs about 30 ms of CPU (the
tiny CSI step's module as text), about 9 s over the suite's ~270 such compiles.
"""
import hashlib
import json
import os
import re
import resource
import time

import pytest

SMALL_S = 0.08
_EVENTS = {'/jax/core/compile/jaxpr_trace_duration': 'trace_s',
           '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower_s',
           '/jax/core/compile/backend_compile_duration': 'compile_s'}
_HIT_EVENT = '/jax/compilation_cache/cache_hits'
_totals = {'trace_s': 0.0, 'lower_s': 0.0, 'compile_s': 0.0, 'compiles': 0,
           'small_compiles': 0, 'small_compile_s': 0.0, 'cache_hits': 0, 'cache_hit_s': 0.0,
           'programs': 0, 'program_s': 0.0}
# jax records a cache hit inside the compile whose duration it records next (one thread
# compiles at a time in these tests), so the flag tells the two kinds of compile apart.
_hit = [False]
_test = [None]


def _event_listener(event, **_):
    if event == _HIT_EVENT:
        _hit[0] = True


def _listener(event, duration, **_):
    key = _EVENTS.get(event)
    if key is None:
        return
    _totals[key] += duration
    if key == 'compile_s':
        hit, _hit[0] = _hit[0], False
        _totals['compiles'] += 1
        if duration < SMALL_S:
            _totals['small_compiles'] += 1
            _totals['small_compile_s'] += duration
        if hit:
            _totals['cache_hits'] += 1
            _totals['cache_hit_s'] += duration
        elif duration >= SMALL_S:
            _totals['programs'] += 1
            _totals['program_s'] += duration


def _fingerprints(module):
    text = re.sub(r'loc\(.*?\)', '', str(module))  # source locations differ between call sites
    # a scalar's type is its element type alone (tensor<f32>); tensor<4xf32> is an array
    scalars = re.sub(r'dense<[^<>]*> : tensor<[a-z]+\d*>', 'SCALAR', text)
    return (hashlib.sha1(text.encode()).hexdigest()[:16],
            hashlib.sha1(scalars.encode()).hexdigest()[:16])


def _record_programs(directory):
    """Wraps jax's compile_or_get_cached to fingerprint every program of SMALL_S or more."""
    from jax._src import compiler
    compile_or_get_cached = compiler.compile_or_get_cached

    def recorded(backend, computation, *args, **kwargs):
        t0 = time.perf_counter()
        executable = compile_or_get_cached(backend, computation, *args, **kwargs)
        seconds = time.perf_counter() - t0
        if seconds >= SMALL_S:
            exact, scalars = _fingerprints(computation)
            name = str(computation.operation.attributes['sym_name']).strip('"')
            with open(os.path.join(directory, f'programs-{os.getpid()}.jsonl'), 'a') as f:
                f.write(json.dumps({'test': _test[0], 'name': name, 'hit': _hit[0],
                                    's': round(seconds, 3), 'exact': exact,
                                    'scalars': scalars}) + '\n')
        return executable
    compiler.compile_or_get_cached = recorded


def pytest_configure(config):
    import jax.monitoring
    jax.monitoring.register_event_listener(_event_listener)
    jax.monitoring.register_event_duration_secs_listener(_listener)
    directory = os.environ.get('JAXAD_SUITE_COST_DIR')
    if directory and os.environ.get('JAXAD_SUITE_PROGRAMS') == '1':
        _record_programs(directory)


def _cpu(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before = dict(_totals)
    _test[0] = item.nodeid.split('@')[0]
    t0, cpu0, children0 = time.time(), _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    yield
    row = {'test': _test[0], 'wall_s': time.time() - t0,
           'cpu_s': _cpu(resource.RUSAGE_SELF) - cpu0,
           'children_cpu_s': _cpu(resource.RUSAGE_CHILDREN) - children0}
    row.update({k: _totals[k] - before[k] for k in _totals})
    directory = os.environ.get('JAXAD_SUITE_COST_DIR')
    if directory:
        with open(os.path.join(directory, f'{os.getpid()}.jsonl'), 'a') as f:
            f.write(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                for k, v in row.items()}) + '\n')
