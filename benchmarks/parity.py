"""Seed-matched learning parity: the same CSI detector trained by jaxad and by PyTorch.

python benchmarks/parity.py --side=torch --task=digits3 --seeds=0,1,2,3,4 --out=/tmp/p/torch_digits3.jsonl
python benchmarks/parity.py --side=jaxad --task=digits3 --seeds=0,1,2,3,4 --out=/tmp/p/jaxad_digits3.jsonl
python benchmarks/parity.py --summarize /tmp/p/*.jsonl

Both sides read one jaxad config (`TASKS`: the config file, its arguments and overrides) and
train the same detector on the same NumPy arrays: jaxad through `python -m jaxad.main`, the
PyTorch side with the pieces of benchmarks/torch_reference.py (the model with PyTorch's
default init and BatchNorm, the B x 2 x K views, NT-Xent + shift cross-entropy, its
transcription of torchlars' LARS) and, here, what a training run adds to a step.

The PyTorch side uses jaxad for its inputs, not for its computation: the config file is a
jaxad config (executing it imports `jaxad.config`, and with it jax, Flax and ml_collections),
its settings are read from that ConfigDict (`torch_reference.settings_from_config`,
`schedule_settings`, the data and eval fields), and the arrays come from jaxad's own
loaders (`load_data`: `jaxad.data.sources.load_split`). The model, views, loss, optimiser,
schedule and score are this file's and torch_reference.py's PyTorch code.

* data: `jaxad.data.sources.load_split` (the same arrays as the jaxad side), the normal
  class's training images, the whole test split (label: not normal);
* batches: a stream of per-epoch permutations of the normal images cut into consecutive
  batches of `batch_size` (batches run across epoch boundaries, as jaxad's Grain pipeline),
  steps_per_epoch = n_normal // batch_size, total = optim.epochs * steps_per_epoch;
* learning rate: CSI's GradualWarmupScheduler(multiplier, warm-up) + CosineAnnealingLR(T_max =
  epochs) at fractional epoch step / steps_per_epoch, written out as jaxad's
  `optim.csi_warmup_cosine` (`csi_lr`): update i uses the rate at e = i / steps_per_epoch
  (CSI's own loop is one iteration behind: jaxad/optim.py);
* score: alinlab/CSI `evals/ood_pre.py` (get_features / get_scores): T test-time draws of
  hflip -> rot90(k) -> SimCLR augmentation at the fixed crop scale eval.crop_scale, BN in eval
  mode, features averaged over the T draws; per shift k the unit-normalised train-set means are
  the axes, w_sim,k = 1 / mean ||z_bar_k||, w_shi,k = 1 / mean logit_bar_k[k];
  score = (1/K) sum_k [w_sim,k max_m <z_bar_k, axis_k,m> + w_shi,k logit_bar_k[k]] (higher =
  more normal), image_AUROC of -score with anomaly = positive (`csi_score_torch`).

final_loss is the mean training loss (NT-Xent + shift CE) of the last `LOSS_WINDOW` steps;
last_loss the last step's. Each side writes one JSON line per seed. `--summarize` prints
each task's table: mean +- std (ddof 1) per side, the difference of the means, twice its
standard error sqrt(s1^2/n1 + s2^2/n2), the two-sided Welch t-test p-value
(scipy.stats.ttest_ind(equal_var=False)) and parity = |difference| < 2 SE: a difference
test that found none at this resolution, not a test of equivalence.

--jobs N runs N seeds at once (one child process each); --threads sets each process's
intra-op threads (torch.set_num_threads; XLA's CPU Eigen pool via XLA_FLAGS).
"""
import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_WINDOW = 10

# Task -> (config file[:args], config overrides applied to both sides).
TASKS = {
    'digits3': ('configs/quickstart.py:normal_class=3', {}),
    'digits8': ('configs/quickstart.py:normal_class=8', {}),
    # Fashion-MNIST T-shirt/top (6000 training images): a width-16 ResNet-18 at the native
    # 28x28, batch 32, one epoch (187 steps) with a 19-step (0.1 epoch) warm-up, T = 2.
    'fmnist0': ('configs/csi_fmnist.py:normal_class=0,width=16,epochs=1',
                {'batch_size': 32, 'optim.warmup_steps': 19, 'eval.num_samples': 2,
                 'eval.batch_size': 250}),
}
# jaxad-only settings that do not change what is trained or scored: every step's loss
# logged, no plots, no periodic checkpoints.
JAXAD_QUIET = {'log_every': 1, 'eval.plots': False, 'checkpoint.every_steps': 1000000}


