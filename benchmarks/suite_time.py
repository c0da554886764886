"""How long the README's test command takes, and where the time goes.

    python benchmarks/suite_time.py [--venv=/tmp/fresh_venv [--extras='torch==2.13.0 -e .[tfds]']]
        [--workers=2] [--top=25] [--pytest_args='tests'] [--cost [--programs]] [--calibrate]

Runs `python -m pytest -q -n WORKERS --durations=0 tests` from the repository root (with
CI=true, as CI runs it) and prints one JSON object: the wall time, the CPU seconds of
pytest and every process it started (user and system, from the children's rusage), the
pass/fail line, each test module's summed test time (setup + call + teardown, as
`--durations` reports it: time on the test's worker, so a module's figure includes its
subprocesses' wall time) and the slowest tests.

With --venv=DIR the README's whole command is timed as a newcomer runs it: a fresh virtual
environment at DIR (removed first), `pip install -q -e '.[test]'` into it (its own wall
time: `install_s`, from pip's cache when one is warm), then the tests with that
environment's Python. The total is `install_s + wall_s`. --extras are then installed into
it as CI installs them before the tests (torch for the reference tests, the tfds extra;
`extras_s`, not part of the README's command): the tests run with CI=true, where a missing
reference package fails instead of skipping.

With --cost, benchmarks/suite_cost_plugin.py records each test's CPU seconds (its worker's
and its subprocesses') and its worker's jax tracing, lowering and XLA compile seconds, with
how many programs were compiled and how many of them were small (an eagerly run op compiles
as a program of its own), how many came from the persistent compilation cache, and how many
were compiled from scratch (`programs`); the output gains `cost`: those totals and the
costliest modules. --programs adds `programs`: the workers' distinct programs and their
compile seconds, and how many would remain if programs that differ only in scalar constants
(a learning rate, a step count) were one.

On a 2-core machine the suite is CPU-bound (pytest's two workers and their subprocesses keep
both cores busy), so `cpu_s` is the figure to compare between commits; the wall time also
moves with the machine's load.

The machine's own speed moves too: on the 2-core VM the same tests took 1575 CPU-s in one run
and 1970 in another 80 minutes later (9bf0cd3 and 31225fe, which differ by one lazy import),
XLA's compile time 325 s against 424 s. With --calibrate a fixed jax workload (CALIBRATION:
trace, lower, compile and run five small conv nets, no compilation cache, XLA:CPU's unoptimised
backend as in the tests) runs in the tests' Python before and after the tests, and
`calibration_cpu_s` gives its CPU seconds: compare runs by `cpu_s / calibration_cpu_s`, or
rerun when the two calibrations disagree.
"""
import argparse
import collections
import glob
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DURATION = re.compile(r'^([0-9.]+)s (setup|call|teardown)\s+(\S+)')


def fresh_venv(path):
    """A new virtual environment at `path` with the test extras; (its python, seconds)."""
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.time()
    subprocess.run([sys.executable, '-m', 'venv', path], check=True)
    python = os.path.join(path, 'bin', 'python')
    pip_install(python, ['-e', '.[test]'])
    return python, time.time() - t0


def pip_install(python, specs):
    subprocess.run([python, '-m', 'pip', 'install', '-q', *specs], cwd=REPO, check=True)


# Independent of jaxad's code, so it measures the machine, not the commit.
CALIBRATION = r'''
import resource
import jax
import jax.numpy as jnp


def net(params, x, scale):
    for w in params:
        x = jax.nn.relu(jax.lax.conv_general_dilated(
            x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
    return jnp.mean(x ** 2) * scale


params = [jax.random.normal(k, (3, 3, 8, 8)) * 0.3
          for k in jax.random.split(jax.random.key(0), 12)]
x = jnp.ones((8, 16, 16, 8))
start = resource.getrusage(resource.RUSAGE_SELF)
for scale in (1.0, 2.0, 3.0, 4.0, 5.0):  # a distinct program each: traced, compiled afresh
    step = jax.jit(jax.value_and_grad(lambda p, x, s=scale: net(p, x, s)))
    jax.block_until_ready(step(params, x))
end = resource.getrusage(resource.RUSAGE_SELF)
print(end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime)
'''


def calibrate(python):
    """CPU seconds of CALIBRATION in `python` (a fresh process, no compilation cache)."""
    env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_ENABLE_COMPILATION_CACHE='false',
               XLA_FLAGS='--xla_backend_optimization_level=0')
    proc = subprocess.run([python, '-c', CALIBRATION], capture_output=True, text=True,
                          env=env, cwd=tempfile.gettempdir(), check=True)
    return round(float(proc.stdout.split()[-1]), 2)


def summarize_cost(directory, top):
    """Totals of suite_cost_plugin.py's per-test lines, and the `top` costliest modules."""
    rows = [json.loads(line) for path in glob.glob(os.path.join(directory, '[0-9]*.jsonl'))
            for line in open(path)]
    keys = ('cpu_s', 'children_cpu_s', 'trace_s', 'lower_s', 'compile_s', 'compiles',
            'small_compiles', 'small_compile_s', 'cache_hits', 'cache_hit_s', 'programs',
            'program_s')
    totals = {k: round(sum(r[k] for r in rows), 3) for k in keys}
    modules = collections.defaultdict(collections.Counter)
    for r in rows:
        modules[r['test'].split('::')[0]].update({k: r[k] for k in keys})
    costliest = sorted(modules, key=lambda m: -(modules[m]['cpu_s']
                                                + modules[m]['children_cpu_s']))[:top]
    return {'tests': len(rows), 'totals': totals,
            'modules': {m: {k: round(modules[m][k], 3) for k in keys} for m in costliest}}


