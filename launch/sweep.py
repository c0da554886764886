"""Sweeps for scaling studies: expand, launch, collect, plot (the command line and its library).

python launch/sweep.py --config=configs/scaling_cifar.py --root=/tmp/study
python launch/sweep.py --config=configs/scaling_cifar.py --root=/tmp/study \
    --axis=batch_size=256,512 --axis=seed=0,1 --format=commands
python launch/sweep.py --config=configs/scaling_cifar.py:epochs=200 --root=$SCRATCH/study \
    --format=slurm_array --sbatch=--gpus-per-node=1 --sbatch=--time=08:00:00 > study.sbatch
python launch/sweep.py --config=configs/scaling_tiny.py --root=/tmp/study_tiny --format=run

The axes come from the config file's `get_sweep()`; `--axis=field=v1,v2`
(repeatable, any dotted config field) replaces them. Formats:
  commands     one `python -m jaxad.main ...` line per run (pipe to a scheduler or GNU parallel)
  slurm_array  an sbatch script, `#SBATCH --array=0-(n-1)`, run i = array task i
  run          runs them here one after another (finished runs are skipped), then
               prints the collected table

A sweep is a set of runs of one config file, each with `--config.k=v`
overrides. Axes are any dotted config fields (`batch_size`, `seed`,
`optim.lr_rule`, ...); a config file may define `get_sweep(arg=None)`
returning either a dict of axes (field -> list of values; the cartesian
product, first axis slowest) or a list of override dicts (one run each).
From Python (the repository root on sys.path; launch/ is a tool of the
checkout, not part of the installed `jaxad` package):

    from launch import sweep
    runs = sweep.expand({'batch_size': [16, 32], 'seed': [0, 1]})
    sweep.commands('configs/scaling_tiny.py', runs, '/tmp/study')  # shell lines
    sweep.run_local('configs/scaling_tiny.py', runs, '/tmp/study')  # or run them here
    rows = sweep.collect('/tmp/study')   # one row per run directory
    sweep.plot_scaling(rows, '/tmp/study/scaling.png')

Each run writes to `root/<run name>` (the usual run directory: config.json,
metrics.jsonl, results.json). `root/sweep.json` records the runs' names and
overrides. `colabs/scaling_study.ipynb` is the notebook over this module.
Importing this module does not import jax and defines no command-line flags
(they are defined only when it runs as a script); matplotlib is needed only
by `plot_scaling` (extra 'plots').
"""
import ast
import copy
import csv
import dataclasses
import importlib.util
import inspect
import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys

from absl import app, flags
from ml_collections.config_flags import config_path as _config_path
from ml_collections.config_flags import tuple_parser

from jaxad.errors import ConfigError, JaxadError

MANIFEST = 'sweep.json'
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # launch/..
TABLE_COLUMNS = ('name', 'global_batch', 'lr_rule', 'seed', 'peak_lr', 'steps',
                 'images_per_sec', 'final_loss', 'image_AUROC')


# ----------------------------------------------------------------------------- runs

@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: its directory name and its config overrides."""
    name: str
    overrides: dict

    @property
    def label(self):
        """'batch_size=64,seed=1': the overrides as the command line writes them."""
        return ','.join(f'{k}={format_value(v)}' for k, v in self.overrides.items())

    def flags(self):
        """['--config.batch_size=64', '--config.seed=1']."""
        return [f'--config.{k}={format_value(v)}' for k, v in self.overrides.items()]


def format_value(value):
    """A value as `--config.k=v` parses it back (bools as true/false)."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (list, tuple)):
        return str(tuple(value))
    return str(value)


def parse_value(text):
    """'256' -> 256, '1e-3' -> 0.001, 'sqrt' -> 'sqrt' (a Python literal, else the string)."""
    if text in ('true', 'false'):
        return text == 'true'
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text


def parse_axis(text):
    """'batch_size=256,512' -> ('batch_size', [256, 512])."""
    key, eq, values = text.partition('=')
    key = key.strip().removeprefix('--config.').removeprefix('config.')
    if not eq or not key or not values:
        raise ConfigError(f'axis {text!r}: expected field=v1,v2,... (e.g. batch_size=256,512)')
    return key, [parse_value(v.strip()) for v in values.split(',') if v.strip()]


_UNSAFE = re.compile(r'[^A-Za-z0-9._+-]')


def _short_keys(keys):
    """Dotted field -> its last part, unless two fields share that last part."""
    leaves = [k.rsplit('.', 1)[-1] for k in keys]
    return {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}


