"""The numbers behind the end-to-end tests' floors: each test's own config trained, and its
initial state scored untrained, per seed, under the test suite's XLA flags.

python benchmarks/e2e_floors.py --list
python benchmarks/e2e_floors.py --tests=mcl,msc --jobs=2
python benchmarks/e2e_floors.py --tests=csi --seeds=0,1,2 --modes=trained

Several end-to-end tests assert a floor (an AUROC, a loss ratio, an update size) that
should tell a trained model from an untrained one, and quote per-seed values in their
docstrings. REGISTRY below names each such test, builds its config and data with the test
module's own builder (so this measures what the test runs, at another seed), and the
metrics the test checks with their floors. Every measurement (test, seed, mode) runs in
its own process, with the environment tests/conftest.py sets before jax is imported:
8 emulated CPU devices (the config's num_devices picks how many the run uses),
--xla_backend_optimization_level=0, --xla_cpu_use_fusion_emitters=false where this jaxlib
knows it, jax_threefry_partitionable, and a compilation cache shared by the processes of
one invocation (cache hits give the same programs). Modes:

  trained    train_and_evaluate(config) as the test calls it, with config.seed = SEED
  untrained  the same with jaxad.loop.Run.train replaced by the identity: the initial state
             (with the method's constants, e.g. MSC's centre) fitted and scored, 0 steps
  lr0        the same as trained with optim.lr = 0 (for the loss checks: the same batches,
             no update); only where the registry asks for it

Prints one JSON line per measurement, then a Markdown table per test: per seed each
metric trained / untrained (/ lr0), the floor, and whether every trained value clears it
and every untrained value does not. A test whose docstring says its floor does not
separate trained from untrained runs (MCL, MSC: random features already separate those
sets) is marked so; its untrained values are expected to clear the AUROC floor. Never part
of the test pass/fail; the wall times are those of this machine under its load.
"""
import argparse
import concurrent.futures
import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# --------------------------------------------------------------------------------- builders
# Each runs in the child (jax already configured): (tmp_path, seed) -> config. They import the
# test modules, whose builders write the data under tmp_path.


def _csi(tmp, seed):
    from tests import test_train
    c = test_train.e2e_config(tmp)
    c.seed = seed
    return c


def _oecl(method):
    def build(tmp, seed):
        from tests import test_oecl
        c = test_oecl.e2e_config(method, tmp)
        c.seed = seed
        return c
    return build


def _anomem(tmp, seed):
    from tests import test_anomem
    c = test_anomem.few_anomaly_config(tmp)
    c.seed = seed
    return c


def _recontrast(tmp, seed):
    from tests import test_recontrast_train
    c = test_recontrast_train.e2e_config(tmp)
    c.seed = seed
    return c


def _mcl(tmp, seed):
    from tests import test_mcl
    from tests.helpers import make_npz
    npz = make_npz(tmp / 'tiny.npz')  # the module fixture's data
    c = test_mcl.tiny_mcl_config(npz, (0,))
    c.seed = seed
    return c


def _msc(tmp, seed):
    from tests import test_msc
    from tests.helpers import make_npz
    npz = make_npz(tmp / 'tiny.npz')  # the module fixture's data
    c = test_msc.msc_config(npz)
    c.seed = seed
    return c


def _quickstart_notebook(tmp, seed):
    """The config colabs/quickstart.ipynb builds with the test's injected tiny settings
    (tests/test_notebooks.py: QUICKSTART_TINY), on one device as the notebook's kernel has."""
    from launch import sweep
    from tests import test_notebooks
    tiny = {}
    exec(test_notebooks.QUICKSTART_TINY, tiny)
    c = sweep.apply_overrides(
        sweep.get_config(f"{sweep.repo_file(tiny['CONFIG_FILE'])}:{tiny['CONFIG_ARG']}"),
        tiny['OVERRIDES'])
    c.num_devices = 1
    c.seed = seed
    return c


# --------------------------------------------------------------------------------- extras
# (config, workdir, results) -> {metric: value}, beyond the results' own metrics.

def _loss_ratio(config, workdir, results):
    """MCL's loss check: the loss of step 2 over that of step 1 (metrics.jsonl)."""
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        losses = [json.loads(line)['loss'] for line in f]
    return {'loss_step2_over_step1': losses[1] / losses[0], 'losses': losses}


