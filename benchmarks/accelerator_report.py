"""One command for a device: train step vs PyTorch, MFU, eval latency, stacking, memory, a run.

python benchmarks/accelerator_report.py --out=/tmp/report       # within --budget_s=480 s
python benchmarks/accelerator_report.py --out=/tmp/report --data=/path/cifar10-jpg.tar.gz
python benchmarks/accelerator_report.py --out=/tmp/smoke --smoke  # tiny sizes, any device

Writes OUT/report.json and OUT/report.md; each child's stdout/stderr goes to OUT/logs/ and the
run's workdir is OUT/run/. Every section runs in its own child process (the scripts beside
this one, mostly), one at a time, in this order:

  torch           benchmarks/torch_reference.py: the same CSI step in eager PyTorch, float32
                  and (on CUDA) bf16 autocast + channels_last. First, before any JAX process
                  touches the device (throughput.py explains why).
  device          JAX's backend, device kind and count; package versions.
  train_float32,  benchmarks/throughput.py at the config's global batch with
  train_bfloat16  model.dtype=float32 / bfloat16: images/s, step time, compile time, XLA's
                  FLOPs, MFU (timing.PEAK_TFLOPS by device kind, or --peak_tflops), peak memory.
  eval            benchmarks/eval_latency.py: --num_test images x rotations x --num_samples
                  test-time augmentations against a --num_bank bank (10k x 4 x 10 vs 5k).
  stacked         benchmarks/stacked_throughput.py: --k stacked models under jax.vmap vs
                  K = 1 (the train section's step at the config's dtype, else the script's
                  own single-model step); images/s and the ratio.
  run             python -m jaxad.main on the config (default CSI, CIFAR-10 class 0) for about
                  --run_s seconds of training (steps from the measured step time), then its
                  evaluation; the loss curve is read from OUT/run/metrics.jsonl.

The config (default configs/csi_cifar.py; --smoke: configs/quickstart.py at tiny sizes) is
given as --config=FILE[:args] and --config.FIELD=VALUE, and passed on to every child. The
run needs CIFAR-10 for csi_cifar: --data (the JPEG folder or .tar.gz), else the config's
data.path, else shared/data/cifar10-jpg.tar.gz under the repository root; a config that reads
TFDS cifar10 (csi_cifar's default) reads that JPEG archive instead when it is there, since
an accelerator machine has no internet to download TFDS data.

Each section's child has a timeout from --budget_s (a share of it, keeping room for the run);
progress goes to stderr every 30 s. A failed, timed-out or unrun section is an error line in
the report and the other sections still run; the exit status is 1 if any section failed, with
one `FAILED` line per failure on stderr. Each section is its own process, so its peak device
memory (`peak_bytes_in_use`) is that section's alone (null on the CPU).
"""
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback

from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

_OUT = flags.DEFINE_string('out', None, 'Output folder for report.json, report.md, logs/, run/.')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny sizes (quickstart config, a few steps): '
                           'checks that every section runs, measures nothing.')
_BUDGET = flags.DEFINE_float('budget_s', 480.0, 'Wall-time budget of the whole report (s).')
_DATA = flags.DEFINE_string('data', '', 'CIFAR-10 JPEG folder or .tar.gz for the run '
                            '(default: the config\'s data.path, then shared/data/ in the repo; '
                            'for TFDS cifar10: shared/data/ if there, else TFDS).')
_SECTIONS = flags.DEFINE_list('sections', [], 'Only these sections (default: all).')
_TORCH = flags.DEFINE_enum('torch', 'auto', ['auto', 'true', 'false'],
                           'auto: time PyTorch on CUDA, or on the CPU when JAX runs there too.')
_PEAK = flags.DEFINE_float('peak_tflops', 0.0, 'Peak TFLOP/s of one device for the MFU '
                           '(0: timing.PEAK_TFLOPS by device kind and dtype).')