def run_name(overrides, short=None):
    """A filesystem- and shell-safe directory name: 'batch_size-64__seed-1'."""
    if not overrides:
        return 'base'
    short = short or _short_keys(list(overrides))
    return '__'.join(f'{short[k]}-{_UNSAFE.sub("_", format_value(v))}'
                     for k, v in overrides.items())


def expand(axes):
    """Runs of a sweep, in a deterministic order.

    `axes`: a dict of dotted field -> list of values (cartesian product in the
    dict's order, first field slowest), or a list of override dicts (one run
    each, in order). Returns a list of `Run`; names are unique.
    """
    if isinstance(axes, dict):
        for key, values in axes.items():
            if isinstance(values, (str, bytes)) or not hasattr(values, '__iter__'):
                raise ConfigError(f'sweep axis {key!r}: expected a list of values, got {values!r}')
        keys = list(axes)
        combos = [dict(zip(keys, values)) for values in itertools.product(*axes.values())]
    elif isinstance(axes, (list, tuple)):
        combos = [dict(o) for o in axes]
        for o in combos:
            if not all(isinstance(k, str) for k in o):
                raise ConfigError(f'sweep run {o!r}: keys must be dotted config fields')
    else:
        raise ConfigError(f'a sweep is a dict of axes or a list of override dicts, not {axes!r}')
    short = _short_keys(sorted({k for o in combos for k in o}))
    runs, seen = [], {}
    for o in combos:
        name = run_name(o, short)
        if name in seen:
            seen[name] += 1
            name = f'{name}__{seen[name]}'
        else:
            seen[name] = 0
        runs.append(Run(name, o))
    return runs


def axis_values(runs, field):
    """The distinct values of `field` over `runs`, in first-seen order."""
    out = []
    for r in runs:
        if field in r.overrides and r.overrides[field] not in out:
            out.append(r.overrides[field])
    return out


# -------------------------------------------------------------------- config files

def split_config(config):
    """'configs/x.py:a=1' -> ('configs/x.py', 'a=1'); no ':' -> (path, None)."""
    path, colon, arg = str(config).partition(':')
    return path, (arg if colon else None)


def load_module(path):
    """Imports a Python file (a config file) by path."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f'config file {path} does not exist')
    name = '_jaxad_cfg_' + re.sub(r'\W', '_', os.path.splitext(os.path.relpath(path, '/'))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _call_with_arg(fn, arg):
    if arg is None or not inspect.signature(fn).parameters:
        return fn()
    return fn(arg)


def get_config(config):
    """The ConfigDict of 'file.py[:arg]', as `--config=file.py[:arg]` builds it."""
    path, arg = split_config(config)
    return _call_with_arg(load_module(path).get_config, arg)


def get_sweep(config):
    """The config file's `get_sweep(arg)` (axes dict or list of overrides), or None."""
    path, arg = split_config(config)
    fn = getattr(load_module(path), 'get_sweep', None)
    return None if fn is None else _call_with_arg(fn, arg)


def runs_for(config, axes=None):
    """Runs from explicit `axes` (dict, list or 'field=v1,v2' strings), else the file's sweep."""
    if axes and all(isinstance(a, str) for a in axes):
        axes = dict(parse_axis(a) for a in axes)
    if not axes:
        axes = get_sweep(config)
        if axes is None:
            raise ConfigError(f'{split_config(config)[0]} has no get_sweep(); give the axes '
                              '(e.g. --axis=batch_size=256,512)')
    return expand(axes)


_PARSERS = {float: flags.FloatParser(), bool: flags.BooleanParser(),
            int: flags.IntegerParser(), tuple: tuple_parser.TupleParser()}


def _typed(field, current_type, value):
    """`value` typed as `--config.field=value` would type it (the field's own type)."""
    if current_type is None or current_type is type(None):
        return parse_value(value) if isinstance(value, str) else value
    if isinstance(value, str) and current_type in _PARSERS:
        try:
            return _PARSERS[current_type].parse(value)
        except ValueError as e:
            raise ConfigError(f'{field}={value!r}: not a {current_type.__name__} ({e})') from None
    if current_type is str:
        return format_value(value) if not isinstance(value, str) else value
    if current_type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if current_type is tuple and isinstance(value, list):
        return tuple(value)
    if not isinstance(value, current_type):
        raise ConfigError(f'{field}={value!r}: expected a {current_type.__name__}')
    return value