# ------------------------------------------------------------------------------- config


def _load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_reference():
    return _load_module('torch_reference', os.path.join(ROOT, 'benchmarks',
                                                        'torch_reference.py'))


def parse_overrides(text):
    """'a.b=1,c=x' -> {'a.b': '1', 'c': 'x'} (values as strings, typed by the config)."""
    out = {}
    for item in filter(None, (text or '').split(',')):
        key, eq, value = item.partition('=')
        if not eq:
            raise SystemExit(f'--override: expected key=value, got {item!r}')
        out[key.strip()] = value.strip()
    return out


def _typed(old, value):
    if not isinstance(value, str):
        return value
    if isinstance(old, bool):
        return value.lower() in ('1', 'true', 'yes')
    if isinstance(old, int):
        return int(value)
    if isinstance(old, float):
        return float(value)
    return value


def set_field(config, dotted, value):
    *parents, leaf = dotted.split('.')
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = _typed(node[leaf], value)


def task_config(task, seed, overrides=None):
    """(config spec, overrides) of a task and the jaxad ConfigDict they give."""
    spec, task_overrides = TASKS[task]
    overrides = dict(task_overrides, **(overrides or {}))
    path, _, arg = spec.partition(':')
    arg = f'{arg},seed={seed}' if arg else f'seed={seed}'
    config = _load_module('_parity_config', os.path.join(ROOT, path)).get_config(arg)
    for key, value in overrides.items():
        set_field(config, key, value)
    return f'{path}:{arg}', overrides, config


# ---------------------------------------------------------------------- schedule (CSI's)


def csi_lr(step, base_lr, steps_per_epoch, epochs, warmup_epochs, multiplier):
    """GradualWarmupScheduler(multiplier, warmup) + CosineAnnealingLR(T_max=epochs) at
    e = step / steps_per_epoch: a linear warm-up base -> base * multiplier up to e = warmup
    (a ramp from 0 when multiplier is 1), then base * multiplier * (1 + cos(pi (e - warmup) /
    epochs)) / 2."""
    e = step / steps_per_epoch
    if warmup_epochs > 0 and e <= warmup_epochs:
        if multiplier == 1.0:
            return base_lr * e / warmup_epochs
        return base_lr * ((multiplier - 1.0) * e / warmup_epochs + 1.0)
    return base_lr * multiplier * (1.0 + math.cos(math.pi * (e - warmup_epochs) / epochs)) / 2.0


def schedule_settings(config, steps_per_epoch):
    """(base lr, epochs, warm-up epochs, multiplier) of a csi_warmup_cosine config."""
    o = config.optim
    if o.schedule != 'csi_warmup_cosine' or o.get('lr_rule', 'none') != 'none':
        raise SystemExit(f'parity trains the csi_warmup_cosine schedule with lr_rule none, '
                         f'not {o.schedule} / {o.lr_rule}')
    warmup = o.warmup_epochs
    if o.get('warmup_steps', 0) > 0:
        warmup = o.warmup_steps / steps_per_epoch
    return o.lr, o.epochs, warmup, o.warmup_multiplier


# --------------------------------------------------------------------------------- data


def load_data(config):
    """(normal training images, test images, test anomaly labels): uint8 NHWC arrays read by
    jaxad's own loaders, so both sides see identical arrays."""
    from jaxad.data import sources
    train = sources.load_split(config.data, 'train')
    test = sources.load_split(config.data, 'test')
    normal = [int(c) for c in config.data.normal_classes]
    train_images = np.asarray(train.images)[np.isin(train.labels, normal)]
    anomaly = (~np.isin(test.labels, normal)).astype(np.int64)
    return train_images, np.asarray(test.images), anomaly


def batch_stream(n, batch_size, rng):
    """Index batches of a stream of per-epoch permutations of range(n), cut consecutively."""
    buffer = np.empty(0, np.int64)
    while True:
        while len(buffer) < batch_size:
            buffer = np.concatenate([buffer, rng.permutation(n)])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


# ------------------------------------------------------------------------ the torch side


