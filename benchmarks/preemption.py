"""Signal-to-exit time of a preempted run; prints one JSON line per trial.

python benchmarks/preemption.py                   # quickstart, SIGTERM at step 35 of 60
python benchmarks/preemption.py --signal=INT --trials=3
python benchmarks/preemption.py --processes=2     # two CPU processes on loopback

Runs the real command line, `python -m jaxad.main --config=CONFIG --workdir=W
--config.checkpoint.every_steps=1000 --config.log_every=L` (--processes=2: two processes,
one device each, sharing W), waits until W/metrics.jsonl holds step --at_step (which is why
log_every defaults to 5 here, not the quickstart's 25), sends the signal (to the last
process), and times until every process has exited. The line gives `signal_to_exit_s`,
`stopped_at_step` (from the one-line message jaxad prints) and the steps committed in
W/checkpoints, each process's exit status, the machine's load average before and after
(the figures are wall time on a shared machine), and versions. --rerun also reruns the
same command and reports whether it resumed from that step and finished.
Never part of the test pass/fail.
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE = re.compile(r'jaxad: preempted \((.+?)\) at step (\d+) of (\d+)')


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--config', default='configs/quickstart.py:epochs=30',
                   help='config (default: the quickstart at 30 epochs = 60 steps)')
    p.add_argument('--at_step', type=int, default=35,
                   help='signal once metrics.jsonl holds this step (a multiple of log_every)')
    p.add_argument('--log_every', type=int, default=5)
    p.add_argument('--signal', default='TERM', choices=['TERM', 'INT'])
    p.add_argument('--processes', type=int, default=1)
    p.add_argument('--trials', type=int, default=1)
    p.add_argument('--rerun', action='store_true', help='rerun and check the resume')
    p.add_argument('--workdir', default=None, help='parent of the trials\' workdirs '
                   '(default: a temporary directory, removed afterwards)')
    p.add_argument('--timeout', type=float, default=1800)
    p.add_argument('overrides', nargs='*', help='more --config.X=Y flags for jaxad.main')
    return p.parse_args()


def free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def start(args, workdir, log_dir, tag):
    """The run's processes: [(Popen, stderr path)]."""
    base = [sys.executable, '-m', 'jaxad.main', f'--config={args.config}',
            f'--workdir={workdir}', '--config.checkpoint.every_steps=1000',
            f'--config.log_every={args.log_every}', *args.overrides]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get('PYTHONPATH')) if p))
    commands = [base]
    if args.processes > 1:
        xla = re.sub(r'--xla_force_host_platform_device_count=\S+', '',
                     env.get('XLA_FLAGS', ''))
        env.update(JAX_PLATFORMS='cpu',
                   XLA_FLAGS=f'{xla} --xla_force_host_platform_device_count=1'.strip())
        address = f'localhost:{free_port()}'
        commands = [base + [f'--coordinator_address={address}',
                            f'--num_processes={args.processes}', f'--process_id={i}']
                    for i in range(args.processes)]
    procs = []
    for i, cmd in enumerate(commands):
        err = os.path.join(log_dir, f'{tag}_p{i}.err')
        with open(os.path.join(log_dir, f'{tag}_p{i}.out'), 'w') as out, open(err, 'w') as e:
            procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=e,
                                           stdin=subprocess.DEVNULL), err))
    return procs, ' '.join(base[1:])


def logged_steps(workdir):
    try:
        with open(os.path.join(workdir, 'metrics.jsonl')) as f:
            return [json.loads(line)['step'] for line in f if line.endswith('\n')]
    except (OSError, ValueError):
        return []


def committed(workdir):
    d = os.path.join(workdir, 'checkpoints')
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def read(path):
    with open(path) as f:
        return f.read()


def wait(procs, deadline):
    for proc, _ in procs:
        proc.wait(timeout=max(deadline - time.time(), 1))
    return [proc.returncode for proc, _ in procs]


def trial(args, root, n):
    workdir, log_dir = os.path.join(root, f'run{n}'), os.path.join(root, f'logs{n}')
    os.makedirs(log_dir)
    procs, command = start(args, workdir, log_dir, 'first')
    deadline = time.time() + args.timeout
    try:
        while args.at_step not in logged_steps(workdir):
            if any(p.poll() is not None for p, _ in procs):
                raise RuntimeError('the run exited before step %d:\n%s' % (
                    args.at_step, read(procs[0][1])[-3000:]))
            if time.time() > deadline:
                raise RuntimeError(f'timed out waiting for step {args.at_step}')
            time.sleep(0.01)
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        procs[-1][0].send_signal(getattr(signal, f'SIG{args.signal}'))
        codes = wait(procs, deadline)
        seconds = time.perf_counter() - t0
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
    messages = [MESSAGE.search(read(err)) for _, err in procs]
    line = dict(
        kind='preemption', command=command, processes=args.processes,
        signal=f'SIG{args.signal}', signalled_after_logged_step=args.at_step,
        signal_to_exit_s=round(seconds, 2), exit_codes=codes,
        stopped_at_step=[int(m.group(2)) if m else None for m in messages],
        total_steps=int(messages[0].group(3)) if messages[0] else None,
        reasons=[m.group(1) if m else None for m in messages],
        committed_steps=committed(workdir), loadavg_before=[round(x, 2) for x in load_before],
        loadavg_after=[round(x, 2) for x in os.getloadavg()], cpus=os.cpu_count(),
        python=platform.python_version(), **versions())
    if args.rerun:
        procs, _ = start(args, workdir, log_dir, 'rerun')
        t0 = time.perf_counter()
        codes = wait(procs, time.time() + args.timeout)
        resumed = re.search(r'resuming from \S+ step (\d+)', read(procs[0][1]))
        line.update(rerun_exit_codes=codes, rerun_s=round(time.perf_counter() - t0, 2),
                    rerun_resumed_from=int(resumed.group(1)) if resumed else None,
                    rerun_results=os.path.exists(os.path.join(workdir, 'results.json')))
    return line


def versions():
    out = subprocess.run([sys.executable, '-c', 'import jax, orbax.checkpoint as o; '
                          'print(jax.__version__, o.__version__)'],
                         capture_output=True, text=True).stdout.split()
    return dict(jax=out[0] if out else None, orbax=out[1] if len(out) > 1 else None)


def main():
    args = parse_args()
    if args.at_step % args.log_every:
        sys.exit(f'--at_step={args.at_step} is not a multiple of --log_every={args.log_every}')
    root = args.workdir or tempfile.mkdtemp(prefix='jaxad_preemption_')
    try:
        for n in range(args.trials):
            print(json.dumps(trial(args, root, n)), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
