"""launch/sweep.py (module and command line) and the shell launchers (no training here: see
test_notebooks). `launch` imports from the repository root, which pytest puts on sys.path
(as for `tests.helpers`)."""
import importlib
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from jaxad import config as jc
from jaxad.errors import ConfigError
from launch import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
TINY = os.path.join(REPO, 'configs', 'scaling_tiny.py')
CIFAR = os.path.join(REPO, 'configs', 'scaling_cifar.py')


def test_expand_product_order_and_names():
    runs = sweep.expand({'batch_size': [64, 128], 'optim.lr_rule': ['linear', 'sqrt'],
                         'seed': [0, 1]})
    assert [r.overrides for r in runs[:3]] == [
        {'batch_size': 64, 'optim.lr_rule': 'linear', 'seed': 0},
        {'batch_size': 64, 'optim.lr_rule': 'linear', 'seed': 1},
        {'batch_size': 64, 'optim.lr_rule': 'sqrt', 'seed': 0}]
    assert len(runs) == 8 and runs[-1].overrides == {
        'batch_size': 128, 'optim.lr_rule': 'sqrt', 'seed': 1}
    assert runs[0].name == 'batch_size-64__lr_rule-linear__seed-0'
    assert runs[0].label == 'batch_size=64,optim.lr_rule=linear,seed=0'
    assert len({r.name for r in runs}) == 8
    # Same expansion twice: same order.
    assert runs == sweep.expand({'batch_size': [64, 128], 'optim.lr_rule': ['linear', 'sqrt'],
                                 'seed': [0, 1]})


def test_names_are_filesystem_safe_and_unique():
    runs = sweep.expand([{'data.path': '/a b/c', 'optim.lr': 0.1}, {'model.name': 'x:y'},
                         {'model.name': 'x/y'}, {}])
    assert runs[0].name == 'path-_a_b_c__lr-0.1'
    assert runs[1].name == 'name-x_y' and runs[2].name == 'name-x_y__1'
    assert runs[3].name == 'base'
    for r in runs:
        assert '/' not in r.name and ' ' not in r.name
    # Two axes with the same last part keep their full dotted names.
    both = sweep.expand({'optim.eps': [1e-8], 'csi.eps': [1e-6]})
    assert both[0].name == 'optim.eps-1e-08__csi.eps-1e-06'


def test_expand_rejects_bad_axes():
    with pytest.raises(ConfigError):
        sweep.expand({'seed': 3})
    with pytest.raises(ConfigError):
        sweep.expand('seed=1')
    with pytest.raises(ConfigError):
        sweep.parse_axis('seed')


def test_parse_axis_and_values():
    assert sweep.parse_axis('batch_size=256,512') == ('batch_size', [256, 512])
    assert sweep.parse_axis('--config.optim.lr_rule=linear,sqrt') == (
        'optim.lr_rule', ['linear', 'sqrt'])
    assert sweep.parse_axis('optim.lr=1e-3,0.1') == ('optim.lr', [0.001, 0.1])
    assert sweep.parse_axis('checkpoint.use_async=true,false')[1] == [True, False]
    assert sweep.format_value(True) == 'true'
    assert sweep.format_value((0.08, 1.0)) == '(0.08, 1.0)'


def test_commands_text():
    runs = sweep.expand({'batch_size': [16, 32], 'seed': [1]})
    lines = sweep.commands('configs/scaling_tiny.py:steps=4', runs, '/tmp/st',
                           extra_flags=['--distributed=auto'])
    assert lines == [
        'python -m jaxad.main --config=configs/scaling_tiny.py:steps=4 --config.batch_size=16 '
        '--config.seed=1 --workdir=/tmp/st/batch_size-16__seed-1 --distributed=auto',
        'python -m jaxad.main --config=configs/scaling_tiny.py:steps=4 --config.batch_size=32 '
        '--config.seed=1 --workdir=/tmp/st/batch_size-32__seed-1 --distributed=auto']
    quoted = sweep.commands('c.py', sweep.expand([{'data.path': 'a b'}]), '/r')[0]
    assert "'--config.data.path=a b'" in quoted