def summarize_programs(directory):
    """The workers' programs of SMALL_S or more (suite_cost_plugin.py, JAXAD_SUITE_PROGRAMS):
    how many distinct ones were compiled from scratch and in how many seconds (a program's
    first compile, hit or not, counts once), and the same when programs that differ only in
    scalar constants count as one (what passing those numbers in at run time would save)."""
    rows = [json.loads(line) for path in glob.glob(os.path.join(directory, 'programs-*.jsonl'))
            for line in open(path)]

    def distinct(key):
        first = {}
        for r in rows:
            if not r['hit']:  # a miss compiled it; keep the costliest compile of each
                first[r[key]] = max(first.get(r[key], 0.0), r['s'])
        return {'count': len(first), 'compile_s': round(sum(first.values()), 1)}

    hits = [r for r in rows if r['hit']]
    return {'compiles': len(rows), 'compile_s': round(sum(r['s'] for r in rows), 1),
            'cache_hits': len(hits), 'cache_hit_s': round(sum(r['s'] for r in hits), 1),
            'distinct': distinct('exact'), 'distinct_ignoring_scalars': distinct('scalars')}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--venv', default='', help='time a fresh venv install here first')
    parser.add_argument('--extras', default='',
                        help='with --venv: pip arguments for what CI installs too, '
                        "e.g. 'torch==2.13.0 -e .[tfds]'")
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--top', type=int, default=25)
    parser.add_argument('--pytest_args', default='tests')
    parser.add_argument('--cost', action='store_true',
                        help='record per-test CPU and jax compile work (suite_cost_plugin.py)')
    parser.add_argument('--programs', action='store_true',
                        help='with --cost: fingerprint the programs the workers compile '
                        '(distinct, and distinct up to scalar constants)')
    parser.add_argument('--calibrate', action='store_true',
                        help='time a fixed jax workload before and after the tests')
    args = parser.parse_args()

    out = {'commit': subprocess.run(['git', '-C', REPO, 'rev-parse', '--short', 'HEAD'],
                                    capture_output=True, text=True).stdout.strip(),
           'cores': os.cpu_count(), 'workers': args.workers}
    python = sys.executable
    if args.venv:
        python, out['install_s'] = fresh_venv(args.venv)
        if args.extras:
            t0 = time.time()
            pip_install(python, args.extras.split())
            out['extras_s'] = round(time.time() - t0, 1)
    env, plugin, cost_dir = dict(os.environ, CI='true'), [], None
    if args.cost:
        cost_dir = tempfile.mkdtemp(prefix='jaxad-suite-cost-')
        env['JAXAD_SUITE_COST_DIR'] = cost_dir
        if args.programs:
            env['JAXAD_SUITE_PROGRAMS'] = '1'
        # the plugin alone on the path (every test subprocess inherits it), not benchmarks/
        plugin_dir = os.path.join(cost_dir, 'plugin')
        os.mkdir(plugin_dir)
        os.symlink(os.path.join(REPO, 'benchmarks', 'suite_cost_plugin.py'),
                   os.path.join(plugin_dir, 'suite_cost_plugin.py'))
        env['PYTHONPATH'] = os.pathsep.join(p for p in (plugin_dir, env.get('PYTHONPATH')) if p)
        plugin = ['-p', 'suite_cost_plugin']
    calibration = [calibrate(python)] if args.calibrate else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.run(
        [python, '-m', 'pytest', '-q', '-n', str(args.workers), '--durations=0', *plugin,
         *args.pytest_args.split()], cwd=REPO, env=env, capture_output=True, text=True)
    out['wall_s'] = round(time.time() - t0, 1)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out['cpu_user_s'] = round(after.ru_utime - before.ru_utime, 1)
    out['cpu_sys_s'] = round(after.ru_stime - before.ru_stime, 1)
    out['cpu_s'] = round(out['cpu_user_s'] + out['cpu_sys_s'], 1)
    if calibration:
        out['calibration_cpu_s'] = {'before': calibration[0], 'after': calibrate(python)}
    if 'install_s' in out:
        out['install_s'] = round(out['install_s'], 1)
        out['total_s'] = round(out['install_s'] + out['wall_s'], 1)
    out['returncode'] = proc.returncode
    lines = proc.stdout.splitlines()
    out['summary'] = next((line.strip('= ') for line in reversed(lines)
                           if ' passed' in line or ' failed' in line),
                          lines[-1] if lines else '')
    per_test, per_module = collections.Counter(), collections.Counter()
    for line in lines:
        m = DURATION.match(line)
        if m:
            seconds, test = float(m.group(1)), m.group(3).split('@')[0]
            per_test[test] += seconds
            per_module[test.split('::')[0]] += seconds
    out['summed_test_s'] = round(sum(per_module.values()), 1)
    out['modules'] = {k: round(v, 1) for k, v in per_module.most_common()}
    out['slowest'] = {k: round(v, 1) for k, v in per_test.most_common(args.top)}
    if cost_dir:
        out['cost'] = summarize_cost(cost_dir, args.top)
        if args.programs:
            out['programs'] = summarize_programs(cost_dir)
        shutil.rmtree(cost_dir, ignore_errors=True)
    print(json.dumps(out))
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-2000:])
    return proc.returncode


if __name__ == '__main__':
    sys.exit(main())
