"""Training speed of two commits on the same workload, run alternately (A B A B ...).

    python benchmarks/compare_commits.py --a=efa12a8 --b=HEAD [--pairs=3]
        [--config=configs/csi_fmnist.py:normal_class=5,width=16]
        [--set=data.source=idx --set=batch_size=32] [--steps=80 --measure_from=40]

Each commit is checked out into a temporary detached git worktree, and each run is that
commit's own `python -m jaxad.main` (PYTHONPATH at the worktree, so it imports that
commit's jaxad) training the config for --steps steps in a fresh workdir, logging every
--log_every steps and saving no checkpoint before the end. The run is killed once its
last step is logged (the evaluation after training is not what is compared). The figure is
images/s over steps (measure_from, steps]: the window's images over the sum of its log
intervals (each log line's steps_per_sec covers the steps since the previous line), so
compilation and the first steps are left out. Runs alternate, so both commits see the
same drift of a shared machine; the output is one JSON object with every run, each
commit's median and the B/A ratio of each pair. The config file is read from each
commit's own tree (so a config that changed is compared as each commit had it).
With --set_a / --set_b (and the same commit as --a and --b) it times one setting instead.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worktree(commit, root):
    """A detached worktree of `commit` under `root`; (path, full hash)."""
    full = subprocess.run(['git', '-C', REPO, 'rev-parse', commit], check=True,
                          capture_output=True, text=True).stdout.strip()
    path = os.path.join(root, full[:12])
    subprocess.run(['git', '-C', REPO, 'worktree', 'add', '--detach', path, full], check=True,
                   capture_output=True)
    return path, full


def window_rate(metrics_path, measure_from, steps, batch_size):
    """images/s over steps (measure_from, steps] from metrics.jsonl."""
    lines = [json.loads(line) for line in open(metrics_path) if line.strip()]
    steps_logged = [int(r['step']) for r in lines]
    seconds, images, previous = 0.0, 0, None
    for r in lines:
        step = int(r['step'])
        if previous is not None and step > measure_from:
            n = step - max(previous, measure_from)
            if previous < measure_from:
                raise ValueError(f'measure_from={measure_from} is not a logged step '
                                 f'(logged: {steps_logged})')
            seconds += n / float(r['steps_per_sec'])
            images += n * batch_size
        previous = step
    if steps_logged[-1] != steps:
        raise ValueError(f'{metrics_path}: last logged step {steps_logged[-1]}, expected {steps}')
    return images / seconds


def run_once(tree, args, workdir, log_path, extra=()):
    """Trains in `workdir` with `tree`'s jaxad (and the `extra` overrides); returns images/s
    over the window."""
    overrides = [f'--config.{kv}' for kv in list(args.set) + list(extra)] + [
        f'--config.total_steps={args.steps}', f'--config.log_every={args.log_every}',
        f'--config.checkpoint.every_steps={10 * args.steps}']
    env = dict(os.environ, PYTHONPATH=tree, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
    metrics = os.path.join(workdir, 'metrics.jsonl')
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(
            [sys.executable, '-m', 'jaxad.main', f'--config={os.path.join(tree, args.config)}',
             f'--workdir={workdir}', *overrides],
            cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + args.timeout
        try:
            while proc.poll() is None and time.time() < deadline:
                if os.path.exists(metrics) and any(
                        json.loads(line).get('step') == args.steps
                        for line in open(metrics) if line.strip()):
                    break  # trained: the evaluation is not compared
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    if not os.path.exists(metrics):
        raise RuntimeError(f'the run wrote no metrics.jsonl; see {log_path}')
    batch = next(int(kv.split('=', 1)[1]) for kv in args.set if kv.startswith('batch_size='))
    return window_rate(metrics, args.measure_from, args.steps, batch)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--a', required=True, help='first commit (any git revision)')
    parser.add_argument('--b', required=True, help='second commit')
    parser.add_argument('--pairs', type=int, default=3)
    parser.add_argument('--config', default='configs/csi_fmnist.py:normal_class=5,width=16',
                        help='config file (relative to each commit\'s tree) and argument')
    parser.add_argument('--set', action='append', default=None,
                        help='--config.KEY=VALUE override, repeatable (batch_size= required)')
    parser.add_argument('--set_a', action='append', default=[],
                        help='an override for the runs of --a only (to time one setting: '
                             'the same commit as --a and --b with --set_a/--set_b)')
    parser.add_argument('--set_b', action='append', default=[], help='the same for --b')
    parser.add_argument('--steps', type=int, default=80)
    parser.add_argument('--measure_from', type=int, default=40)
    parser.add_argument('--log_every', type=int, default=10)
    parser.add_argument('--timeout', type=float, default=900, help='seconds per run')
    args = parser.parse_args(argv)
    args.set = args.set or ['data.source=idx', 'batch_size=32']
    if not any(kv.startswith('batch_size=') for kv in args.set):
        parser.error('--set=batch_size=N is required (the images per step)')
    root = tempfile.mkdtemp(prefix='jaxad-compare-')
    trees = {}
    try:
        trees['a'] = worktree(args.a, root)
        same = trees['a'][1] == subprocess.run(['git', '-C', REPO, 'rev-parse', args.b],
                                               check=True, capture_output=True,
                                               text=True).stdout.strip()
        trees['b'] = trees['a'] if same else worktree(args.b, root)
        runs = {'a': [], 'b': []}
        for pair in range(args.pairs):
            for label in ('a', 'b'):
                tree, _ = trees[label]
                workdir = os.path.join(root, f'run_{label}{pair}')
                rate = run_once(tree, args, workdir, workdir + '.log',
                                getattr(args, f'set_{label}'))
                runs[label].append(rate)
                print(f'pair {pair} {label} {getattr(args, label)}: {rate:.2f} images/s',
                      file=sys.stderr, flush=True)
        result = {
            'a': {'commit': trees['a'][1], 'set': args.set_a, 'images_per_sec': runs['a'],
                  'median': statistics.median(runs['a'])},
            'b': {'commit': trees['b'][1], 'set': args.set_b, 'images_per_sec': runs['b'],
                  'median': statistics.median(runs['b'])},
            'ratio_b_over_a': [b / a for a, b in zip(runs['a'], runs['b'])],
            'config': args.config, 'set': args.set, 'steps': args.steps,
            'window': [args.measure_from, args.steps], 'cpu_count': os.cpu_count(),
        }
        result['median_ratio_b_over_a'] = statistics.median(result['ratio_b_over_a'])
        print(json.dumps(result, indent=2))
    finally:
        for tree, _ in set(trees.values()):
            subprocess.run(['git', '-C', REPO, 'worktree', 'remove', '--force', tree],
                           capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