# Sizes: a flag left unset takes its mode's value from SIZES.
_SIZE_FLAGS = {
    'steps': flags.DEFINE_integer('steps', None, 'Timed train steps per measurement.'),
    'warmup': flags.DEFINE_integer('warmup', None, 'Untimed steps after compilation.'),
    'num_test': flags.DEFINE_integer('num_test', None, 'Eval latency: test images.'),
    'num_bank': flags.DEFINE_integer('num_bank', None, 'Eval latency: bank images.'),
    'num_samples': flags.DEFINE_integer('num_samples', None,
                                        'Eval latency: test-time augmentations.'),
    'eval_repeats': flags.DEFINE_integer('eval_repeats', None, 'Eval latency: timed repeats '
                                         '(after one untimed pass).'),
    'k': flags.DEFINE_integer('k', None, 'Stacked models K (vmap) compared with K = 1.'),
    'run_s': flags.DEFINE_float('run_s', None, 'Training seconds of the run.'),
}
SIZES = {
    'full': dict(steps=20, warmup=2, num_test=10_000, num_bank=5_000, num_samples=10,
                 eval_repeats=1, k=10, run_s=120.0),
    'smoke': dict(steps=2, warmup=1, num_test=16, num_bank=8, num_samples=2, eval_repeats=1,
                  k=2, run_s=0.1),
}
DEFAULT_CONFIG = ['--config=configs/csi_cifar.py']
# ResNet-18 (torch_reference implements only that) at width 4 on 8x8 images, 4 per step.
SMOKE_CONFIG = ['--config=configs/quickstart.py', '--config.num_devices=1',
                '--config.model.width=4', '--config.data.image_size=8',
                '--config.batch_size=4', '--config.eval.batch_size=16',
                '--config.eval.num_samples=2']
SMOKE_RUN = ['--config.eval.plots=False']
SHARED_CIFAR = os.path.join(_ROOT, 'shared', 'data', 'cifar10-jpg.tar.gz')

SECTIONS = ('torch', 'device', 'train_float32', 'train_bfloat16', 'eval', 'stacked', 'run')
# Longest share of --budget_s each section may take; the run gets what is left, and the
# others never eat into RUN_RESERVE of the budget.
CAPS = {'torch': 0.15, 'device': 0.05, 'train_float32': 0.2, 'train_bfloat16': 0.2,
        'eval': 0.2, 'stacked': 0.25}
RUN_RESERVE = 0.35
MIN_TIMEOUT_S = 10.0  # a section with less time than this left is not started
HEARTBEAT_S = 30.0
RUN_FIXED_S = 60.0  # the run's start-up, data decoding and final save, beyond compile + eval
MIN_RUN_STEPS = 4
FALLBACK_RUN_STEPS = 200  # when no step time was measured
CURVE_POINTS = 40  # log_every is chosen for about this many points on the loss curve
VERSION_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'torch', 'jax-cuda12-plugin',
                    'jax-cuda13-plugin', 'libtpu')

TORCH_CHILD = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import torch_reference as t
spec = json.loads(sys.argv[2])
cuda = torch.cuda.is_available()
if not cuda and not spec["allow_cpu"]:
    print(json.dumps({"skipped": "skipped: torch sees no CUDA device and JAX does not run on "
                      "the CPU, so a CPU reference is not the same device (--torch=true "
                      "times it anyway)"}))
    sys.exit(0)
settings = t.settings_from_config(spec["config"])
for amp in ([False, True] if cuda else [False]):  # bf16 autocast goes with channels_last
    r = t.measure(spec["batch_size"], steps=spec["steps"], warmup=spec["warmup"],
                  amp=amp, channels_last=amp, **settings)
    print(json.dumps(r), flush=True)
'''
DEVICE_CHILD = '''
import json, jax
d = jax.devices()
print(json.dumps({"backend": jax.default_backend(), "device_kind": d[0].device_kind,
                  "num_devices": len(d), "process_count": jax.process_count(),
                  "platform_version": getattr(d[0].client, "platform_version", None)}))