def apply_overrides(config, overrides):
    """A copy of `config` with dotted-field overrides, typed like `--config.k=v`.

    Like `lock_config=True` on the command line, an unknown field is an error.
    """
    config = copy.deepcopy(config)
    for field, value in overrides.items():
        try:
            kind = _config_path.get_type(field, config)
        except (AttributeError, KeyError, IndexError, ValueError):
            raise ConfigError(f'unknown config field {field!r} in sweep overrides') from None
        _config_path.set_value(field, config, _typed(field, kind, value))
    return config


# ----------------------------------------------------------------------- launching

def commands(config, runs, root, extra_flags=(), python='python'):
    """One shell command line per run: `python -m jaxad.main ... --workdir=root/<name>`."""
    out = []
    for run in runs:
        argv = [python, '-m', 'jaxad.main', f'--config={config}', *run.flags(),
                f'--workdir={os.path.join(root, run.name)}', *extra_flags]
        out.append(' '.join(shlex.quote(a) for a in argv))
    return out


def slurm_array_script(config, runs, root, extra_flags=(), python='python', sbatch=(),
                       job_name='jaxad-sweep', setup=()):
    """An sbatch script running run i as array task i (`--array=0-(n-1)`).

    `sbatch`: extra `#SBATCH` options ('--gpus-per-node=1', '--time=04:00:00').
    `setup`: shell lines run before the command (module load, venv activation).
    """
    if not runs:
        raise ConfigError('the sweep has no runs')
    lines = ['#!/bin/bash',
             f'#SBATCH --job-name={job_name}',
             f'#SBATCH --array=0-{len(runs) - 1}',
             '#SBATCH --nodes=1',
             '#SBATCH --ntasks=1',
             '#SBATCH --output=slurm-%x-%A_%a.out']
    lines += [f'#SBATCH {opt}' for opt in sbatch]
    lines += ['# One run of the sweep per array task; generated by launch/sweep.py.',
              '# Submit from the jaxad checkout (relative paths resolve there): sbatch FILE',
              'set -euo pipefail',
              'cd "${SLURM_SUBMIT_DIR:-.}"', *setup,
              f'mkdir -p {shlex.quote(root)}',
              'COMMANDS=(']
    lines += [f'  {shlex.quote(c)}' for c in commands(config, runs, root, extra_flags, python)]
    lines += [')',
              'CMD="${COMMANDS[$SLURM_ARRAY_TASK_ID]}"',
              'echo "array task $SLURM_ARRAY_TASK_ID: $CMD"',
              'eval "$CMD"', '']
    return '\n'.join(lines)


def write_manifest(root, config, runs):
    """Adds the runs to `root/sweep.json` (name -> overrides), keeping earlier ones."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, MANIFEST)
    manifest = {'config': str(config), 'runs': {}}
    if os.path.exists(path):
        with open(path) as f:
            manifest['runs'].update(json.load(f).get('runs', {}))
    manifest['runs'].update({r.name: r.overrides for r in runs})
    with open(path, 'w') as f:
        json.dump(manifest, f, indent=2, default=str)
    return path


def is_done(workdir):
    return os.path.exists(os.path.join(workdir, 'results.json'))


def run_local(config, runs, root, mode='inprocess', extra_flags=(), python=None, log=print):
    """Runs the sweep here, one run after another; finished runs are skipped.

    mode='inprocess' calls `jaxad.train.train_and_evaluate` on the config with
    each run's overrides; mode='subprocess' runs each command line with
    `python` (default: this interpreter), passing `extra_flags` to it.
    Returns {run name: 'done' | 'skipped'}; a failing run raises.
    """
    if mode not in ('inprocess', 'subprocess'):
        raise ConfigError(f"run_local mode={mode!r}: choose 'inprocess' or 'subprocess'")
    path, arg = split_config(config)
    config = os.path.abspath(path) + ('' if arg is None else f':{arg}')
    write_manifest(root, config, runs)
    base = get_config(config) if mode == 'inprocess' else None
    status = {}
    for i, run in enumerate(runs):
        workdir = os.path.join(root, run.name)
        if is_done(workdir):
            log(f'[{i + 1}/{len(runs)}] {run.name}: results.json exists, skipped')
            status[run.name] = 'skipped'
            continue
        log(f'[{i + 1}/{len(runs)}] {run.name}: {run.label or "(no overrides)"}')
        if mode == 'inprocess':
            from jaxad import train  # imports jax: only when running
            train.train_and_evaluate(apply_overrides(base, run.overrides), workdir)
        else:
            cmd = commands(config, [run], root, extra_flags, python or sys.executable)[0]
            subprocess.run(shlex.split(cmd), check=True, cwd=REPO_ROOT)
        status[run.name] = 'done'
    return status


def run_benchmark(config, batch_sizes, steps=20, warmup=2, extra_flags=(), python=None,
                  timeout=None):
    """Runs benchmarks/throughput.py for `batch_sizes`; returns its JSON lines as dicts."""
    path, arg = split_config(config)
    config = os.path.abspath(path) + ('' if arg is None else f':{arg}')
    argv = [python or sys.executable, repo_file('benchmarks/throughput.py'),
            f'--config={config}', '--batch_sizes=' + ','.join(str(int(b)) for b in batch_sizes),
            f'--steps={int(steps)}', f'--warmup={int(warmup)}', *extra_flags]
    proc = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=timeout)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]


def repo_file(relpath):
    """A file of the jaxad checkout (configs/, benchmarks/ are not installed modules)."""
    path = os.path.join(REPO_ROOT, relpath)
    if not os.path.exists(path):
        raise ConfigError(f'{relpath} not found under {REPO_ROOT}: install jaxad from a git '
                          'checkout (pip install -e .) to use its configs and benchmarks')
    return path


# ------------------------------------------------------------------------ results

def read_jsonl(path):
    """The records of a JSONL file ([] if absent); a torn last line is ignored."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def median_rate(metrics, key='images_per_sec'):
    """Median of `key` over logged points, the first (which includes compilation) skipped.

    None with fewer than two logged points: a rate that includes compilation
    would be misleading (lower `log_every` for short runs).
    """
    values = [m[key] for m in metrics if key in m][1:]
    return statistics.median(values) if values else None