def test_slurm_array_script(tmp_path):
    runs = sweep.expand({'batch_size': [16, 32, 64]})
    script = sweep.slurm_array_script('configs/scaling_tiny.py', runs, '/scratch/st',
                                      sbatch=['--gpus-per-node=1'], setup=['module load cuda'])
    lines = script.splitlines()
    assert lines[0] == '#!/bin/bash'
    assert '#SBATCH --array=0-2' in lines and '#SBATCH --gpus-per-node=1' in lines
    assert 'module load cuda' in lines
    assert 'CMD="${COMMANDS[$SLURM_ARRAY_TASK_ID]}"' in lines
    for cmd in sweep.commands('configs/scaling_tiny.py', runs, '/scratch/st'):
        assert f"  '{cmd}'" in lines
    # All #SBATCH lines come before the first command (sbatch stops reading at it).
    first_cmd = next(i for i, ln in enumerate(lines[1:], 1) if ln and not ln.startswith('#'))
    assert all(not ln.startswith('#SBATCH') for ln in lines[first_cmd:])
    path = tmp_path / 'array.sbatch'
    path.write_text(script)
    subprocess.run(['bash', '-n', str(path)], check=True)
    # The array picks run i for task i: run it with stand-in `module` and `python`.
    root = tmp_path / 'study'
    path.write_text(sweep.slurm_array_script('configs/scaling_tiny.py', runs, str(root),
                                             setup=['module load cuda']))
    stub = _stub_bin(tmp_path, python='echo "python $*"', module='echo "module $*"')
    env = dict(os.environ, PATH=f'{stub}:{os.environ["PATH"]}', SLURM_ARRAY_TASK_ID='1',
               SLURM_SUBMIT_DIR=str(tmp_path))
    out = subprocess.run(['bash', str(path)], env=env, check=True, capture_output=True,
                         text=True, cwd=tmp_path).stdout.splitlines()
    assert out[0] == 'module load cuda' and root.is_dir()
    assert out[-1] == (
        'python -m jaxad.main --config=configs/scaling_tiny.py --config.batch_size=32 '
        f'--workdir={root}/batch_size-32')


def test_get_sweep_from_config_files():
    tiny = sweep.runs_for(TINY)
    assert [r.overrides for r in tiny] == [{'batch_size': b, 'seed': 0} for b in (16, 32, 64)]
    cifar = sweep.get_sweep(CIFAR)
    assert cifar['batch_size'] == [256, 512, 1024, 2048, 4096] and cifar['seed'] == [0, 1, 2]
    has_rule = 'lr_rule' in jc.csi_base().optim
    assert ('optim.lr_rule' in cifar) == has_rule
    assert len(sweep.runs_for(CIFAR)) == 5 * 3 * (2 if has_rule else 1)
    # --axis replaces the file's sweep.
    assert [r.name for r in sweep.runs_for(CIFAR, ['batch_size=256,512'])] == [
        'batch_size-256', 'batch_size-512']
    # A config argument reaches get_config through the same 'file.py:arg' syntax.
    assert sweep.get_config(TINY + ':steps=3').total_steps == 3
    assert sweep.get_config(CIFAR + ':epochs=7').optim.epochs == 7


