"""The original CSI train step (alinlab/CSI, PyTorch) against jaxad's, alternating, on this host.

python benchmarks/vs_original_csi.py --csi_path=/tmp/CSI --pairs=3 --steps=5 --batch_size=32

`--csi_path` is a checkout of https://github.com/alinlab/CSI (not part of this project; it is
imported from there, never copied). One iteration of the original is the body of the loop in
its `training/unsup/simclr_CSI.py` (`--mode simclr_CSI --shift_trans_type rotation`), built
as its `common/train.py` / `train.py` build it for the paper's one-class CIFAR-10 run:
CIFAR ResNet-18 (`models.classifier.get_classifier('resnet18', 10)` with the K=4 shift head),
`simclr_aug` (colour jitter p=0.8, grey p=0.2, RandomResizedCropLayer scale (0.08, 1)), the
random horizontal flip, the 4 rotations x 2 views, normalised projections, NT-Xent with
temperature 0.5, the shift cross-entropy, LARS(SGD lr 0.1, momentum 0.9, weight decay 1e-6,
eps 1e-8, trust coefficient 0.001), the warm-up/cosine scheduler step, and the linear-eval head's
Adam step on the detached penultimate features (the loop does it every iteration; a 512 x 10
layer on 2B rows, negligible). Inputs are `batch_size` random images in [0, 1] (the loader's
ToTensor output); the loader itself is not timed on either side.

Two things differ from running their code unchanged, both outside their files:
  * torch 2.x's `adaptive_avg_pool2d` rejects the 3-element size CSI passes to its crop layer
    (`P.image_size = (32, 32, 3)`); older torch read only the first two elements. The harness
    wraps `torch.nn.functional.adaptive_avg_pool2d` to pass `size[:2]` (a 32 -> 32 identity
    pooling here).
  * torchlars (`from torchlars import LARS`) does not build on this host (its setup needs a
    CUDA extension build), so `LARS` below is a transcription of torchlars 0.1.2's wrapper:
    per parameter, weight decay hidden from SGD, trust ratio
    trust_coef * |p| / (|g| + wd |p| + eps) (1 where |p| or |g| is 0, as its C++
    `compute_adaptive_lr`), g <- (g + wd p) * ratio, then SGD's step.
  `diffdist` (imported by their contrastive_loss.py, used only for multi-GPU) is stubbed when
  it is not installed.

jaxad's step is the trainer's jitted step (`jaxad.programs.train_step(config, (32, 32, 3)).fn`,
i.e. `loop.jit_train_step(loop.make_train_step(...))`) for `--config` at `--batch_size` images,
run on real arrays (an initialised TrainState, uint8 images), its state fed back each step
(the step donates it), each step ended with `block_until_ready`.

Both sides are built and warmed up first (`--warmup` untimed steps each; jaxad also compiles).
Then, for each of `--pairs` pairs: `--steps` timed steps of the original, then `--steps` of
jaxad. One JSON line per pair (per-step seconds and medians, ratio original_s / jaxad_s: > 1
means jaxad is faster), then a summary line (per-pair medians and ratios, overall medians and
ratio over all steps, device, versions, torch threads, load average before and after).
torch runs with `torch.set_num_threads(os.cpu_count())` unless `--torch_threads` says otherwise.
Never part of the test pass/fail.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
import types
import warnings

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


def load_avg():
    return [round(v, 2) for v in os.getloadavg()]


# ---------------------------------------------------------------------------------------------
# The original (alinlab/CSI) step.

def _lars_class(torch):
    """torchlars 0.1.2's LARS wrapper (module docstring), for hosts where torchlars does not
    build."""
    from contextlib import contextmanager

    class LARS(torch.optim.Optimizer):
        def __init__(self, optimizer, eps=1e-8, trust_coef=0.001):
            self.optim = optimizer
            self.eps = eps
            self.trust_coef = trust_coef

        @property
        def param_groups(self):
            return self.optim.param_groups

        @property
        def state(self):
            return self.optim.state

        def zero_grad(self, set_to_none=True):
            self.optim.zero_grad()

        @contextmanager
        def hide_weight_decays(self):
            decays = []
            for group in self.optim.param_groups:
                decays.append(group.get('weight_decay'))
                if 'weight_decay' in group:
                    group['weight_decay'] = 0
            try:
                yield decays
            finally:
                for group, wd in zip(self.optim.param_groups, decays):
                    if wd is not None:
                        group['weight_decay'] = wd

        def apply_adaptive_lrs(self, decays):
            with torch.no_grad():
                for group, wd in zip(self.optim.param_groups, decays):
                    wd = 0.0 if wd is None else wd
                    for p in group['params']:
                        if p.grad is None:
                            continue
                        p_norm = p.norm()
                        g_norm = p.grad.norm()
                        if p_norm > 0 and g_norm > 0:  # compute_adaptive_lr (adaptive_lr.cc)
                            ratio = p_norm / (g_norm + wd * p_norm + self.eps) * self.trust_coef
                        else:
                            ratio = torch.ones_like(p_norm)
                        p.grad.add_(p.data, alpha=wd)
                        p.grad.mul_(ratio)

        def step(self, *args, **kwargs):
            with self.hide_weight_decays() as decays:
                self.apply_adaptive_lrs(decays)
                return self.optim.step(*args, **kwargs)
    return LARS


def build_original(csi_path, batch_size, threads, seed=0):
    """(step(), info): one iteration of CSI's simclr_CSI train loop (module docstring)."""
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    csi_path = os.path.abspath(csi_path)
    if csi_path not in sys.path:
        sys.path.insert(0, csi_path)
    try:
        import diffdist.functional  # noqa: F401
    except ImportError:  # multi-GPU only (contrastive_loss.get_similarity_matrix)
        stub = types.ModuleType('diffdist')
        stub.functional = types.ModuleType('diffdist.functional')
        sys.modules['diffdist'] = stub
        sys.modules['diffdist.functional'] = stub.functional

    # The crop layer's F.adaptive_avg_pool2d(output, (32, 32, 3)): torch 2.x wants 2 sizes.
    pool = F.adaptive_avg_pool2d
    if not getattr(pool, '_csi_patched', False):
        def adaptive_avg_pool2d(x, output_size):
            if isinstance(output_size, (tuple, list)) and len(output_size) == 3:
                output_size = tuple(output_size[:2])
            return pool(x, output_size)
        adaptive_avg_pool2d._csi_patched = True
        F.adaptive_avg_pool2d = adaptive_avg_pool2d

    import models.classifier as C
    import models.transform_layers as TL
    from training.contrastive_loss import NT_xent, get_similarity_matrix
    from training.scheduler import GradualWarmupScheduler
    from utils.utils import normalize
    try:
        from torchlars import LARS
        lars_source = 'torchlars'
    except ImportError:
        LARS = _lars_class(torch)
        lars_source = 'harness transcription of torchlars 0.1.2 (torchlars does not build here)'

    # common/common.py defaults of the README's training command (simclr_CSI, rotation).
    P = types.SimpleNamespace(dataset='cifar10', model='resnet18', resize_factor=0.08,
                              resize_fix=False, shift_trans_type='rotation', mode='simclr_CSI',
                              batch_size=batch_size, lr_init=0.1, weight_decay=1e-6,
                              epochs=1000, warmup=10, sim_lambda=1.0, multi_gpu=False,
                              image_size=(32, 32, 3), n_classes=10)
    device = torch.device('cpu')
    simclr_aug = C.get_simclr_augmentation(P, image_size=P.image_size).to(device)
    shift_trans, K_shift = C.get_shift_module(P, eval=True)
    model = C.get_classifier(P.model, n_classes=P.n_classes).to(device)
    model = C.get_shift_classifer(model, K_shift).to(device)
    criterion = nn.CrossEntropyLoss().to(device)
    base = torch.optim.SGD(model.parameters(), lr=P.lr_init, momentum=0.9,
                           weight_decay=P.weight_decay)
    optimizer = LARS(base, eps=1e-8, trust_coef=0.001)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, P.epochs)
    scheduler_warmup = GradualWarmupScheduler(optimizer, multiplier=10.0, total_epoch=P.warmup,
                                              after_scheduler=scheduler)
    linear = model.linear
    linear_optim = torch.optim.Adam(linear.parameters(), lr=1e-3, betas=(.9, .999),
                                    weight_decay=P.weight_decay)
    hflip = TL.HorizontalFlipLayer().to(device)
    images = torch.rand(batch_size, 3, 32, 32)
    labels = torch.zeros(batch_size, dtype=torch.long)
    counter = {'n': 0}
    epoch, loader_len = 1, 100

    def step():
        # training/unsup/simclr_CSI.py, one iteration of `for n, (images, labels) in loader`
        n = counter['n']
        counter['n'] += 1
        model.train()
        images1, images2 = hflip(images.repeat(2, 1, 1, 1)).chunk(2)
        images1 = torch.cat([shift_trans(images1, k) for k in range(K_shift)])
        images2 = torch.cat([shift_trans(images2, k) for k in range(K_shift)])
        shift_labels = torch.cat([torch.ones_like(labels) * k for k in range(K_shift)], 0)
        shift_labels = shift_labels.repeat(2)
        images_pair = torch.cat([images1, images2], dim=0)
        images_pair = simclr_aug(images_pair)
        _, outputs_aux = model(images_pair, simclr=True, penultimate=True, shift=True)
        simclr = normalize(outputs_aux['simclr'])
        sim_matrix = get_similarity_matrix(simclr, multi_gpu=P.multi_gpu)
        loss_sim = NT_xent(sim_matrix, temperature=0.5) * P.sim_lambda
        loss_shift = criterion(outputs_aux['shift'], shift_labels)
        loss = loss_sim + loss_shift
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler_warmup.step(epoch - 1 + n / loader_len)
        penul_1 = outputs_aux['penultimate'][:batch_size]
        penul_2 = outputs_aux['penultimate'][K_shift * batch_size: (K_shift + 1) * batch_size]
        outputs_aux['penultimate'] = torch.cat([penul_1, penul_2])
        outputs_linear_eval = linear(outputs_aux['penultimate'].detach())
        loss_linear = criterion(outputs_linear_eval, labels.repeat(2))
        linear_optim.zero_grad()
        loss_linear.backward()
        linear_optim.step()
        return loss_sim.item(), loss_shift.item()

    info = {'torch': torch.__version__, 'torch_threads': torch.get_num_threads(),
            'lars': lars_source, 'views': 2 * K_shift * batch_size}
    return step, info