def tta_views(images, num_shifts, gen, aug):
    """uint8 (B, H, W, C) -> float (B * K, C, H, W), row b * K + k: one test-time draw of
    CSI's get_features: hflip (its own coin per row) -> rot90(k) -> SimCLR augmentation."""
    import torch
    tr = torch_reference()
    x = images.permute(0, 3, 1, 2).float() / 255.0
    b = x.shape[0]
    x = x.unsqueeze(1).expand(b, num_shifts, *x.shape[1:])
    flip = torch.rand(b, num_shifts, generator=gen) < 0.5
    x = torch.where(flip.view(b, num_shifts, 1, 1, 1), x.flip(-1), x)
    x = torch.stack([torch.rot90(x[:, k], k, dims=(-2, -1)) for k in range(num_shifts)], 1)
    return tr.simclr_augment(x.reshape(-1, *x.shape[2:]), gen, **aug)


def torch_features(model, images, num_shifts, num_samples, aug, batch_size, gen):
    """Per-draw features of uint8 images, BN in eval mode: proj (N, T, K, D) and shift
    logits (N, T, K, K), as CSI's _get_features after its reshape (here float64 numpy)."""
    import torch
    model.eval()
    z_all, l_all = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start:start + batch_size])
            zs, ls = [], []
            for _ in range(num_samples):
                out = model(tta_views(x, num_shifts, gen, aug))
                zs.append(out['proj'].view(len(x), num_shifts, -1))
                ls.append(out['shift_logits'].view(len(x), num_shifts, -1))
            z_all.append(torch.stack(zs, 1))
            l_all.append(torch.stack(ls, 1))
    return torch.cat(z_all).double(), torch.cat(l_all).double()


def csi_score_torch(train_z, train_logits, test_z, test_logits):
    """CSI's score (higher = more normal) from per-draw features (N, T, K, D), (N, T, K, K).

    Written from alinlab/CSI evals/ood_pre.py: the train features averaged over the draws
    and normalised are the axes of each shift; the weights are the inverse train means of the
    averaged feature norm and of the averaged own-shift logit.
    """
    import torch
    train_z, train_logits, test_z, test_logits = (
        torch.as_tensor(a, dtype=torch.float64)
        for a in (train_z, train_logits, test_z, test_logits))
    k = train_z.shape[2]
    shifts = torch.arange(k)
    bank = train_z.mean(1)  # (M, K, D)
    axis = bank / bank.norm(dim=-1, keepdim=True)
    weight_sim = 1.0 / bank.norm(dim=-1).mean(0)  # (K,)
    weight_shi = 1.0 / train_logits.mean(1)[:, shifts, shifts].mean(0)  # (K,)
    z = test_z.mean(1)  # (N, K, D)
    sim = torch.einsum('nkd,mkd->nkm', z, axis).max(-1).values  # (N, K)
    shi = test_logits.mean(1)[:, shifts, shifts]  # (N, K)
    return ((sim * weight_sim + shi * weight_shi).sum(1) / k).numpy()


def auroc(anomaly_scores, anomaly):
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(anomaly, anomaly_scores))


def train_torch(config, seed, threads=1, log=print, max_steps=None):
    """Trains the config's CSI detector in PyTorch; the JSON record of the run."""
    import torch
    tr = torch_reference()
    torch.set_num_threads(threads)
    t0 = time.time()
    train_images, test_images, anomaly = load_data(config)
    s = tr.settings_from_config(config)
    if config.model.get('init', 'torch') not in ('torch',):
        log(f'note: config.model.init={config.model.init!r}; the PyTorch side always uses '
            "PyTorch's default init")
    k, batch = s['num_shifts'], config.batch_size
    steps_per_epoch = len(train_images) // batch
    total = config.total_steps if config.total_steps > 0 else config.optim.epochs * steps_per_epoch
    if max_steps is not None:
        total = min(total, max_steps)
    base_lr, epochs, warmup, multiplier = schedule_settings(config, steps_per_epoch)

    torch.manual_seed(seed)
    model = tr.CSINet(s['width'], s['proj_dim'], k, s['channels'])
    opt = tr.LARS(model.parameters(), base_lr, s['momentum'], s['weight_decay'],
                  s['trust_coef'], s['lars_eps'], s['lars_exclude_1d'])
    gen = torch.Generator().manual_seed(seed)
    order = batch_stream(len(train_images), batch, np.random.default_rng(seed))
    losses = []
    model.train()
    for step in range(total):
        images = torch.from_numpy(train_images[next(order)])
        with torch.no_grad():
            views = tr.train_views(images, k, gen, s['aug'])
        out = model(views)
        loss, _, _ = tr.csi_loss(out, batch, k, s['temperature'], s['shift_weight'], s['eps'])
        opt.zero_grad()
        loss.backward()
        opt.lr = csi_lr(step, base_lr, steps_per_epoch, epochs, warmup, multiplier)
        opt.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f'non-finite loss at step {step + 1}')
        if (step + 1) % 50 == 0 or step + 1 == total:
            log(f'  torch seed {seed} step {step + 1}/{total} loss {losses[-1]:.4f} '
                f'lr {opt.lr:.4g} ({time.time() - t0:.0f} s)')
    train_s = time.time() - t0
    crop = config.eval.crop_scale
    eval_aug = dict(s['aug'], crop_scale=(crop, crop))
    feats = [torch_features(model, images, k, config.eval.num_samples, eval_aug,
                            config.eval.batch_size, gen)
             for images in (train_images, test_images)]
    score = csi_score_torch(*feats[0], *feats[1])
    return record(config, 'torch', seed, auroc(-score, anomaly), losses, total,
                  time.time() - t0, train_s=round(train_s, 1))