def _get(d, dotted, default=None):
    for part in dotted.split('.'):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def collect(root):
    """One row per run directory under `root` (a directory holding config.json).

    Row keys: name, overrides (from root/sweep.json, else {}), config (the
    run's config.json), global_batch, seed, lr_rule ('none' when the config
    has no optim.lr_rule), peak_lr (largest logged lr), steps (last logged
    step), images_per_sec and steps_per_sec (medians, first logged point
    skipped), final_loss, image_AUROC (None until results.json exists), done.
    """
    manifest = {}
    if os.path.exists(os.path.join(root, MANIFEST)):
        with open(os.path.join(root, MANIFEST)) as f:
            manifest = json.load(f).get('runs', {})
    rows = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        workdir = os.path.join(root, name)
        if not os.path.isfile(os.path.join(workdir, 'config.json')):
            continue
        with open(os.path.join(workdir, 'config.json')) as f:
            config = json.load(f)
        metrics = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
        results = {}
        if is_done(workdir):
            with open(os.path.join(workdir, 'results.json')) as f:
                results = json.load(f)
        auroc = results.get('image_AUROC', _get(results, 'mean.image_AUROC'))
        lrs = [m['lr'] for m in metrics if 'lr' in m]
        rows.append({
            'name': name, 'overrides': manifest.get(name, {}), 'config': config,
            'global_batch': config.get('batch_size'), 'seed': config.get('seed'),
            'lr_rule': _get(config, 'optim.lr_rule', 'none'),
            'peak_lr': max(lrs) if lrs else None,
            'steps': metrics[-1]['step'] if metrics else 0,
            'images_per_sec': median_rate(metrics, 'images_per_sec'),
            'steps_per_sec': median_rate(metrics, 'steps_per_sec'),
            'final_loss': metrics[-1].get('loss') if metrics else None,
            'image_AUROC': auroc, 'done': bool(results)})
    rows.sort(key=lambda r: (str(r['lr_rule']), r['global_batch'] or 0, r['seed'] or 0, r['name']))
    return rows


def _cell(value):
    if isinstance(value, float):
        return f'{value:.4g}'
    return '' if value is None else str(value)


def format_table(rows, columns=TABLE_COLUMNS):
    """A Markdown table of `rows` (the scalar columns of `collect`)."""
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(_cell(r.get(c)) for c in columns) + ' |' for r in rows]
    return '\n'.join(lines)