'''


class SectionError(Exception):
    """A section failed in a known way; the message is its report line."""


_START = time.monotonic()


def log(message):
    """A progress line on stderr, with the seconds since start."""
    print(f'[{time.monotonic() - _START:5.0f} s] {message}', file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ children


def last_line(path):
    """The last non-empty line of a text file (a child's error message), or ''."""
    with open(path, errors='replace') as f:
        lines = [line.strip() for line in f.read()[-8000:].replace('\r', '\n').splitlines()]
    return next((line for line in reversed(lines) if line), '')


def json_lines(path):
    out = []
    with open(path, errors='replace') as f:
        for line in f:
            if line.startswith('{'):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


class Children:
    """Runs children one at a time under the budget, logs in OUT/logs/, heartbeats on stderr."""

    def __init__(self, out, budget_s):
        self.logs = os.path.join(out, 'logs')
        os.makedirs(self.logs, exist_ok=True)
        self.budget_s = budget_s
        self.start = time.monotonic()

    def remaining(self):
        return self.budget_s - (time.monotonic() - self.start)

    def timeout(self, section):
        """The section's share of the budget, never eating into the run's reserve."""
        if section == 'run':
            return self.remaining()
        return min(CAPS[section] * self.budget_s,
                   self.remaining() - RUN_RESERVE * self.budget_s)

    def run(self, name, cmd, timeout_s, env=None):
        """(JSON lines of its stdout, error line or None) of one child process."""
        if timeout_s < MIN_TIMEOUT_S:
            return [], f'not run: {max(timeout_s, 0):.0f} s of --budget_s={self.budget_s:g} left'
        out_path = os.path.join(self.logs, f'{name}.out')
        err_path = os.path.join(self.logs, f'{name}.log')
        with open(out_path, 'w') as out, open(err_path, 'w') as err:
            err.write('$ ' + ' '.join(cmd) + '\n')
            err.flush()
            # Own process group: a timeout ends the child and anything it started.
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=_ROOT, env=env,
                                    start_new_session=True)
            timed_out = self._wait(proc, name, timeout_s, err_path)
        if timed_out:
            return json_lines(out_path), f'timed out after {timeout_s:.0f} s (log: {err_path})'
        if proc.returncode:
            return json_lines(out_path), (f'exit status {proc.returncode}: '
                                          f'{last_line(err_path)} (log: {err_path})')
        return json_lines(out_path), None

    def _wait(self, proc, name, timeout_s, err_path):
        """Waits for proc up to timeout_s with a progress line every HEARTBEAT_S; True if
        it had to be stopped."""
        t0 = time.monotonic()
        while True:
            left = timeout_s - (time.monotonic() - t0)
            if left <= 0:
                stop(proc)
                return True
            try:
                proc.wait(timeout=min(HEARTBEAT_S, left))
                return False
            except subprocess.TimeoutExpired:
                latest = last_line(err_path)
                latest = '' if latest.startswith('$ ') else latest[:120]  # the command line
                log(f'{name}: running {time.monotonic() - t0:.0f} s | {latest}')


def stop(proc):
    """SIGTERM to the child's process group, SIGKILL if it is still there after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            if proc.poll() is not None:
                return


def child_env():
    """Children see the repository; a JAX child may take most of the device's memory: it
    runs alone (never beside torch or another JAX child), and the K-stacked step and the
    10k-image evaluation are the largest programs. Preallocation stays on (JAX's default)."""
    env = dict(os.environ)
    env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.90')
    env['PYTHONPATH'] = os.pathsep.join(p for p in (_ROOT, env.get('PYTHONPATH')) if p)
    return env


# ------------------------------------------------------------------------------ config


def is_config_arg(arg):
    return arg == '--config' or arg.startswith(('--config=', '--config.'))


def parse_flags(argv):
    """absl flags; the --config tokens are set aside for load_config and the children."""
    bad = [a for a in argv[1:] if is_config_arg(a) and '=' not in a]
    if bad:
        raise app.UsageError(f'{bad[0]}: write --config=FILE and --config.FIELD=VALUE')
    return flags.FLAGS([a for a in argv if not is_config_arg(a)])


def config_args(argv, smoke):
    """The mode's config tokens updated by the user's: one --config=FILE (made absolute) and
    one token per overridden field, the user's value winning."""
    tokens = {}
    for a in (SMOKE_CONFIG if smoke else DEFAULT_CONFIG) + [a for a in argv[1:]
                                                            if is_config_arg(a)]:
        name, _, value = a.partition('=')
        if name == '--config':
            path, sep, rest = value.partition(':')
            if not os.path.isabs(path) and not os.path.exists(path):
                path = os.path.join(_ROOT, path)
            a = f'--config={os.path.abspath(path)}{sep}{rest}'
        tokens.pop(name, None)  # re-inserted last: the latest value, in order
        tokens[name] = a
    config = tokens.pop('--config')
    return [config] + list(tokens.values())  # config_flags wants the file first


def load_config(args):
    """The ConfigDict the children will build from the same --config tokens."""
    argv = ['accelerator_report'] + args
    values = flags.FlagValues()
    # sys_argv: config_flags defines the --config.FIELD flags it finds there.
    config_flags.DEFINE_config_file('config', None, flag_values=values, lock_config=True,
                                    sys_argv=argv)
    try:
        values(argv)
    except Exception as e:  # a bad file or override: one line, as the children would say
        raise app.UsageError(f'config: {e}') from None
    return values['config'].value


def sizes(smoke):
    """SIZES of the mode, with every size flag the user set."""
    out = dict(SIZES['smoke' if smoke else 'full'])
    out.update({k: f.value for k, f in _SIZE_FLAGS.items() if f.value is not None})
    return out


# ------------------------------------------------------------------------------ sections


class Context:
    """What the sections share: the config, its tokens, sizes, children and results so far."""

    def __init__(self, out, argv):
        self.out = out
        self.smoke = _SMOKE.value
        self.config_args = config_args(argv, self.smoke)
        self.config = load_config(self.config_args)
        self.sizes = sizes(self.smoke)
        self.children = Children(out, _BUDGET.value)
        self.results = {}

    def bench(self, script, *args):
        return [sys.executable, os.path.join(_HERE, script), *self.config_args, *args]

    def run_child(self, name, cmd):
        return self.children.run(name, cmd, self.children.timeout(name), child_env())


def want_torch():
    """None, or why torch is skipped."""
    if _TORCH.value == 'false':
        return 'skipped: --torch=false'
    if importlib.util.find_spec('torch') is None:
        if _TORCH.value == 'true':
            raise SectionError('--torch=true but torch is not installed')
        return 'skipped: torch not installed'
    return None


def section_torch(ctx):
    skip = want_torch()
    if skip:
        return {'status': 'skipped', 'reason': skip}
    jax_on_cpu = ctx.smoke or os.environ.get('JAX_PLATFORMS', '').strip() == 'cpu'
    spec = {'batch_size': ctx.config.batch_size, 'steps': ctx.sizes['steps'],
            'warmup': ctx.sizes['warmup'], 'allow_cpu': jax_on_cpu or _TORCH.value == 'true',
            'config': json.loads(ctx.config.to_json())}
    cmd = [sys.executable, '-c', TORCH_CHILD, _HERE, json.dumps(spec)]
    lines, error = ctx.run_child('torch', cmd)
    if error:
        return {'status': 'error', 'error': error, 'rows': lines}
    if lines and 'skipped' in lines[0]:
        return {'status': 'skipped', 'reason': lines[0]['skipped']}
    if not lines:
        raise SectionError('torch_reference printed no result')
    return {'rows': lines}


def section_device(ctx):
    lines, error = ctx.run_child('device', [sys.executable, '-c', DEVICE_CHILD])
    if error or not lines:
        raise SectionError(error or 'no device line')
    return dict(lines[-1], versions=package_versions(), python=platform.python_version(),
                host=platform.processor() or platform.machine(), git=git_commit())


def package_versions():
    out = {}
    for name in VERSION_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def git_commit():
    try:
        proc = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=_ROOT,
                              capture_output=True, text=True, timeout=10)
        return proc.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None  # a copy of the tree without git


def section_train(ctx, dtype):
    s = ctx.sizes
    cmd = ctx.bench('throughput.py', f'--config.model.dtype={dtype}',
                    f'--batch_sizes={ctx.config.batch_size}', f'--steps={s["steps"]}',
                    f'--warmup={s["warmup"]}', '--torch=false', f'--peak_tflops={_PEAK.value}')
    lines, error = ctx.run_child(f'train_{dtype}', cmd)
    if error or not lines:
        raise SectionError(error or 'throughput.py printed no result')
    return {'row': lines[-1]}


def section_eval(ctx):
    s = ctx.sizes
    cmd = ctx.bench('eval_latency.py', f'--num_test={s["num_test"]}',
                    f'--num_bank={s["num_bank"]}', f'--num_samples={s["num_samples"]}',
                    f'--repeats={s["eval_repeats"]}')
    lines, error = ctx.run_child('eval', cmd)
    if error or not lines:
        raise SectionError(error or 'eval_latency.py printed no result')
    return {'result': lines[-1]}


def train_row(ctx, dtype):
    """throughput.py's line for `dtype` at the config's batch, or None if not measured."""
    row = ctx.results.get(f'train_{dtype}', {}).get('row')
    return row if row and row['global_batch'] == ctx.config.batch_size else None


def as_k1(row, dtype):
    """A train-step line as the stacked table's K = 1 row (the same ordinary trainer step)."""
    keep = ('images_per_s', 'median_step_s', 'compile_s', 'flops_per_step', 'mfu',
            'peak_memory_bytes')
    return dict({k: row[k] for k in keep}, k=1, mode=f'single (train_{dtype})',
                batch_per_model=row['global_batch'])


def section_stacked(ctx):
    """K stacked models (vmap) vs K = 1: the train section's step when it ran at the
    config's dtype (no second compile of it), else the script's own single-model step."""
    dtype, s = ctx.config.model.dtype, ctx.sizes
    base = train_row(ctx, dtype)
    cmd = ctx.bench('stacked_throughput.py', f'--ks={s["k"]}', '--modes=vmap',
                    f'--steps={s["steps"]}', f'--warmup={s["warmup"]}',
                    f'--peak_tflops={_PEAK.value}', f'--single={base is None}')
    lines, error = ctx.run_child('stacked', cmd)
    single = (as_k1(base, dtype) if base
              else next((r for r in lines if r.get('mode') == 'single'), None))
    stacked = next((r for r in lines if r.get('mode') == 'vmap'), None)
    out = {'k1': single, 'k': stacked, 'k_over_1': None}
    if single and stacked:
        out['k_over_1'] = round(stacked['images_per_s'] / single['images_per_s'], 3)
    if error or not (single and stacked):
        out.update(status='error', error=error or 'stacked_throughput.py printed no K line')
    return out


def run_data_args(ctx):
    """--config.data.path for the run where the config reads a folder or .tar.gz, or reads
    TFDS cifar10 (then --data or the repository's JPEG archive replaces it, when given)."""
    data = ctx.config.data
    if data.source == 'tfds' and data.tfds_name == 'cifar10':
        path = _DATA.value or (SHARED_CIFAR if os.path.exists(SHARED_CIFAR) else '')
        if not path:
            return []  # TFDS: downloaded and prepared on first use, where that is possible
        if not os.path.exists(path):
            raise SectionError(f'no data for the run: {path} not found; pass --data=PATH (the '
                               'CIFAR-10 JPEG folder or .tar.gz)')
        return ['--config.data.source=folder', f'--config.data.path={os.path.abspath(path)}']
    if data.source != 'folder':
        return []  # digits, TFDS, numpy: the config finds its own data
    candidates = [_DATA.value] if _DATA.value else [data.path, SHARED_CIFAR]
    for path in candidates:
        if path and os.path.exists(path):
            return [f'--config.data.path={os.path.abspath(path)}']
    raise SectionError(f'no data for the run: {" or ".join(p for p in candidates if p)} not '
                       'found; pass --data=PATH (the CIFAR-10 JPEG folder or .tar.gz)')


def run_plan(ctx):
    """(total_steps, notes): about run_s of training at the measured step time, shortened
    so that start-up, compilation and the final evaluation fit in the budget left."""
    row = train_row(ctx, ctx.config.model.dtype)
    if not row:
        return FALLBACK_RUN_STEPS, [f'no measured {ctx.config.model.dtype} step time: '
                                    f'{FALLBACK_RUN_STEPS} steps']
    step_s, notes = row['median_step_s'], []
    # The eval section's wall time (start-up, compile, its passes) stands in for the run's
    # final evaluation, which scores the same 10k test images against a 5k bank.
    evaluation = ctx.results.get('eval', {})
    eval_s = evaluation['wall_s'] if evaluation.get('status') == 'ok' else RUN_FIXED_S
    reserve = RUN_FIXED_S + row['compile_s'] + eval_s
    train_s = min(ctx.sizes['run_s'], ctx.children.remaining() - reserve)
    if train_s < ctx.sizes['run_s']:
        notes.append(f'training shortened to {max(train_s, 0):.0f} s to fit --budget_s')
    steps = max(MIN_RUN_STEPS, int(train_s / step_s))
    notes.append(f'{steps} steps at the measured {step_s * 1e3:.1f} ms/step '
                 f'({ctx.config.model.dtype}, batch {ctx.config.batch_size})')
    return steps, notes


def section_run(ctx):
    data_args = run_data_args(ctx)
    steps, notes = run_plan(ctx)
    log_every = max(1, steps // CURVE_POINTS)
    workdir = os.path.join(ctx.out, 'run')
    if os.path.exists(workdir):  # a fresh run: an old one would be resumed or refused
        shutil.rmtree(workdir)
    cmd = [sys.executable, '-m', 'jaxad.main', *ctx.config_args,
           *(SMOKE_RUN if ctx.smoke else []), *data_args, f'--config.total_steps={steps}',
           f'--config.log_every={log_every}', f'--config.checkpoint.every_steps={steps}',
           f'--workdir={workdir}']
    t0 = time.monotonic()
    _, error = ctx.run_child('run', cmd)
    out = {'command': ' '.join(cmd[1:]), 'total_steps': steps, 'log_every': log_every,
           'notes': notes, 'process_s': round(time.monotonic() - t0, 1),
           'loss_curve': loss_curve(workdir), 'results': run_results(workdir)}
    if not error and len(out['loss_curve']) < 2:
        error = f'{len(out["loss_curve"])} points in {workdir}/metrics.jsonl, expected >= 2'
    if error:
        out.update(status='error', error=error)
    return out


def loss_curve(workdir):
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
        return []
    keep = ('step', 'loss', 'lr', 'images_per_sec')
    return [{k: r[k] for k in keep if k in r} for r in json_lines(path) if 'loss' in r]


def run_results(workdir):
    path = os.path.join(workdir, 'results.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        r = json.load(f)
    keep = ('headline_score', 'image_AUROC', 'image_AUPR', 'FPR@95TPR', 'dataset', 'num_test',
            'step', 'train_seconds', 'eval_seconds')
    return {k: r.get(k) for k in keep}


SECTION_FNS = {'torch': section_torch, 'device': section_device,
               'train_float32': lambda ctx: section_train(ctx, 'float32'),
               'train_bfloat16': lambda ctx: section_train(ctx, 'bfloat16'),
               'eval': section_eval, 'stacked': section_stacked, 'run': section_run}


def run_section(ctx, name):
    """One section's result dict with 'status' (ok / error / skipped) and 'wall_s'."""
    log(f'{name}: start (timeout {max(ctx.children.timeout(name), 0):.0f} s)')
    t0 = time.monotonic()
    try:
        result = SECTION_FNS[name](ctx)
    except SectionError as e:
        result = {'status': 'error', 'error': str(e)}
    except Exception as e:  # a bug here must not lose the other sections' results
        traceback.print_exc()
        result = {'status': 'error', 'error': f'{type(e).__name__}: {e}'}
    result.setdefault('status', 'ok')
    result['wall_s'] = round(time.monotonic() - t0, 1)
    log(f'{name}: {result["status"]} {result.get("error") or result.get("reason") or ""}')
    return result


# ------------------------------------------------------------------------------ tables


def train_rows(results):
    """The train-step table: jaxad float32, jaxad bfloat16, torch rows (dicts)."""
    rows = []
    for dtype in ('float32', 'bfloat16'):
        r = results.get(f'train_{dtype}', {}).get('row')
        if r:
            rows.append({'impl': 'jaxad', 'precision': dtype, 'device': r['device'],
                         'global_batch': r['global_batch'], 'images_per_s': r['images_per_s'],
                         'step_ms': round(r['median_step_s'] * 1e3, 3),
                         'compile_s': r['compile_s'], 'flops_per_step': r['flops_per_step'],
                         'tflops_per_s': r['tflops_per_s'], 'mfu': r['mfu'],
                         'peak_memory_bytes': r['peak_memory_bytes']})
    for r in results.get('torch', {}).get('rows') or []:
        precision = 'bf16 autocast + channels_last' if r['amp'] else 'float32'
        rows.append({'impl': 'torch', 'precision': precision, 'device': r['device'],
                     'global_batch': r['global_batch'], 'images_per_s': r['images_per_s'],
                     'step_ms': round(r['median_step_s'] * 1e3, 3), 'compile_s': None,
                     'flops_per_step': None, 'tflops_per_s': None, 'mfu': None,
                     'peak_memory_bytes': r['peak_memory_bytes']})
    return rows


def jaxad_over_torch(results):
    """{precision: images/s ratio or None, precision + '_note': why not} for each pair of
    jaxad and torch rows of one precision: same views, parameters, batch and device type."""
    out = {}
    torch_rows = results.get('torch', {}).get('rows') or []
    for dtype, amp in (('float32', None), ('bfloat16', 'bfloat16')):
        j = results.get(f'train_{dtype}', {}).get('row')
        t = next((r for r in torch_rows if r['amp'] == amp), None)
        if not (j and t):
            continue
        mismatch = [k for k in ('views_per_step', 'num_params', 'global_batch') if j[k] != t[k]]
        if (t['device'] == 'cpu') != (j['device'] == 'cpu'):
            mismatch.append(f'device ({j["device"]} vs torch on {t["device"]})')
        out[dtype] = None if mismatch else round(j['images_per_s'] / t['images_per_s'], 3)
        if mismatch:
            out[f'{dtype}_note'] = 'not comparable: ' + ', '.join(mismatch) + ' differ'
    return out


def peak_memory(results):
    """{what: peak bytes or None}: each section's own process high-water mark."""
    out = {}
    for dtype in ('float32', 'bfloat16'):
        r = results.get(f'train_{dtype}', {}).get('row')
        if r:
            out[f'jaxad train step, {dtype}'] = r['peak_memory_bytes']
    for r in results.get('torch', {}).get('rows') or []:
        label = 'bf16 autocast' if r['amp'] else 'float32'
        out[f'torch train step, {label} (max_memory_allocated)'] = r['peak_memory_bytes']
    e = results.get('eval', {}).get('result')
    if e:
        out['eval latency'] = e.get('peak_memory_bytes')
    stacked = results.get('stacked', {})
    if stacked.get('k'):
        with_single = (stacked.get('k1') or {}).get('mode') == 'single'  # same process
        label = f'stacked K={stacked["k"]["k"]}, vmap' + (' (and its K=1)' if with_single else '')
        out[label] = stacked['k'].get('peak_memory_bytes')
    return out


def build_report(ctx, wall_s):
    results = ctx.results
    failures = [f'{name}: {r["error"]}' for name, r in results.items() if r['status'] == 'error']
    return {'meta': {'command': ' '.join(sys.argv), 'smoke': ctx.smoke,
                     'budget_s': _BUDGET.value, 'wall_s': round(wall_s, 1),
                     'date': datetime.datetime.now().isoformat(timespec='seconds'),
                     'config_args': ctx.config_args, 'sizes': ctx.sizes},
            'sections': results,
            'train_step': {'rows': train_rows(results), 'jaxad_over_torch':
                           jaxad_over_torch(results)},
            'peak_memory': peak_memory(results),
            'failures': failures}


# ------------------------------------------------------------------------------ markdown


def fmt(x, spec='', none='—'):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def fmt_bytes(n):
    if n is None:
        return '— (no device stats)'
    return f'{n / 2 ** 30:.2f} GiB' if n >= 2 ** 30 else f'{n / 2 ** 20:.1f} MiB'


def fmt_pct(x):
    return fmt(None if x is None else 100 * x, '.1f') + ('%' if x is not None else '')


def md_table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return lines


def md_status(r, name=''):
    """A section's status as Markdown lines, or [] when it ran."""
    if r is None or r['status'] == 'ok':
        return []
    prefix = f'{name}: ' if name else ''
    return [f'- {prefix}**{r["status"]}**: {r.get("error") or r.get("reason")}', '']


def md_device(report):
    d = report['sections'].get('device', {})
    lines = ['## Device', ''] + md_status(d)
    if d.get('status') == 'ok':
        versions = ', '.join(f'{k} {v}' for k, v in d['versions'].items())
        lines += [f'- {d["num_devices"]} x {d["device_kind"]} (backend {d["backend"]}, '
                  f'{d["platform_version"]}), {d["process_count"]} process(es), '
                  f'host {d["host"]}, Python {d["python"]}',
                  f'- {versions}', f'- repository at {d["git"]}', '']
    return lines


def md_train(report):
    sections = report['sections']
    lines = ['## Train step', '']
    for name in ('torch', 'train_float32', 'train_bfloat16'):
        lines += md_status(sections.get(name), name)
    rows = report['train_step']['rows']
    if rows:
        r0 = (sections.get('train_float32') or {}).get('row') or {}
        lines += [f'Global batch {rows[0]["global_batch"]}; {r0.get("views_per_step", "?")} '
                  f'augmented views per step; median of the timed steps. MFU = XLA FLOPs / '
                  'step time / peak (timing.PEAK_TFLOPS or --peak_tflops; — where unknown).', '']
        lines += md_table(
            ['impl', 'precision', 'device', 'images/s', 'step ms', 'compile s',
             'XLA FLOPs/step', 'TFLOP/s', 'MFU', 'peak memory'],
            [[r['impl'], r['precision'], r['device'], fmt(r['images_per_s'], '.1f'),
              fmt(r['step_ms'], '.2f'), fmt(r['compile_s'], '.1f'),
              fmt(r['flops_per_step'], '.3e'), fmt(r['tflops_per_s'], '.3f'), fmt_pct(r['mfu']),
              fmt_bytes(r['peak_memory_bytes'])] for r in rows])
        if any(r['impl'] == 'torch' and r['device'] != 'cpu' for r in rows):
            lines.append('\ntorch float32 runs at PyTorch\'s defaults (cuDNN convolutions may '
                         'use TF32); jaxad float32 uses XLA\'s default precision (TF32 on '
                         'NVIDIA GPUs, the peak timing.PEAK_TFLOPS counts for float32).')
        ratios = report['train_step']['jaxad_over_torch']
        for dtype in ('float32', 'bfloat16'):
            if dtype in ratios:
                lines.append(f'\njaxad / torch images/s, {dtype}: '
                             f'{fmt(ratios[dtype], ".3f", ratios.get(dtype + "_note"))}')
    return lines + ['']


def md_eval(report):
    r = report['sections'].get('eval', {})
    lines = ['## Eval latency', ''] + md_status(r)
    e = r.get('result')
    if e:
        lines += [f'{e["num_test"]} test images x {e["rotations"]} rotations x '
                  f'{e["tta_samples"]} test-time augmentations vs a {e["num_bank"]}-image bank '
                  f'({e["forward_passes"]} forward passes), eval batch {e["eval_batch_size"]}, '
                  f'{e["dtype"]}, median of {e["repeats"]} after one untimed pass.', '']
        lines += md_table(['bank + fit s', 'test features s', 'score s', 'test + score s',
                           'ms / test image', 'peak memory'],
                          [[e['bank_s'], e['test_s'], e['score_s'], e['test_and_score_s'],
                            e['per_test_image_ms'], fmt_bytes(e.get('peak_memory_bytes'))]])
    return lines + ['']


def md_stacked(report):
    r = report['sections'].get('stacked', {})
    lines = ['## Stacked one-class models (vmap)', ''] + md_status(r)
    rows = [(x, ratio) for x, ratio in ((r.get('k1'), 1.0), (r.get('k'), r.get('k_over_1')))
            if x]
    if rows:
        lines += md_table(['K', 'mode', 'batch per model', 'images/s (all models)', 'step ms',
                           'compile s', 'MFU', 'images/s vs K=1'],
                          [[x['k'], x['mode'], x['batch_per_model'],
                            fmt(x['images_per_s'], '.1f'), fmt(x['median_step_s'] * 1e3, '.2f'),
                            x['compile_s'], fmt_pct(x['mfu']), fmt(ratio, '.3f')]
                           for x, ratio in rows])
    return lines + ['']


def md_memory(report):
    lines = ['## Peak device memory', '',
             "Each section's own process (`peak_bytes_in_use`; torch: max_memory_allocated).", '']
    mem = report['peak_memory']
    return lines + md_table(['what', 'peak'], [[k, fmt_bytes(v)] for k, v in mem.items()]) + ['']


def md_run(report):
    r = report['sections'].get('run', {})
    lines = ['## Short run', ''] + md_status(r)
    if 'command' not in r:
        return lines
    lines += [f'`python {r["command"]}`', ''] + [f'- {n}' for n in r['notes']]
    lines.append(f'- process wall time {r["process_s"]} s')
    res = r.get('results')
    if res:
        lines.append(f'- {res["dataset"]}: image_AUROC {fmt(res["image_AUROC"], ".4f")} '
                     f'({res["headline_score"]} score) after {res["step"]} steps; '
                     f'train {res["train_seconds"]} s, eval {res["eval_seconds"]} s')
    curve = r['loss_curve']
    shown = curve[::max(1, math.ceil(len(curve) / 20))]
    if curve and shown[-1] is not curve[-1]:
        shown.append(curve[-1])
    lines += ['', f'Loss curve ({len(curve)} points in run/metrics.jsonl; up to 21 shown):', '']
    lines += md_table(['step', 'loss', 'lr', 'images/s'],
                      [[c['step'], fmt(c['loss'], '.4f'), fmt(c.get('lr'), '.4g'),
                        fmt(c.get('images_per_sec'), '.1f')] for c in shown])
    return lines + ['']


def markdown(report):
    meta = report['meta']
    lines = ['# jaxad accelerator report', '']
    if meta['smoke']:
        lines += ['**Smoke run (--smoke): tiny sizes to check that every section runs. '
                  'The numbers are not measurements.**', '']
    lines += [f'`{meta["command"]}`', '',
              f'{meta["date"]}, {meta["wall_s"]} s of a {meta["budget_s"]:g} s budget; '
              f'config {" ".join(meta["config_args"])}', '']
    for part in (md_device, md_train, md_eval, md_stacked, md_memory, md_run):
        lines += part(report)
    lines += ['## Failures', '']
    lines += [f'- {f}' for f in report['failures']] or ['none']
    return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------------------ main


def main(argv):
    del argv  # the --config tokens are read from sys.argv (parse_flags set them aside)
    if not _OUT.value:
        raise app.UsageError('--out=DIR is required')
    unknown = set(_SECTIONS.value) - set(SECTIONS)
    if unknown:
        raise app.UsageError(f'unknown --sections {sorted(unknown)}; choose from {SECTIONS}')
    out = os.path.abspath(_OUT.value)
    os.makedirs(out, exist_ok=True)
    t0 = time.monotonic()
    ctx = Context(out, sys.argv)
    log(f'accelerator report -> {out} ({"smoke" if ctx.smoke else "full"}, '
        f'budget {_BUDGET.value:g} s)')
    for name in SECTIONS:
        if _SECTIONS.value and name not in _SECTIONS.value:
            ctx.results[name] = {'status': 'skipped', 'reason': 'not in --sections'}
            continue
        ctx.results[name] = run_section(ctx, name)
    report = build_report(ctx, time.monotonic() - t0)
    with open(os.path.join(out, 'report.json'), 'w') as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, 'report.md'), 'w') as f:
        f.write(markdown(report))
    log(f'wrote {out}/report.md and report.json in {report["meta"]["wall_s"]} s')
    for failure in report['failures']:
        print(f'accelerator_report: FAILED {failure}', file=sys.stderr)
    return 1 if report['failures'] else 0


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