def test_get_sweep_list_form_and_missing(tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(textwrap.dedent('''
        import ml_collections
        def get_config(arg=None):
            return ml_collections.ConfigDict({'seed': 0, 'optim': {'lr': 0.1}})
        def get_sweep(arg=None):
            return [{'seed': 1}, {'seed': 2, 'optim.lr': float(arg or 0.5)}]
    '''))
    runs = sweep.runs_for(f'{cfg}:0.25')
    assert [r.overrides for r in runs] == [{'seed': 1}, {'seed': 2, 'optim.lr': 0.25}]
    plain = tmp_path / 'plain.py'
    plain.write_text('def get_config(arg=None):\n    return None\n')
    assert sweep.get_sweep(str(plain)) is None
    with pytest.raises(ConfigError, match='get_sweep'):
        sweep.runs_for(str(plain))
    with pytest.raises(ConfigError, match='does not exist'):
        sweep.get_sweep(str(tmp_path / 'nope.py'))


def test_apply_overrides_types_like_the_command_line():
    base = sweep.get_config(TINY)
    c = sweep.apply_overrides(base, {'batch_size': '64', 'optim.lr': 1, 'seed': 2,
                                     'checkpoint.use_async': 'true',
                                     'augment.crop_scale': '(0.2, 1.0)',
                                     'data.normal_classes': [3], 'model.name': 'resnet34'})
    assert c.batch_size == 64 and isinstance(c.batch_size, int)
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.checkpoint.use_async is True
    assert c.augment.crop_scale == (0.2, 1.0) and c.data.normal_classes == (3,)
    assert c.model.name == 'resnet34' and c.seed == 2
    assert base.batch_size == 32 and base.seed == 0  # the base config is untouched
    with pytest.raises(ConfigError, match='unknown config field'):
        sweep.apply_overrides(base, {'optim.nope': 1})
    with pytest.raises(ConfigError):
        sweep.apply_overrides(base, {'batch_size': 'big'})


def _fake_run(root, name, batch, seed, rule, auroc, rates, steps_per_epoch=2):
    workdir = os.path.join(root, name)
    os.makedirs(workdir)
    config = jc.csi_base().to_dict()
    config.update(batch_size=batch, seed=seed)
    config['optim']['lr_rule'] = rule
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
        json.dump(config, f, default=list)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
        for i, rate in enumerate(rates):
            f.write(json.dumps({'step': 2 * (i + 1), 'loss': 7.0 - i, 'lr': 0.1 * (i + 1),
                                'images_per_sec': rate, 'steps_per_sec': rate / batch,
                                'epoch': (i + 1) / steps_per_epoch}) + '\n')
        f.write('{"step": 99, "loss"')  # a torn line from a killed run is ignored
    if auroc is not None:
        with open(os.path.join(workdir, 'results.json'), 'w') as f:
            json.dump({'image_AUROC': auroc, 'scores': {}, 'step': 2 * len(rates)}, f)


@pytest.fixture
def fabricated(tmp_path):
    root = str(tmp_path / 'study')
    runs = sweep.expand({'batch_size': [16, 32], 'optim.lr_rule': ['linear', 'sqrt'],
                         'seed': [0, 1]})
    for r in runs:
        b, rule, s = r.overrides['batch_size'], r.overrides['optim.lr_rule'], r.overrides['seed']
        _fake_run(root, r.name, b, s, rule, auroc=0.5 + b / 100 + s / 100,
                  rates=[1.0, 10.0 * b, 12.0 * b, 11.0 * b])
    sweep.write_manifest(root, 'configs/x.py', runs)
    _fake_run(root, 'unfinished', 64, 0, 'linear', auroc=None, rates=[1.0])
    os.makedirs(os.path.join(root, 'not_a_run'))
    return root


def test_collect_fabricated_runs(fabricated):
    rows = sweep.collect(fabricated)
    assert len(rows) == 9
    by_name = {r['name']: r for r in rows}
    r = by_name['batch_size-32__lr_rule-sqrt__seed-1']
    assert r['global_batch'] == 32 and r['seed'] == 1 and r['lr_rule'] == 'sqrt'
    assert r['overrides'] == {'batch_size': 32, 'optim.lr_rule': 'sqrt', 'seed': 1}
    assert r['images_per_sec'] == pytest.approx(11.0 * 32)  # median of 320, 384, 352
    assert r['steps_per_sec'] == pytest.approx(11.0)
    assert r['final_loss'] == 4.0 and r['steps'] == 8 and r['peak_lr'] == pytest.approx(0.4)
    assert r['image_AUROC'] == pytest.approx(0.83) and r['done']
    assert r['config']['batch_size'] == 32
    u = by_name['unfinished']
    assert u['image_AUROC'] is None and not u['done'] and u['overrides'] == {}
    assert u['images_per_sec'] is None  # its only logged point includes compilation
    # Sorted by lr rule, then global batch, then seed.
    keys = [(r['lr_rule'], r['global_batch'], r['seed']) for r in rows]
    assert keys == sorted(keys)

    agg = sweep.aggregate(rows, 'image_AUROC')
    assert set(agg) == {'linear', 'sqrt'}
    x, mean, std, n = agg['linear'][0]
    assert (x, n) == (16, 2) and mean == pytest.approx(0.665) and std == pytest.approx(0.005)

    table = sweep.format_table(rows)
    assert table.splitlines()[0].startswith('| name | global_batch |')
    assert len(table.splitlines()) == 2 + 9
    csv_path = sweep.write_table(rows, os.path.join(fabricated, 'scaling.csv'))
    with open(csv_path) as f:
        assert f.readline().strip() == ','.join(sweep.TABLE_COLUMNS)


def test_plot_scaling_writes_a_figure(fabricated, tmp_path):
    importlib.import_module('matplotlib')  # test extra: a missing one fails, not skips
    rows = sweep.collect(fabricated)
    bench = [{'global_batch': 16, 'images_per_s': 200.0}, {'global_batch': 32, 'images_per_s': 390.0}]
    path = str(tmp_path / 'plots' / 'scaling.png')
    fig = sweep.plot_scaling(rows, path, bench=bench, title='fabricated')
    assert os.path.getsize(path) > 1000
    with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    rate_ax, auc_ax = fig.axes
    assert rate_ax.get_xscale() == 'log' and auc_ax.get_xscale() == 'log'
    assert 'global batch' in rate_ax.get_xlabel() and 'images / s' in rate_ax.get_ylabel()
    assert 'AUROC' in auc_ax.get_ylabel()
    labels = [t.get_text() for t in rate_ax.get_legend().get_texts()]
    assert sorted(labels) == ['lr_rule=linear', 'lr_rule=sqrt', 'throughput.py (train step only)']
    assert [t.get_text() for t in auc_ax.get_xticklabels()] == ['16', '32', '64']


def test_run_local_skips_finished_runs(fabricated, tmp_path):
    # Every run already has results.json: nothing trains, the manifest is kept up to date.
    runs = sweep.expand({'batch_size': [16], 'optim.lr_rule': ['linear'], 'seed': [0, 1]})
    logged = []
    status = sweep.run_local(TINY, runs, fabricated, log=logged.append)
    assert status == {r.name: 'skipped' for r in runs}
    assert all('skipped' in m for m in logged)
    with open(os.path.join(fabricated, sweep.MANIFEST)) as f:
        manifest = json.load(f)
    assert len(manifest['runs']) == 8 and manifest['config'] == TINY
    with pytest.raises(ConfigError):
        sweep.run_local(TINY, runs, fabricated, mode='cluster')


def test_run_benchmark_parses_json_lines(tmp_path):
    stub = tmp_path / 'fake_python'
    stub.write_text('#!/bin/bash\necho "I0000 some log line"\n'
                    'echo \'{"global_batch": 16, "images_per_s": 10.0}\'\n'
                    'echo \'{"global_batch": 32, "images_per_s": 19.5}\'\n'
                    'echo "args: $*" >&2\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    out = sweep.run_benchmark(TINY, [16, 32], steps=3, warmup=1, python=str(stub))
    assert out == [{'global_batch': 16, 'images_per_s': 10.0},
                   {'global_batch': 32, 'images_per_s': 19.5}]


def _sweep_cli(*args):
    return subprocess.run([sys.executable, os.path.join(LAUNCH, 'sweep.py'), *args],
                          capture_output=True, text=True, cwd=REPO)


def test_launch_sweep_cli_formats():
    out = _sweep_cli('--config=configs/scaling_tiny.py', '--root=/tmp/st',
                     '--extra=--distributed=auto')
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == sweep.commands(
        'configs/scaling_tiny.py', sweep.runs_for(TINY), '/tmp/st', ['--distributed=auto'])
    out = _sweep_cli('--config=configs/scaling_cifar.py', '--root=/r', '--axis=batch_size=256,512',
                     '--axis=seed=0,1', '--format=commands')
    assert [ln.split('--workdir=')[1] for ln in out.stdout.splitlines()] == [
        '/r/batch_size-256__seed-0', '/r/batch_size-256__seed-1',
        '/r/batch_size-512__seed-0', '/r/batch_size-512__seed-1']
    out = _sweep_cli('--config=configs/scaling_tiny.py', '--root=/r', '--format=slurm_array',
                     '--sbatch=--time=01:00:00')
    assert '#SBATCH --array=0-2' in out.stdout and '#SBATCH --time=01:00:00' in out.stdout
    out = _sweep_cli('--config=configs/scaling_tiny.py', '--root=/r', '--axis=nonsense')
    assert out.returncode == 1 and 'jaxad: error: axis' in out.stderr


def test_importing_launch_sweep_defines_no_flags():
    """Only the script defines its flags, so the module imports next to jaxad.main's."""
    code = ('import launch.sweep, jaxad.main; from absl import flags; '
            'assert "root" not in flags.FLAGS and "axis" not in flags.FLAGS')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _stub_bin(tmp_path, **scripts):
    """A directory of stand-in commands: name -> bash body."""
    d = tmp_path / 'bin'
    d.mkdir(exist_ok=True)
    for name, body in scripts.items():
        p = d / name
        p.write_text(f'#!/bin/bash\n{body}\n')
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return d


@pytest.mark.parametrize('script', ['tpu_pod.sh', 'slurm_multinode.sbatch'])
def test_shell_launchers_parse(script):
    subprocess.run(['bash', '-n', os.path.join(LAUNCH, script)], check=True)


def test_tpu_pod_dry_run(tmp_path):
    env = dict(os.environ, DRY_RUN='1', TPU_NAME='t1', ZONE='z1', ACCELERATOR_TYPE='v4-16',
               BUCKET='my-bucket',
               CONFIG='configs/scaling_cifar.py:epochs=2', TRAIN_FLAGS='--config.batch_size=512',
               FETCH_DIR=str(tmp_path / 'fetched'))
    out = subprocess.run(['bash', os.path.join(LAUNCH, 'tpu_pod.sh'), 'all'], env=env,
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0].startswith('gcloud compute tpus tpu-vm create t1 --zone=z1 '
                               '--accelerator-type=v4-16 --version=')
    assert any('tpu-vm scp --recurse' in ln and '--worker=all' in ln for ln in lines)
    run = [ln for ln in lines if 'jaxad.main' in ln]
    assert len(run) == 1 and '--worker=all' in run[0] and 'distributed=auto' in run[0]
    assert 'batch_size=512' in run[0] and 'pip' not in run[0]
    assert 'workdir=gs://my-bucket/jaxad_runs/t1' in run[0]
    assert any('pip\\ install' in ln and '-e\\ \\\'.\\[gcs\\]' in ln for ln in lines)
    assert lines[-1] == 'gcloud compute tpus tpu-vm delete t1 --zone=z1 --quiet '
    bad = subprocess.run(['bash', os.path.join(LAUNCH, 'tpu_pod.sh'), 'nope'], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and 'usage' in bad.stderr


def test_slurm_multinode_with_stand_ins(tmp_path):
    stub = _stub_bin(
        tmp_path,
        scontrol='printf "gpu-node-07\\ngpu-node-08\\n"',
        # srun: drop its options, run the command as task 1 of 2.
        srun='while [[ "$1" == --* ]]; do shift; done; SLURM_PROCID=1 "$@"',
        python='echo "python $*"')
    env = dict(os.environ, PATH=f'{stub}:{os.environ["PATH"]}', SLURM_JOB_NODELIST='gpu-node-[07-08]',
               SLURM_NTASKS='2', SLURM_JOB_NUM_NODES='2', SLURM_JOB_ID='4242',
               CONFIG='configs/scaling_cifar.py:epochs=2', WORKDIR=str(tmp_path / 'w'),
               TRAIN_FLAGS='--config.batch_size=1024 --config.seed=1')
    out = subprocess.run(['bash', os.path.join(LAUNCH, 'slurm_multinode.sbatch')], env=env,
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert 'coordinator gpu-node-07:24242' in out
    assert out.splitlines()[-1] == (
        f'python -m jaxad.main --config=configs/scaling_cifar.py:epochs=2 '
        f'--workdir={tmp_path / "w"} --coordinator_address=gpu-node-07:24242 '
        '--num_processes=2 --process_id=1 --config.batch_size=1024 --config.seed=1')
    assert os.path.isdir(tmp_path / 'w')
    with open(os.path.join(LAUNCH, 'slurm_multinode.sbatch')) as f:
        text = f.read()
    for directive in ('#SBATCH --nodes=', '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node='):
        assert directive in text


def test_launcher_flags_exist_in_jaxad_main():
    """The flags the launchers pass are jaxad.main's.

    No skip: jaxad.main has these flags, so a missing one, or a jaxad.main that crashes
    before printing its help, is a failure (absl exits 1 after --helpfull, as does an
    uncaught exception, so the traceback and the printed flags tell them apart).
    """
    proc = subprocess.run([sys.executable, '-m', 'jaxad.main', '--helpfull'],
                          capture_output=True, text=True, cwd=REPO)
    out = proc.stdout
    crash = f'jaxad.main --helpfull (exit {proc.returncode}) stderr:\n{proc.stderr[-4000:]}'
    assert 'Traceback' not in proc.stderr, crash
    for flag in ('--coordinator_address', '--num_processes', '--process_id', '--distributed'):
        assert flag in out, f'{flag} not in the help; {crash}'
    assert 'auto' in out.split('--distributed')[1].split('--')[0]


# A stand-in `gcloud` for the rerun loop: it logs every call; the TPU's state lives in a
# file; the training command fails as a preempted run does (SIGTERM -> non-zero, the spot
# VM taken away) until RUNS_BEFORE_DONE runs have happened, then writes results.json.
_GCLOUD = r"""
echo "$*" >> "$STATE_DIR/calls"
case "$*" in
  *"tpu-vm describe"*) cat "$STATE_DIR/state" 2>/dev/null ;;
  *"tpu-vm create"*) echo READY > "$STATE_DIR/state" ;;
  *"tpu-vm delete"*) rm -f "$STATE_DIR/state" ;;
  *"storage ls"*) test -f "$STATE_DIR/results.json"; exit $? ;;
  *jaxad.main*)
    n=$(( $(cat "$STATE_DIR/runs" 2>/dev/null || echo 0) + 1 )); echo $n > "$STATE_DIR/runs"
    if [[ "$FAIL_WITH" == 1 ]]; then exit 1; fi
    if (( n < RUNS_BEFORE_DONE )); then echo PREEMPTED > "$STATE_DIR/state"; exit 143; fi
    touch "$STATE_DIR/results.json" ;;
esac
exit 0
"""


@pytest.mark.parametrize('fail_with', [143, 1])
def test_tpu_pod_run_reruns_after_a_preemption_until_results_exist(tmp_path, fail_with):
    """A preempted attempt (exit 143 and the spot TPU gone): the TPU is recreated, set up
    again and the same command rerun, until results.json exists on gs://; exit status 1
    (jaxad's error for a bad config) is not retried."""
    state = tmp_path / 'state_dir'
    state.mkdir()
    (state / 'state').write_text('READY\n')
    stub = _stub_bin(tmp_path, gcloud=_GCLOUD)
    env = dict(os.environ, PATH=f'{stub}:{os.environ["PATH"]}', STATE_DIR=str(state),
               RUNS_BEFORE_DONE='3', FAIL_WITH=str(fail_with), TPU_NAME='t1', ZONE='z1',
               BUCKET='my-bucket', RETRY_SECS='0')
    out = subprocess.run(['bash', os.path.join(LAUNCH, 'tpu_pod.sh'), 'run'], env=env,
                         capture_output=True, text=True)
    calls = (state / 'calls').read_text().splitlines()
    runs = [c for c in calls if 'jaxad.main' in c]
    if fail_with == 1:
        assert out.returncode == 1 and 'not retrying' in out.stderr
        assert len(runs) == 1
        return
    assert out.returncode == 0, out.stderr
    assert len(runs) == 3 and len(set(runs)) == 1  # the same command each time
    assert 'workdir=gs://my-bucket/jaxad_runs/t1' in runs[0]
    first, second = [i for i, c in enumerate(calls) if 'jaxad.main' in c][:2]
    between = calls[first + 1:second]
    for step in ('tpu-vm delete', 'tpu-vm create', 'scp --recurse', 'pip install'):
        assert any(step in c for c in between), (step, between)
    assert out.stderr.count('rerunning the same command') == 2