def write_table(rows, path, columns=TABLE_COLUMNS):
    """`rows` as CSV (path ending .csv) or Markdown (anything else); returns path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w', newline='') as f:
        if path.endswith('.csv'):
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows([[r.get(c) for c in columns] for r in rows])
        else:
            f.write(format_table(rows, columns) + '\n')
    return path


def aggregate(rows, key, group_by='lr_rule', x='global_batch'):
    """{group: [(x, mean, std, n), ...] sorted by x}: `key` averaged over seeds (and repeats).

    Rows whose `key` is None are left out; std is 0 for a single run.
    """
    points = {}
    for r in rows:
        if r.get(key) is None or r.get(x) is None:
            continue
        points.setdefault(r.get(group_by), {}).setdefault(r[x], []).append(float(r[key]))
    out = {}
    for group, by_x in points.items():
        out[group] = [(bx, statistics.fmean(v), statistics.pstdev(v) if len(v) > 1 else 0.0,
                       len(v)) for bx, v in sorted(by_x.items())]
    return dict(sorted(out.items(), key=lambda kv: str(kv[0])))


def plot_scaling(rows, path=None, bench=None, group_by='lr_rule', title=None):
    """Images/s and image AUROC against global batch (log2 axis), one line per group.

    Points are means over seeds with their standard deviation as error bars.
    `bench`: optional throughput.py records (global_batch, images_per_s),
    drawn dashed on the images/s panel. Saves to `path` when given; returns
    the matplotlib Figure (no pyplot state is touched).
    """
    from matplotlib.figure import Figure  # optional dependency: pip install jaxad[plots]
    fig = Figure(figsize=(11, 4.2), layout='constrained')
    ax_rate, ax_auc = fig.subplots(1, 2)
    batches = sorted({r['global_batch'] for r in rows if r.get('global_batch')}
                     | {b['global_batch'] for b in bench or ()})
    panels = ((ax_rate, 'images_per_sec', 'images / s (median over logged steps)'),
              (ax_auc, 'image_AUROC', 'image AUROC'))
    for ax, key, ylabel in panels:
        for group, pts in aggregate(rows, key, group_by).items():
            xs, means, stds, _ = zip(*pts)
            ax.errorbar(xs, means, yerr=stds, marker='o', capsize=3,
                        label=f'{group_by}={group}' if group is not None else 'runs')
        ax.set_xlabel('global batch (images per step)')
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    if bench:
        pts = sorted((b['global_batch'], b['images_per_s']) for b in bench)
        ax_rate.plot(*zip(*pts), linestyle='--', marker='s', color='gray',
                     label='throughput.py (train step only)')
    for ax in (ax_rate, ax_auc):
        if batches:
            ax.set_xscale('log', base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.minorticks_off()
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    ax_rate.set_title('throughput')
    ax_auc.set_title('detection quality')
    if title:
        fig.suptitle(title)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=100)
    return fig


# -------------------------------------------------------------------- command line

def _define_flags():
    """The command line's flags; defined only when this file runs as a script."""
    f = {}
    f['config'] = flags.DEFINE_string('config', None, 'Config file, optionally with :args.')
    f['root'] = flags.DEFINE_string('root', None,
                                    'Sweep directory; run <name> writes to root/<name>.')
    f['axis'] = flags.DEFINE_multi_string('axis', [], 'field=v1,v2,... (repeatable); replaces '
                                          "the config's get_sweep().")
    f['format'] = flags.DEFINE_enum('format', 'commands', ['commands', 'slurm_array', 'run'],
                                    'What to do with the runs.')
    f['extra'] = flags.DEFINE_multi_string('extra', [], 'Extra flag for every jaxad.main '
                                           'command, e.g. --extra=--distributed=auto '
                                           '(repeatable).')
    f['python'] = flags.DEFINE_string('python', 'python', 'Interpreter in generated commands.')
    f['sbatch'] = flags.DEFINE_multi_string('sbatch', [], 'Extra #SBATCH option for '
                                            'slurm_array, e.g. --sbatch=--gpus-per-node=1 '
                                            '(repeatable).')
    f['setup'] = flags.DEFINE_multi_string('setup', [], 'Shell line run before each array '
                                           'task (module load, source venv/bin/activate).')
    f['mode'] = flags.DEFINE_enum('mode', 'inprocess', ['inprocess', 'subprocess'],
                                  'format=run: train in this process or one subprocess per run.')
    flags.mark_flags_as_required(['config', 'root'])
    return f


def main(argv, f):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    config, root, extra = f['config'].value, f['root'].value, f['extra'].value
    try:
        runs = runs_for(config, f['axis'].value)
        if f['format'].value == 'commands':
            print('\n'.join(commands(config, runs, root, extra, f['python'].value)))
        elif f['format'].value == 'slurm_array':
            print(slurm_array_script(config, runs, root, extra, f['python'].value,
                                     sbatch=f['sbatch'].value, setup=f['setup'].value), end='')
        else:
            run_local(config, runs, root, mode=f['mode'].value, extra_flags=extra,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
            print(format_table(collect(root)))
    except JaxadError as e:
        print(f'jaxad: error: {e}', file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == '__main__':
    _flag_values = _define_flags()
    app.run(lambda argv: main(argv, _flag_values))