def _msc_update(config, workdir, results):
    """MSC's update check: ||dW|| / ||W|| of encoder layer4_0/conv2 from the initial state
    (built as the test builds it) to the final checkpoint."""
    import jax
    import numpy as np
    import optax
    from jaxad import loop
    from jaxad.methods import get_method
    from tests.test_msc import latest_state
    method = get_method(config)
    init = jax.jit(loop.make_init_fn(method, optax.identity(), (8, 8, 3)))(
        loop.init_key(config.seed))
    state = latest_state(workdir)
    k0 = np.asarray(init.params['encoder']['layer4_0']['conv2']['kernel'])
    k1 = np.asarray(state['params']['encoder']['layer4_0']['conv2']['kernel'])
    return {'layer4_update': float(np.linalg.norm(k1 - k0) / np.linalg.norm(k0))}


# --------------------------------------------------------------------------------- registry
# metrics: (name, where it is read, comparison, floor, modes it is checked in). `results.K`
# reads the run's results dict; `extra.K` the test's extra function's value.

def _auroc(name='image_AUROC', floor=0.85):
    return dict(name=name, source=f'results.{name}', op='>=', floor=floor,
                modes=('trained', 'untrained'))


REGISTRY = {
    'mcl': dict(
        test='tests/test_mcl.py::test_end_to_end_one_class_and_labelled',
        build=_mcl, seeds=(0, 1, 2, 3), modes=('trained', 'untrained', 'lr0'),
        extra=_loss_ratio, separates=False,
        metrics=[dict(_auroc('image_AUROC', 0.9), label='sei image_AUROC',
                      modes=('trained', 'untrained', 'lr0')),
                 dict(name='loss_step2_over_step1', source='extra.loss_step2_over_step1',
                      op='<', floor=0.8, modes=('trained', 'lr0'))]),
    'msc': dict(
        test='tests/test_msc.py::test_end_to_end_centre_fixed_at_step_0_and_frozen_parts_'
             'unchanged',
        build=_msc, seeds=(0, 1, 2), modes=('trained', 'untrained'), extra=_msc_update,
        separates=False,
        metrics=[dict(_auroc('image_AUROC', 0.9), label='knn image_AUROC'),
                 dict(name='layer4_update', source='extra.layer4_update', op='>',
                      floor=1e-3, modes=('trained', 'untrained'))]),
    'oecl': dict(
        test='tests/test_oecl.py::test_train_and_evaluate_end_to_end[oecl]',
        build=_oecl('oecl'), seeds=(0, 1, 2, 3, 4, 5), test_seed=2,
        metrics=[dict(_auroc('image_AUROC', 0.85), label='norm_mean image_AUROC')]),
    'self_oecl': dict(
        test='tests/test_oecl.py::test_train_and_evaluate_end_to_end[self_oecl]',
        build=_oecl('self_oecl'), seeds=(0, 1, 2, 3, 4, 5), test_seed=2,
        metrics=[dict(_auroc('image_AUROC', 0.9), label='norm_mean image_AUROC')]),
    'csi': dict(
        test='tests/test_train.py::test_end_to_end_writes_results_and_eval_mode_reuses_'
             'checkpoint',
        build=_csi, seeds=(0, 1, 2, 3, 4, 5),
        metrics=[dict(_auroc('image_AUROC', 0.85), label='csi image_AUROC')]),
    'anomem_few': dict(
        test='tests/test_anomem.py::test_few_anomaly_end_to_end',
        build=_anomem, seeds=(0, 1, 2, 3, 4, 5),
        metrics=[dict(_auroc('image_AUROC', 0.75), label='classifier image_AUROC')]),
    'recontrast': dict(
        test='tests/test_recontrast_train.py::test_end_to_end_on_the_synthetic_set_'
             'localises_defects',
        build=_recontrast, seeds=(0, 1, 2, 111),
        metrics=[_auroc('image_AUROC', 0.85), _auroc('pixel_AUROC', 0.85),
                 _auroc('AUPRO', 0.5)]),
    # No floor: 4 steps of a width-4 network do not beat the untrained state (the test
    # checks that the notebook runs; the AUROC must only be a number in [0, 1]).
    'quickstart_notebook': dict(
        test='tests/test_notebooks.py::test_quickstart_runs_on_cpu_with_a_gcs_workdir',
        build=_quickstart_notebook, seeds=(0, 1, 2, 3), separates=False,
        metrics=[_auroc('image_AUROC', 0.0)]),
}
# Cheapest first (the order --tests defaults to).
ORDER = ('mcl', 'msc', 'oecl', 'self_oecl', 'csi', 'anomem_few', 'quickstart_notebook',
         'recontrast')
for _name, _spec in REGISTRY.items():
    _spec.setdefault('modes', ('trained', 'untrained'))
    _spec.setdefault('test_seed', 0)
    _spec.setdefault('separates', True)
    _spec.setdefault('extra', None)