def record(config, side, seed, image_auroc, losses, steps, wall_s, **extra):
    window = losses[-LOSS_WINDOW:]
    return dict(side=side, seed=int(seed), image_AUROC=float(image_auroc),
                final_loss=float(np.mean(window)) if window else None,
                last_loss=float(losses[-1]) if losses else None, steps=int(steps),
                wall_s=round(wall_s, 1), **extra)


# ------------------------------------------------------------------------ the jaxad side


def thread_env(threads):
    env = dict(os.environ)
    if threads:
        flags = env.get('XLA_FLAGS', '')
        if threads == 1:
            flags += ' --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'
        env['XLA_FLAGS'] = flags.strip()
    return env


def train_jaxad(spec, overrides, config, seed, threads=0, log=print, workdir_root=None,
                keep=False):
    """One `python -m jaxad.main` run; its record from results.json and metrics.jsonl."""
    t0 = time.time()
    if workdir_root:
        os.makedirs(workdir_root, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=f'parity_s{seed}_', dir=workdir_root)
    flags = [f'--config.{k}={v}' for k, v in dict(overrides, **JAXAD_QUIET).items()]
    cmd = [sys.executable, '-m', 'jaxad.main', f'--config={spec}', f'--workdir={workdir}',
           *flags]
    log('  ' + ' '.join(cmd))
    proc = subprocess.run(cmd, cwd=ROOT, env=thread_env(threads), capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(f'jaxad run failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    with open(os.path.join(workdir, 'results.json')) as f:
        results = json.load(f)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    losses = [r['loss'] for r in sorted(rows, key=lambda r: r['step']) if 'loss' in r]
    steps = max(r['step'] for r in rows)
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return record(config, 'jaxad', seed, results['image_AUROC'], losses, steps,
                  time.time() - t0, train_s=results.get('train_seconds'),
                  init=config.model.get('init', None))


# ------------------------------------------------------------------------------ summary


def summarize(records):
    """{task: {side: stats} + difference, 2 SE, Welch p, parity} for image_AUROC, final_loss."""
    from scipy import stats
    out = {}
    tasks = sorted({r['task'] for r in records})
    for task in tasks:
        rows = [r for r in records if r['task'] == task]
        entry = {}
        for metric in ('image_AUROC', 'final_loss'):
            per = {}
            for side in ('jaxad', 'torch'):
                vals = np.array([r[metric] for r in rows if r['side'] == side], np.float64)
                per[side] = dict(n=len(vals), mean=float(vals.mean()) if len(vals) else None,
                                 std=float(vals.std(ddof=1)) if len(vals) > 1 else None,
                                 values=vals.tolist())
            a, b = per['jaxad'], per['torch']
            m = dict(per)
            if a['n'] > 1 and b['n'] > 1:
                diff = a['mean'] - b['mean']
                se = math.sqrt(a['std'] ** 2 / a['n'] + b['std'] ** 2 / b['n'])
                p = stats.ttest_ind(a['values'], b['values'], equal_var=False).pvalue
                m.update(diff=diff, two_se=2 * se, welch_p=float(p),
                         parity=bool(abs(diff) < 2 * se))
            entry[metric] = m
        out[task] = entry
    return out


def markdown(summary):
    lines = ['| task | metric | jaxad mean +- std (n) | PyTorch mean +- std (n) | difference '
             '| 2 SE | Welch p | within 2 SE |',
             '|---|---|---|---|---|---|---|---|']

    def ms(s, digits):
        if s['mean'] is None:
            return '-'
        std = '-' if s['std'] is None else f"{s['std']:.{digits}f}"
        return f"{s['mean']:.{digits}f} +- {std} ({s['n']})"
    for task, entry in summary.items():
        for metric, m in entry.items():
            d = 4 if metric == 'image_AUROC' else 3
            if 'diff' in m:
                tail = (f"{m['diff']:+.{d}f} | {m['two_se']:.{d}f} | {m['welch_p']:.3f} | "
                        f"{'yes' if m['parity'] else 'no'}")
            else:
                tail = '- | - | - | -'
            lines.append(f"| {task} | {metric} | {ms(m['jaxad'], d)} | {ms(m['torch'], d)} | "
                         f'{tail} |')
    return '\n'.join(lines)


def read_records(paths):
    out = []
    for path in paths:
        with open(path) as f:
            out.extend(json.loads(line) for line in f if line.strip())
    return out


# --------------------------------------------------------------------------------- main


def run_one(args, seed, log):
    overrides = parse_overrides(args.override)
    spec, overrides, config = task_config(args.task, seed, overrides)
    if args.side == 'torch':
        rec = train_torch(config, seed, threads=args.threads or 1, log=log,
                          max_steps=args.max_steps)
    else:
        if args.max_steps is not None:
            overrides['total_steps'] = str(args.max_steps)
        rec = train_jaxad(spec, overrides, config, seed, threads=args.threads, log=log,
                          workdir_root=args.workdir_root, keep=args.keep)
    return dict(task=args.task, **rec, overrides=overrides)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--side', choices=('torch', 'jaxad'))
    parser.add_argument('--task', choices=sorted(TASKS))
    parser.add_argument('--seeds', default='0,1,2,3,4')
    parser.add_argument('--out', help='JSONL file the records are appended to')
    parser.add_argument('--override', default='', help='extra config overrides for both '
                        "sides, 'a.b=v,c=w' (e.g. total_steps=1,optim.lr=0.0)")
    parser.add_argument('--max_steps', type=int, default=None, help='debug: stop early')
    parser.add_argument('--jobs', type=int, default=1, help='seeds run at once')
    parser.add_argument('--threads', type=int, default=0,
                        help='intra-op threads per process (0: torch 1, XLA its default)')
    parser.add_argument('--pin', action='store_true',
                        help='with --jobs: bind each child process to its own CPU core')
    parser.add_argument('--workdir_root', default=None, help='jaxad workdirs go here')
    parser.add_argument('--keep', action='store_true', help='keep the jaxad workdirs')
    parser.add_argument('--summarize', nargs='+', metavar='FILE',
                        help='print the parity table of these JSONL files')
    args = parser.parse_args(argv)
    if args.summarize:
        summary = summarize(read_records(args.summarize))
        print(markdown(summary))
        print(json.dumps(summary))
        return 0
    if not (args.side and args.task and args.out):
        parser.error('--side, --task and --out are needed (or --summarize FILE...)')
    seeds = [int(s) for s in args.seeds.split(',') if s != '']
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.jobs > 1 and len(seeds) > 1:
        return run_parallel(args, seeds)
    for seed in seeds:
        rec = run_one(args, seed, log)
        log(json.dumps(rec))
        with open(args.out, 'a') as f:
            f.write(json.dumps(rec) + '\n')
    return 0


def run_parallel(args, seeds):
    """Each seed in its own child process, `args.jobs` at a time, appending to --out; with
    --pin each child is bound to its own CPU core (os.sched_setaffinity)."""
    base = [f'--side={args.side}', f'--task={args.task}', f'--out={args.out}',
            f'--threads={args.threads}']
    for name in ('override', 'max_steps', 'workdir_root'):
        value = getattr(args, name)
        if value not in (None, ''):
            base.append(f'--{name}={value}')
    if args.keep:
        base.append('--keep')
    cores = sorted(os.sched_getaffinity(0))
    pending, running, failed = list(seeds), {}, []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            slot = next(i for i in range(args.jobs) if i not in running)
            core = {cores[slot % len(cores)]} if args.pin else None
            cmd = [sys.executable, os.path.abspath(__file__), *base, f'--seeds={seed}']
            running[slot] = (seed, subprocess.Popen(
                cmd, cwd=ROOT, preexec_fn=(lambda c=core: os.sched_setaffinity(0, c))
                if core else None))
        time.sleep(2)
        for slot, (seed, proc) in list(running.items()):
            if proc.poll() is not None:
                del running[slot]
                if proc.returncode:
                    failed.append(seed)
    if failed:
        print(f'seeds {failed} failed', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