# ---------------------------------------------------------------------------------------------
# jaxad's step.

def load_config(spec):
    import importlib.util
    path, _, arg = spec.partition(':')
    module_spec = importlib.util.spec_from_file_location('bench_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def build_jaxad(config_spec, batch_size, overrides=()):
    """(step(), info, compile_s): the trainer's jitted step on real arrays."""
    import jax
    import numpy as np

    from jaxad import loop, programs

    config = load_config(config_spec)
    for item in overrides:
        key, value = item.split('=', 1)
        target = config
        *parents, leaf = key.split('.')
        for p in parents:
            target = target[p]
        target[leaf] = type(target[leaf])(value)
    config.batch_size = batch_size
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    prog = programs.train_step(config, shape)
    method, tx, _ = programs.method_and_optimizer(config)
    state = jax.jit(loop.make_init_fn(method, tx, shape))(loop.init_key(config.seed))
    images = np.random.default_rng(0).integers(0, 256, (batch_size,) + shape, dtype=np.uint8)
    batch = {'image': jax.device_put(images)}
    key = jax.random.key(1)
    t0 = time.perf_counter()
    compiled = prog.fn.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    box = {'state': state}

    def step():
        box['state'], metrics = compiled(box['state'], batch, key)
        jax.block_until_ready((box['state'], metrics))

    info = {'jax': jax.__version__, 'jaxlib': jax.lib.__version__ if hasattr(jax.lib, '__version__')
            else None, 'device': jax.devices()[0].device_kind,
            'conv_impl': config.model.conv_impl, 'model_dtype': config.model.dtype,
            'xla_flags': os.environ.get('XLA_FLAGS', ''),
            'views': batch_size * 2 * method.num_shifts}
    return step, info, compile_s


def timed(step, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--csi_path', required=True, help='checkout of github.com/alinlab/CSI')
    p.add_argument('--config', default=os.path.join(_ROOT, 'configs', 'csi_cifar.py'))
    p.add_argument('--override', action='append', default=[],
                   help='jaxad config field=value, e.g. model.conv_impl=xla (repeatable)')
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--pairs', type=int, default=3)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--torch_threads', type=int, default=0, help='0: os.cpu_count()')
    p.add_argument('--label', default='', help='free text copied into every line')
    a = p.parse_args(argv)
    # their scheduler.step(epoch) call is deprecated in torch 2.x (same closed-form lr)
    warnings.filterwarnings('ignore', message='The epoch parameter', category=UserWarning)

    load_before = load_avg()
    threads = a.torch_threads or os.cpu_count()
    orig_step, orig_info = build_original(a.csi_path, a.batch_size, threads)
    jax_step, jax_info, compile_s = build_jaxad(a.config, a.batch_size, a.override)
    timed(orig_step, a.warmup)
    timed(jax_step, a.warmup)

    rows = []
    for pair in range(a.pairs):
        load = load_avg()
        orig = timed(orig_step, a.steps)
        jx = timed(jax_step, a.steps)
        row = {'pair': pair, 'original_s': [round(t, 3) for t in orig],
               'jaxad_s': [round(t, 3) for t in jx],
               'original_median_s': round(statistics.median(orig), 3),
               'jaxad_median_s': round(statistics.median(jx), 3),
               'ratio_original_over_jaxad': round(statistics.median(orig)
                                                  / statistics.median(jx), 3),
               'load_avg': load}
        if a.label:
            row['label'] = a.label
        rows.append((orig, jx))
        print(json.dumps(row), flush=True)

    all_orig = [t for o, _ in rows for t in o]
    all_jax = [t for _, j in rows for t in j]
    summary = {
        'summary': True, 'label': a.label, 'batch_size': a.batch_size,
        'views': jax_info['views'], 'pairs': a.pairs, 'steps': a.steps, 'warmup': a.warmup,
        'original_medians_s': [round(statistics.median(o), 3) for o, _ in rows],
        'jaxad_medians_s': [round(statistics.median(j), 3) for _, j in rows],
        'ratios': [round(statistics.median(o) / statistics.median(j), 3) for o, j in rows],
        'original_median_s': round(statistics.median(all_orig), 3),
        'jaxad_median_s': round(statistics.median(all_jax), 3),
        'ratio_original_over_jaxad': round(statistics.median(all_orig)
                                           / statistics.median(all_jax), 3),
        'jaxad_compile_s': round(compile_s, 2), 'overrides': a.override,
        'cpu_count': os.cpu_count(), 'machine': platform.machine(),
        'processor': platform.processor(), 'python': platform.python_version(),
        'load_avg_before': load_before, 'load_avg_after': load_avg(),
        **{f'original_{k}': v for k, v in orig_info.items() if k != 'views'},
        **{f'jaxad_{k}': v for k, v in jax_info.items()},
    }
    print(json.dumps(summary), flush=True)


if __name__ == '__main__':
    main()