_OPS = {'>=': lambda v, f: v >= f, '>': lambda v, f: v > f, '<': lambda v, f: v < f}


# --------------------------------------------------------------------------------- child

def suite_env(cache_dir):
    """tests/conftest.py's environment for a child process (set before jax is imported)."""
    env = dict(os.environ)
    fast = env.get('JAXAD_TEST_FAST_COMPILE')
    if fast is None:
        probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'],
                               capture_output=True,
                               env=dict(env, XLA_FLAGS='--xla_cpu_use_fusion_emitters=false',
                                        JAX_PLATFORMS='cpu'))
        fast = '--xla_cpu_use_fusion_emitters=false' if probe.returncode == 0 else ''
    env['JAXAD_TEST_FAST_COMPILE'] = fast
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
                        ' --xla_backend_optimization_level=0 ' + fast).strip()
    env.setdefault('JAX_PLATFORMS', 'cpu')
    env['PYTHONPATH'] = os.pathsep.join(p for p in (_ROOT, env.get('PYTHONPATH')) if p)
    env['JAXAD_E2E_CACHE'] = cache_dir
    return env


def _read(source, results, extra):
    where, key = source.split('.', 1)
    value = (results if where == 'results' else extra).get(key)
    return None if value is None else float(value)


def child(name, seed, mode):
    """One measurement in this (fresh) process: a JSON line on stdout."""
    import jax
    jax.config.update('jax_threefry_partitionable', True)
    if os.environ.get('JAXAD_E2E_CACHE'):
        jax.config.update('jax_compilation_cache_dir', os.environ['JAXAD_E2E_CACHE'])
        jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    from jaxad import loop, train
    spec = REGISTRY[name]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'e2e-{name}-{seed}-{mode}-'))
    try:
        config = spec['build'](tmp, seed)
        if mode == 'untrained':
            loop.Run.train = lambda self, state, *args, **kwargs: state
        elif mode == 'lr0':
            config.optim.lr = 0.0
        workdir = str(tmp / 'run')
        t0 = time.time()
        results = train.train_and_evaluate(config, workdir)
        extra = spec['extra'](config, workdir, results) if spec['extra'] else {}
        wall = time.time() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    line = dict(test=spec['test'], name=name, seed=seed, mode=mode,
                step=results.get('step'), headline_score=results.get('headline_score'),
                metrics={m['name']: _read(m['source'], results, extra)
                         for m in spec['metrics']},
                run_s=round(wall, 1), num_devices=config.num_devices,
                device_count=jax.device_count(), xla_flags=os.environ.get('XLA_FLAGS'),
                jax=jax.__version__)
    if 'losses' in extra:
        line['losses'] = [round(x, 4) for x in extra['losses']]
    print(json.dumps(line), flush=True)


# --------------------------------------------------------------------------------- parent

def measure(name, seed, mode, env, timeout):
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', name,
                           str(seed), mode], capture_output=True, text=True, env=env,
                          cwd=_ROOT, timeout=timeout)
    wall = round(time.time() - t0, 1)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{')]
    if proc.returncode != 0 or not lines:
        return dict(test=REGISTRY[name]['test'], name=name, seed=seed, mode=mode,
                    error=proc.stderr[-2000:], rc=proc.returncode, wall_s=wall)
    return dict(lines[-1], wall_s=wall)


def _fmt(value):
    if value is None:
        return '-'
    return f'{value:.3f}' if abs(value) >= 0.01 or value == 0 else f'{value:.2g}'


def table(name, rows):
    """Markdown: per seed each metric in each mode, then per metric the floor's verdict."""
    spec = REGISTRY[name]
    modes = [m for m in spec['modes'] if any(r['mode'] == m for r in rows)]
    seeds = sorted({r['seed'] for r in rows})
    by = {(r['seed'], r['mode']): r for r in rows}
    cols = [(m, mode) for m in spec['metrics'] for mode in modes if mode in m['modes']]
    out = [f'### {name}: {spec["test"]} (the test runs seed {spec["test_seed"]})', '',
           '| seed | ' + ' | '.join(f'{m.get("label", m["name"])} {mode}'
                                    for m, mode in cols) + ' |',
           '|---' * (len(cols) + 1) + '|']
    for seed in seeds:
        cells = []
        for m, mode in cols:
            r = by.get((seed, mode))
            cells.append('error' if r and 'error' in r else
                         _fmt(r['metrics'][m['name']]) if r else '')
        out.append(f'| {seed} | ' + ' | '.join(cells) + ' |')
    out.append('')
    for m in spec['metrics']:
        clears = _OPS[m['op']]
        verdict = []
        for mode in modes:
            if mode not in m['modes']:
                continue
            vals = {r['seed']: r['metrics'][m['name']] for r in rows
                    if r['mode'] == mode and 'error' not in r
                    and r['metrics'][m['name']] is not None}
            if not vals:
                continue
            passing = [s for s, v in vals.items() if clears(v, m['floor'])]
            if mode == 'untrained' or (mode == 'lr0' and m['name'].startswith('loss')):
                ok = not passing
                verdict.append(f'every {mode} value misses it: {"yes" if ok else "no"}'
                               + ('' if ok else f' (seeds {sorted(passing)} clear it)'))
            else:
                failing = sorted(set(vals) - set(passing))
                verdict.append(f'every {mode} value clears it: {"yes" if not failing else "no"}'
                               + (f' (seeds {failing} do not)' if failing else ''))
        at_test_seed = [f'{mode} {_fmt(by[(spec["test_seed"], mode)]["metrics"][m["name"]])}'
                        for mode in modes if mode in m['modes']
                        and 'error' not in by.get((spec['test_seed'], mode), {'error': 1})]
        if at_test_seed:
            verdict.append(f'at the test\'s seed {spec["test_seed"]}: ' + ', '.join(at_test_seed))
        note = ('' if spec['separates'] or m['name'] not in ('image_AUROC',) else
                ' (the docstring: this floor does not separate trained from untrained runs)')
        out.append(f'- {m.get("label", m["name"])} {m["op"]} {m["floor"]}: '
                   + '; '.join(verdict) + note)
    walls = [r.get('wall_s', 0) for r in rows]
    out.append(f'- wall time per measurement: {min(walls):.0f}-{max(walls):.0f} s '
               f'({len(rows)} measurements)')
    return '\n'.join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--tests', default=','.join(ORDER),
                   help=f'comma-separated names (default, cheapest first): {",".join(ORDER)}')
    p.add_argument('--seeds', default='', help='comma-separated seeds (default: per test)')
    p.add_argument('--modes', default='', help='comma-separated modes (default: per test)')
    p.add_argument('--jobs', type=int, default=1, help='measurements in parallel')
    p.add_argument('--timeout', type=float, default=1800, help='seconds per measurement')
    p.add_argument('--list', action='store_true', help='print the registry and exit')
    p.add_argument('--tables_from', default='',
                   help="a file of this script's JSON lines: print their tables and exit")
    p.add_argument('--child', nargs=3, metavar=('NAME', 'SEED', 'MODE'), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        name, seed, mode = args.child
        return child(name, int(seed), mode)
    names = [n for n in args.tests.split(',') if n]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        p.error(f'unknown tests {unknown}; known: {list(REGISTRY)}')
    if args.list:
        for name in names:
            spec = REGISTRY[name]
            print(json.dumps(dict(
                name=name, test=spec['test'], seeds=list(spec['seeds']),
                test_seed=spec['test_seed'], modes=list(spec['modes']),
                separates=spec['separates'],
                metrics=[dict(name=m['name'], op=m['op'], floor=m['floor'],
                              modes=list(m['modes'])) for m in spec['metrics']])))
        return
    if args.tables_from:
        with open(args.tables_from) as f:
            rows = [json.loads(x) for x in f if x.startswith('{"test"')]
        for name in names:
            if any(r['name'] == name for r in rows):
                print(table(name, [r for r in rows if r['name'] == name]) + '\n')
        return
    seeds = [int(s) for s in args.seeds.split(',') if s]
    modes = [m for m in args.modes.split(',') if m]
    jobs = [(name, seed, mode) for name in names for seed in (seeds or REGISTRY[name]['seeds'])
            for mode in REGISTRY[name]['modes'] if not modes or mode in modes]
    cache = tempfile.mkdtemp(prefix='jaxad-e2e-floors-cache-')
    env = suite_env(cache)
    print(json.dumps(dict(kind='setup', date=datetime.datetime.now(datetime.timezone.utc)
                          .strftime('%Y-%m-%d %H:%M UTC'), command=' '.join(sys.argv),
                          xla_flags=env['XLA_FLAGS'], measurements=len(jobs),
                          jobs=args.jobs, loadavg=list(os.getloadavg()),
                          cpus=os.cpu_count())), flush=True)
    results = []
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            futures = [pool.submit(measure, *job, env, args.timeout) for job in jobs]
            for future in concurrent.futures.as_completed(futures):
                line = future.result()
                results.append(line)
                print(json.dumps(line), flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print()
    for name in names:
        rows = [r for r in results if r['name'] == name]
        if rows:
            print(table(name, rows))
            print()
    return 1 if any('error' in r for r in results) else 0


if __name__ == '__main__':
    sys.exit(main())
