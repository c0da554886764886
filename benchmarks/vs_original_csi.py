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

python benchmarks/vs_original_csi.py --csi_path=/tmp/CSI --check [--torchlars_path=/tmp/torchlars]

`--check` compares one step instead of timing it: the original's (the loop body above, in
float32: views from its own augmentation of `--batch_size` random images, forward, losses,
backward, its LARS step at the scheduler's first rate), benchmarks/torch_reference.py's
(its CSINet with the original's initial weights, `csi_loss`, its `LARS`) and jaxad's (the
trainer's jitted step, `programs.train_step(config, (32, 32, 3)).fn`, with the same weights
and `jaxad.methods.csi.train_views` returning the original's views; the gradient from
`jax.grad` of the same `method.loss`), all three on the original's views, in jaxad's
(B, 2, K) row order for the other two. Compared: the losses (NT-Xent, shift CE, sum), every
parameter's gradient, the BN running statistics after the step, the LARS update on the
same given gradients over two steps (the second through the momentum buffer), and each
step's own update (-lr x the momentum buffer: its gradient through its LARS). The
augmentations are not compared (each framework draws its own random numbers; the tests
compare jaxad's and torch_reference's on given parameters).

Each float32 result is measured against the original code run in float64 from the same
weights on the same views. A ReLU whose input lies within float32 rounding of 0 can take
either side in a float32 program (about 45 of the 143 million ReLU inputs of a batch-32
step, 5 or 6 at batch 4), and each flip moves some gradients by up to a few percent of
their largest entry: gradients are not continuous there. So each program's gradients are
compared with the float64 gradient taken with that program's own ReLU pattern (its ReLU
inputs recorded in float32, applied as 0/1 masks in float64), which leaves rounding error
only; the number of flipped ReLUs and the unmatched error are printed too. Tolerances:
`tolerances()`. Prints one table of the largest errors; exit status 1 when one is over its
tolerance.

torchlars cannot be installed here (its setup builds a CUDA extension), so the original's
LARS is `--torchlars_path`'s torchlars/lars.py (kakaobrain/torchlars, unchanged) with the
C++ `compute_adaptive_lr` replaced by its CPU branch in Python; without the path it is the
transcription below (or torchlars itself where it is installed).
"""
import argparse
import json
import math
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


def _torchlars_from_source(path, torch):
    """torchlars' own LARS class, imported from `path` (a checkout of
    https://github.com/kakaobrain/torchlars): its lars.py unchanged, with a stand-in for the
    C++ extension `torchlars._adaptive_lr` (which needs CUDA to build) that computes what its
    CPU branch (adaptive_lr.cc) computes, in the norms' dtype."""
    path = os.path.abspath(path)

    def compute_adaptive_lr(param_norm, grad_norm, weight_decay, eps, trust_coef, out):
        if param_norm > 0 and grad_norm > 0:
            divisor = grad_norm + weight_decay * param_norm + eps
            out.copy_(param_norm / divisor * trust_coef)
        else:
            out.fill_(1.0)
        return out

    ext = types.ModuleType('torchlars._adaptive_lr')
    ext.compute_adaptive_lr = compute_adaptive_lr
    sys.modules['torchlars._adaptive_lr'] = ext
    if path not in sys.path:
        sys.path.insert(0, path)
    warnings.filterwarnings('ignore', message='This overload of add_ is deprecated')
    from torchlars import LARS
    return LARS


def original_parts(csi_path, batch_size, threads, seed=0, torchlars_path=None):
    """The objects of CSI's simclr_CSI training (module docstring), built as its
    common/train.py builds them, and the loop body's pieces: `views(images, labels)` ->
    (images_pair, shift_labels), `losses(images_pair, shift_labels[, net])` -> (loss_sim,
    loss_shift, outputs_aux)."""
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
    if torchlars_path:
        LARS = _torchlars_from_source(torchlars_path, torch)
        lars_source = (f'torchlars lars.py from {os.path.abspath(torchlars_path)}, its C++ '
                       'compute_adaptive_lr replaced by a transcription of its CPU branch')
    else:
        try:
            from torchlars import LARS
            lars_source = 'torchlars'
        except ImportError:
            LARS = _lars_class(torch)
            lars_source = ('harness transcription of torchlars 0.1.2 (torchlars does not build '
                           'here)')

    # common/common.py defaults of the README's training command (simclr_CSI, rotation).
    P = types.SimpleNamespace(dataset='cifar10', model='resnet18', resize_factor=0.08,
                              resize_fix=False, shift_trans_type='rotation', mode='simclr_CSI',
                              batch_size=batch_size, lr_init=0.1, weight_decay=1e-6,
                              epochs=1000, warmup=10, sim_lambda=1.0, multi_gpu=False,
                              image_size=(32, 32, 3), n_classes=10)
    device = torch.device('cpu')
    o = types.SimpleNamespace(P=P, lars_source=lars_source, LARS=LARS)
    o.simclr_aug = C.get_simclr_augmentation(P, image_size=P.image_size).to(device)
    o.shift_trans, o.K_shift = C.get_shift_module(P, eval=True)
    model = C.get_classifier(P.model, n_classes=P.n_classes).to(device)
    o.model = model = C.get_shift_classifer(model, o.K_shift).to(device)
    o.criterion = criterion = nn.CrossEntropyLoss().to(device)
    base = torch.optim.SGD(model.parameters(), lr=P.lr_init, momentum=0.9,
                           weight_decay=P.weight_decay)
    o.optimizer = LARS(base, eps=1e-8, trust_coef=0.001)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(o.optimizer, P.epochs)
    o.scheduler_warmup = GradualWarmupScheduler(o.optimizer, multiplier=10.0,
                                                total_epoch=P.warmup, after_scheduler=scheduler)
    o.linear = model.linear
    o.linear_optim = torch.optim.Adam(o.linear.parameters(), lr=1e-3, betas=(.9, .999),
                                      weight_decay=P.weight_decay)
    o.hflip = TL.HorizontalFlipLayer().to(device)
    o.images = torch.rand(batch_size, 3, 32, 32)
    o.labels = torch.zeros(batch_size, dtype=torch.long)

    def views(images, labels):
        # training/unsup/simclr_CSI.py: the views of one iteration
        images1, images2 = o.hflip(images.repeat(2, 1, 1, 1)).chunk(2)
        images1 = torch.cat([o.shift_trans(images1, k) for k in range(o.K_shift)])
        images2 = torch.cat([o.shift_trans(images2, k) for k in range(o.K_shift)])
        shift_labels = torch.cat([torch.ones_like(labels) * k for k in range(o.K_shift)], 0)
        shift_labels = shift_labels.repeat(2)
        images_pair = torch.cat([images1, images2], dim=0)
        images_pair = o.simclr_aug(images_pair)
        return images_pair, shift_labels

    def losses(images_pair, shift_labels, net=None):
        # training/unsup/simclr_CSI.py: forward and losses (of `model` unless `net` is given)
        _, outputs_aux = (net or model)(images_pair, simclr=True, penultimate=True, shift=True)
        simclr = normalize(outputs_aux['simclr'])
        sim_matrix = get_similarity_matrix(simclr, multi_gpu=P.multi_gpu)
        loss_sim = NT_xent(sim_matrix, temperature=0.5) * P.sim_lambda
        loss_shift = criterion(outputs_aux['shift'], shift_labels)
        return loss_sim, loss_shift, outputs_aux

    o.views, o.losses = views, losses
    return o


def build_original(csi_path, batch_size, threads, seed=0, torchlars_path=None):
    """(step(), info): one iteration of CSI's simclr_CSI train loop (module docstring)."""
    import torch

    o = original_parts(csi_path, batch_size, threads, seed, torchlars_path)
    model, optimizer, criterion, K_shift = o.model, o.optimizer, o.criterion, o.K_shift
    images, labels, linear, linear_optim = o.images, o.labels, o.linear, o.linear_optim
    counter = {'n': 0}
    epoch, loader_len = 1, 100

    def step():
        # training/unsup/simclr_CSI.py, one iteration of `for n, (images, labels) in loader`
        n = counter['n']
        counter['n'] += 1
        model.train()
        images_pair, shift_labels = o.views(images, labels)
        loss_sim, loss_shift, outputs_aux = o.losses(images_pair, shift_labels)
        loss = loss_sim + loss_shift
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        o.scheduler_warmup.step(epoch - 1 + n / loader_len)
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
            'lars': o.lars_source, 'views': 2 * K_shift * batch_size}
    return step, info


# ---------------------------------------------------------------------------------------------
# jaxad's step.

def load_config(spec, overrides=()):
    """The jaxad config of `spec` (path.py[:arg]) with `overrides` ('a.b=value') applied."""
    import importlib.util
    path, _, arg = spec.partition(':')
    module_spec = importlib.util.spec_from_file_location('bench_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for item in overrides:
        key, value = item.split('=', 1)
        target = config
        *parents, leaf = key.split('.')
        for p in parents:
            target = target[p]
        target[leaf] = type(target[leaf])(value)
    return config


def build_jaxad(config_spec, batch_size, overrides=()):
    """(step(), info, compile_s): the trainer's jitted step on real arrays."""
    import jax
    import numpy as np

    from jaxad import loop, programs

    config = load_config(config_spec, overrides)
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


# ---------------------------------------------------------------------------------------------
# --check: one step of the original, of benchmarks/torch_reference.py and of jaxad, compared.

U32 = 2.0 ** -24  # float32 unit roundoff


def reference_name(name):
    """The original model's state_dict name -> torch_reference.CSINet's, or None for the
    original's `linear` (the linear-eval head, trained apart) and `joint_distribution_layer`
    (unused by simclr_CSI), which the CSI loss does not reach."""
    parts = name.split('.')
    if parts[0] in ('linear', 'joint_distribution_layer') or parts[-1] == 'num_batches_tracked':
        return None
    heads = {'simclr_layer.0': 'proj_hidden', 'simclr_layer.2': 'proj_out',
             'shift_cls_layer': 'shift_cls'}
    for old, new in heads.items():
        if name.startswith(old + '.'):
            return new + name[len(old):]
    if parts[0].startswith('layer'):  # layer{s}.{i}.<module>.<leaf>
        module = {'shortcut.0': 'shortcut_conv', 'shortcut.1': 'shortcut_bn'}.get(
            '.'.join(parts[2:4]), parts[2])
        return '.'.join(['blocks', f'{parts[0]}_{parts[1]}', module, parts[-1]])
    return name  # conv1.weight, bn1.*


def flax_location(ref_name, ndim):
    """torch_reference name -> (collection, path, to_flax, from_flax) in jaxad's variables."""
    *modules, leaf = ref_name.split('.')
    if modules[0] == 'blocks':
        modules = modules[1:]
    path = (['encoder'] if modules[0] not in ('proj_hidden', 'proj_out', 'shift_cls') else [])
    path += modules
    same = (lambda a: a, lambda a: a)
    if leaf == 'weight' and ndim == 4:  # conv OIHW <-> HWIO
        return 'params', path + ['kernel'], (lambda a: a.transpose(2, 3, 1, 0),
                                             lambda a: a.transpose(3, 2, 0, 1))
    if leaf == 'weight' and ndim == 2:  # linear (out, in) <-> (in, out)
        return 'params', path + ['kernel'], (lambda a: a.T, lambda a: a.T)
    if leaf == 'weight':
        return 'params', path + ['scale'], same
    if leaf == 'bias':
        return 'params', path + ['bias'], same
    return 'batch_stats', path + [{'running_mean': 'mean', 'running_var': 'var'}[leaf]], same


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def tolerances(batch_size, num_shifts, image_size=32, width=64, depth=18):
    """Relative tolerances (of each tensor's largest magnitude) from float32 arithmetic.

    Every column is a float32 program measured against the float64 evaluation of the
    original code with the same ReLU pattern (`run_check`), so its error is float32 rounding
    alone. A float32 sum of n terms computed in any order is within about sqrt(n) u of the
    sum of the terms' magnitudes (u = 2^-24; the probabilistic bound of Higham and Mary,
    SIAM J. Sci. Comput. 41(5), 2019); n here is the step's longest reduction, BatchNorm's
    per-channel sum over V x H x W values (V = 2 K B views) or stage 4's convolution over
    9 x 8 width terms. Each layer adds such an error and BatchNorm keeps the signal's scale,
    so independent errors of L layers add to sqrt(L) sqrt(n) u: L = depth for the forward
    quantities (losses, BN running statistics), 2 depth for gradients (forward, then
    backward). A factor 10 covers the bound's constant and terms larger than their sum
    (BatchNorm's and the softmax's differences of nearly equal numbers).

    The LARS update on given gradients is elementwise after two norms, sums of N squares
    (N = 9 x (8 width)^2 for the largest tensor): 10 sqrt(N) u. The step's update adds the
    gradients' tolerance to that.
    """
    views = 2 * num_shifts * batch_size
    n = max(views * image_size * image_size, 9 * 8 * width)
    forward = 10 * math.sqrt(depth) * math.sqrt(n) * U32
    backward = 10 * math.sqrt(2 * depth) * math.sqrt(n) * U32
    lars = 10 * math.sqrt(9 * (8 * width) ** 2) * U32
    return {'forward': forward, 'backward': backward, 'lars': lars,
            'update': backward + lars, 'reduction': n}


def _max_rel(got, want):
    """max |got - want| / max |want| (the plain maximum when want is all zero)."""
    import numpy as np
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = np.abs(want).max()
    err = np.abs(got - want).max()
    return float(err / scale) if scale > 0 else float(err)


def _group(ref_name):
    if ref_name.startswith('blocks.'):
        return ref_name.split('.')[1].split('_')[0]
    head = ref_name.split('.')[0]
    return {'conv1': 'stem', 'bn1': 'stem', 'proj_hidden': 'projection head',
            'proj_out': 'projection head', 'shift_cls': 'shift head'}[head]


class ReluTape:
    """Stands in for every ReLU of a forward pass: records its inputs in call order and,
    given 0/1 masks (one per call), applies them instead (x * mask: the forward value and
    the derivative of a ReLU whose pattern is `mask`)."""

    def __init__(self):
        self.record, self.masks = None, None

    def start(self, masks=None):
        self.record, self.masks = [], masks

    def stop(self):
        record, self.record, self.masks = self.record, None, None
        return record

    def __call__(self, x, relu):
        if self.record is None:
            return relu(x)
        i = len(self.record)
        self.record.append(x)
        if self.masks is None:
            return relu(x)
        return x * self.masks[i].to(x.dtype)


class _TapedFunctional:
    """torch.nn.functional with `relu` going through a ReluTape."""

    def __init__(self, functional, tape):
        self._functional, self._tape = functional, tape

    def __getattr__(self, name):
        return getattr(self._functional, name)

    def relu(self, x, inplace=False):
        return self._tape(x, self._functional.relu)


def run_check(a):
    """One step of each program on the same weights and views, against float64 (module doc)."""
    import copy

    import flax.linen
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch

    from jaxad import loop, optim, programs
    from jaxad.methods import csi as csi_lib

    B = a.batch_size
    o = original_parts(a.csi_path, B, a.torch_threads or os.cpu_count(), a.seed,
                       a.torchlars_path)
    K = o.K_shift
    tape = ReluTape()
    import models.resnet  # the original's, from csi_path
    models.resnet.F = _TapedFunctional(models.resnet.F, tape)

    class TapedReLU(torch.nn.Module):
        def forward(self, x):
            return tape(x, torch.relu)

    model = o.model
    model.simclr_layer[1] = TapedReLU()  # the projection head's nn.ReLU
    model.train()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model64 = copy.deepcopy(model).double()
    iso_model = copy.deepcopy(model)  # for the LARS update on given gradients
    compared = [k for k, _ in model.named_parameters() if reference_name(k) is not None]

    def momentum_update(optimizer, params, lr):
        """-lr x the momentum buffer of the wrapped SGD after a step: the update applied."""
        state = optimizer.optim.state  # torchlars' LARS wraps the SGD as .optim
        return [-lr * state[p]['momentum_buffer'] for p in params]

    # ---- the original, float32: one iteration of simclr_CSI.py on its own views
    with torch.no_grad():
        images_pair, shift_labels = o.views(o.images, o.labels)
    tape.start()
    loss_sim, loss_shift, _ = o.losses(images_pair, shift_labels)
    pre = {'original': [x.detach() for x in tape.stop()]}
    loss = loss_sim + loss_shift
    o.optimizer.zero_grad()
    loss.backward()
    lr = o.optimizer.param_groups[0]['lr']
    named = dict(model.named_parameters())
    stray = sorted(k for k, p in named.items() if k not in compared and p.grad is not None
                   and p.grad.abs().max() > 0)
    assert not stray, f'the CSI loss reached parameters outside the compared set: {stray}'
    result = {'original': {
        'loss': {'loss_con': loss_sim.item(), 'loss_cls': loss_shift.item(),
                 'loss': loss.item()},
        'grad': {reference_name(k): named[k].grad.detach().clone() for k in compared}}}
    o.optimizer.step()
    result['original']['update'] = dict(zip(
        map(reference_name, compared),
        momentum_update(o.optimizer, [named[k] for k in compared], lr)))
    result['original']['stats'] = {reference_name(k): v.clone() for k, v in
                                   model.state_dict().items()
                                   if k.endswith(('running_mean', 'running_var'))}
    ref_start = {reference_name(k): v for k, v in start.items() if reference_name(k)}

    # The views in jaxad's (B, 2, K) row layout: the original's row v K B + k B + b is row
    # (b 2 + v) K + k there. NT-Xent, the shift CE and BatchNorm's statistics do not depend
    # on the row order, so both layouts give the same numbers.
    b, v, k = np.meshgrid(np.arange(B), np.arange(2), np.arange(K), indexing='ij')
    perm = torch.from_numpy((v * K * B + k * B + b).reshape(-1))
    unperm = torch.argsort(perm)  # jaxad-layout rows -> the original's order
    views = images_pair.detach()[perm].contiguous()
    assert torch.equal(shift_labels[perm], torch.arange(K).repeat(2 * B))

    # ---- benchmarks/torch_reference.py: its model, loss and LARS; settings from the config
    config = load_config(a.config, a.override)
    config.batch_size = B
    tr = _torch_reference()
    tr.F = _TapedFunctional(tr.F, tape)
    s = tr.settings_from_config(config)
    net = tr.CSINet(s['width'], s['proj_dim'], s['num_shifts'], s['channels'])
    missing = {n for n in net.state_dict() if not n.endswith('num_batches_tracked')} - set(
        ref_start)
    assert not missing, f'no original tensor for {sorted(missing)}'
    net.load_state_dict({n: ref_start.get(n, t) for n, t in net.state_dict().items()})
    iso_net = copy.deepcopy(net)
    net.train()
    tape.start()
    out = net(views)
    pre['torch_reference'] = [x.detach()[unperm] for x in tape.stop()]
    r_loss, r_con, r_cls = tr.csi_loss(out, B, K, s['temperature'], s['shift_weight'], s['eps'])
    net.zero_grad()
    r_loss.backward()
    r_named = dict(net.named_parameters())
    result['torch_reference'] = {
        'loss': {'loss_con': r_con.item(), 'loss_cls': r_cls.item(), 'loss': r_loss.item()},
        'grad': {n: p.grad.detach().clone() for n, p in r_named.items()}}

    def reference_lars(params):
        return tr.LARS(params, lr, s['momentum'], s['weight_decay'], s['trust_coef'],
                       s['lars_eps'], s['lars_exclude_1d'])

    r_opt = reference_lars(list(r_named.values()))
    r_opt.step()
    result['torch_reference']['update'] = {n: -lr * buf for n, buf in
                                           zip(r_named, r_opt.bufs)}
    result['torch_reference']['stats'] = {n: net.state_dict()[n].clone()
                                          for n in result['original']['stats']}

    # ---- jaxad: the trainer's jitted step (programs.train_step) with csi.train_views
    # returning these views, and the gradient of the same method.loss, jitted
    shape = (32, 32, 3)
    method, tx, schedule = programs.method_and_optimizer(config)
    abstract = jax.eval_shape(lambda key: method.init_variables(key, shape), jax.random.key(0))
    variables, locations = {}, {}
    for name, t in ref_start.items():
        coll, path, (to_flax, from_flax) = flax_location(name, t.ndim)
        _set(variables.setdefault(coll, {}), path, jnp.asarray(to_flax(t.numpy())))
        locations[name] = (path, from_flax)
    same = jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(abstract)
    assert same and all(x.shape == y.shape for x, y in zip(
        jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(abstract))), \
        "the original's weights do not fill jaxad's variables one to one"
    views_nhwc = jnp.asarray(views.numpy().transpose(0, 2, 3, 1))
    csi_lib.train_views = lambda key, images, num_shifts, aug_kwargs: views_nhwc
    batch = {'image': jnp.zeros((B,) + shape, jnp.uint8)}  # its size only: the views are fixed
    key = jax.random.key(a.seed)
    params, stats = variables['params'], variables['batch_stats']

    def from_jaxad(tree, name):
        path, from_flax = locations[name]
        return torch.from_numpy(np.array(from_flax(np.asarray(_get(tree, path)))))

    def loss_and_preactivations(p):
        tape.start()
        loss, (metrics, _) = method.loss(p, stats, {}, batch, key)
        return loss, (metrics, [jax.lax.stop_gradient(x) for x in tape.stop()])

    flax_relu = flax.linen.relu
    flax.linen.relu = lambda x: tape(x, flax_relu)
    try:
        (_, (_, j_pre)), j_grads = jax.jit(
            jax.value_and_grad(loss_and_preactivations, has_aux=True))(params)
    finally:
        flax.linen.relu = flax_relu
    pre['jaxad'] = [torch.from_numpy(np.array(x)) for x in j_pre]
    pre['jaxad'] = [(x.permute(0, 3, 1, 2) if x.ndim == 4 else x)[unperm] for x in pre['jaxad']]
    params0 = jax.device_get(params)
    state = loop.TrainState(jnp.zeros((), jnp.int32), params, stats,
                                     tx.init(params), {})
    new_state, metrics = jax.device_get(programs.train_step(config, shape).fn(state, batch, key))
    traces = [t for t in jax.tree_util.tree_leaves(
        new_state.opt_state, is_leaf=lambda t: isinstance(t, optax.TraceState))
        if isinstance(t, optax.TraceState)]
    assert len(traces) == 1, 'expected one momentum trace in jaxad\'s optimiser state'
    j_lr = float(metrics['lr'])
    result['jaxad'] = {
        'loss': {n: float(metrics[n]) for n in ('loss_con', 'loss_cls', 'loss')},
        'grad': {n: from_jaxad(j_grads, n) for n in ref_start if n in r_named},
        'update': {n: -j_lr * from_jaxad(traces[0].trace, n) for n in r_named},
        'stats': {n: from_jaxad(new_state.batch_stats, n)
                  for n in result['original']['stats']}}

    # ---- float64: the original code in float64 from the same weights on the same views
    def original64(masks=None):
        model64.load_state_dict(start)
        model64.zero_grad()
        tape.start(masks)
        l_sim, l_shift, _ = o.losses(images_pair.double(), shift_labels, model64)
        record = [x.detach() for x in tape.stop()]
        (l_sim + l_shift).backward()
        named64 = dict(model64.named_parameters())
        return ({'loss_con': l_sim.item(), 'loss_cls': l_shift.item(),
                 'loss': (l_sim + l_shift).item()},
                {reference_name(k): named64[k].grad.detach().clone() for k in compared},
                record)

    def lars64(grads, steps=1):
        """The original's LARS (SGD at the step's rate) in float64 on `grads`: the updates."""
        model64.load_state_dict(start)
        params = [p for k, p in model64.named_parameters() if k in compared]
        opt = o.LARS(torch.optim.SGD(params, lr=lr, momentum=0.9,
                                     weight_decay=o.P.weight_decay), eps=1e-8, trust_coef=0.001)
        out = []
        for _ in range(steps):
            for k, p in zip(compared, params):
                p.grad = grads[reference_name(k)].double().clone()
            opt.step()
            out.append(dict(zip(map(reference_name, compared),
                                momentum_update(opt, params, lr))))
        return out

    truth_loss, truth_grad_plain, pre64 = original64()
    truth_stats = {reference_name(k): v.clone() for k, v in model64.state_dict().items()
                   if k.endswith(('running_mean', 'running_var'))}
    truth, flips = {}, {}
    for side in ('original', 'torch_reference', 'jaxad'):
        assert len(pre[side]) == len(pre64), (side, len(pre[side]), len(pre64))
        masks = [(x > 0) for x in pre[side]]
        flipped = [m != (x64 > 0) for m, x64 in zip(masks, pre64)]
        near = [x64[f].abs().max().item() for x64, f in zip(pre64, flipped) if f.any()]
        flips[side] = (sum(int(f.sum()) for f in flipped), max(near, default=0.0))
        _, grads, _ = original64(masks)
        truth[side] = {'grad': grads, 'update': lars64(grads)[0]}
    # what matching the ReLU patterns takes out: each float32 gradient against float64's own
    unmatched = {sd: max(_max_rel(result[sd]['grad'][n], truth_grad_plain[n])
                         for n in truth_grad_plain) for sd in ('original', 'torch_reference',
                                                               'jaxad')}

    # ---- the LARS update alone, on the original's float32 gradients: two steps (the second
    # with the momentum buffer) at the step's rate
    g32 = result['original']['grad']
    lars_truth = lars64(g32, steps=2)
    iso = {'original': [], 'torch_reference': [], 'jaxad': []}
    iso_params = [p for k, p in iso_model.named_parameters() if k in compared]
    iso_opt = o.LARS(torch.optim.SGD(iso_params, lr=lr, momentum=0.9,
                                     weight_decay=o.P.weight_decay), eps=1e-8, trust_coef=0.001)
    iso_named = dict(iso_net.named_parameters())
    iso_ref = reference_lars(list(iso_named.values()))
    j_tx = optim.torchlars_sgd(lr, config.optim.momentum, config.optim.weight_decay,
                               config.optim.trust_coef, config.optim.eps)
    j_g = jax.tree_util.tree_map(jnp.asarray, params0)
    for name, g in g32.items():
        path, _ = locations[name]
        _set(j_g, path, jnp.asarray(flax_location(name, g.ndim)[2][0](g.numpy())))
    j_params = jax.tree_util.tree_map(jnp.asarray, params0)
    j_state = j_tx.init(j_params)
    j_update = jax.jit(j_tx.update)
    for _ in range(2):
        for k, p in zip(compared, iso_params):
            p.grad = g32[reference_name(k)].clone()
        iso_opt.step()
        iso['original'].append(dict(zip(map(reference_name, compared),
                                        momentum_update(iso_opt, iso_params, lr))))
        for n, p in iso_named.items():
            p.grad = g32[n].clone()
        iso_ref.step()
        iso['torch_reference'].append({n: -lr * buf for n, buf in zip(iso_named, iso_ref.bufs)})
        updates, j_state = j_update(j_g, j_state, j_params)
        j_params = optax.apply_updates(j_params, updates)
        iso['jaxad'].append({n: from_jaxad(updates, n) for n in g32})

    # ---- the table
    tol = tolerances(B, K)
    sides = ('original', 'torch_reference', 'jaxad')
    rows = []

    def row(what, count, got, want, tolerance):
        """got: side -> {name: tensor}; want: side -> {name: float64 tensor} or one dict."""
        errs = {}
        for side in sides:
            w = want[side] if side in want else want
            errs[side] = max(_max_rel(got[side][n], w[n]) for n in w)
        rows.append((what, count, errs, tolerance))

    for name in ('loss_con', 'loss_cls', 'loss'):
        row(name, 1, {sd: {name: result[sd]['loss'][name]} for sd in sides},
            {name: truth_loss[name]}, tol['forward'])
    groups = {}
    for name in g32:
        groups.setdefault(_group(name), []).append(name)
    for g, names in groups.items():
        row(f'gradient, {g}', len(names),
            {sd: {n: result[sd]['grad'][n] for n in names} for sd in sides},
            {sd: {n: truth[sd]['grad'][n] for n in names} for sd in sides}, tol['backward'])
    row('BN running mean and var after the step', len(truth_stats),
        {sd: result[sd]['stats'] for sd in sides}, truth_stats, tol['forward'])
    for i in range(2):
        row(f'LARS update on the same gradients, step {i + 1}', len(g32),
            {sd: iso[sd][i] for sd in sides}, lars_truth[i], tol['lars'])
    row('the step\'s update (its gradient, then LARS)', len(g32),
        {sd: result[sd]['update'] for sd in sides},
        {sd: truth[sd]['update'] for sd in sides}, tol['update'])

    ok = all(max(errs.values()) <= t for _, _, errs, t in rows) and abs(j_lr - lr) <= U32 * lr
    lines = [
        f'One step of CSI (simclr_CSI, rotation shifts) at batch {B}: {2 * K * B} views of '
        f'32x32, ResNet-18 width 64, seed {a.seed}.',
        f'original: {os.path.abspath(a.csi_path)}; LARS: {o.lars_source}; torch '
        f'{torch.__version__} (CPU, {torch.get_num_threads()} threads)',
        f'jaxad: {os.path.relpath(a.config, _ROOT)} (overrides {list(a.override) or "none"}), '
        f'model.conv_impl={config.model.conv_impl}, jax {jax.__version__} '
        f'({jax.devices()[0].platform})',
        f'learning rate of the step: original {lr:.9g}, jaxad {j_lr:.9g}',
        'Errors: max |x - x64| / max |x64| per tensor, the largest over the row\'s tensors; x64 '
        'is the original code in float64 on the same weights and views, with the ReLU pattern '
        'of the float32 program in that column (ReLUs whose float32 input has the other sign '
        'than in float64: ' + ', '.join(
            f'{sd} {flips[sd][0]}' + (f' (|x64| <= {flips[sd][1]:.1e})' if flips[sd][0] else '')
            for sd in sides) + '). '
        f'Tolerances: u = 2^-24, longest reduction n = {tol["reduction"]} (tolerances()).',
        '',
        '| quantity | tensors | original (float32) | torch_reference | jaxad | tolerance |',
        '|---|---|---|---|---|---|']
    for what, count, errs, t in rows:
        cells = ' | '.join(f'{errs[sd]:.1e}' + ('' if errs[sd] <= t else ' (over)')
                           for sd in sides)
        lines.append(f'| {what} | {count} | {cells} | {t:.1e} |')
    lines.append('')
    lines.append('Against float64 with its own ReLU pattern instead (not matched), the largest '
                 'gradient error is ' + ', '.join(f'{sd} {unmatched[sd]:.1e}' for sd in sides)
                 + ': the flipped ReLUs, not rounding.')
    lines.append('all within tolerance' if ok else 'SOME ERRORS ARE OVER THEIR TOLERANCE')
    print('\n'.join(lines), flush=True)
    return ok


def _torch_reference():
    import importlib.util
    path = os.path.join(_HERE, 'torch_reference.py')
    spec = importlib.util.spec_from_file_location('torch_reference', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    p.add_argument('--check', action='store_true',
                   help='compare one step (losses, gradients, BN statistics, the LARS update) of '
                        'the original, benchmarks/torch_reference.py and jaxad; print the table of '
                        'errors; exit status 1 if one is outside its tolerance')
    p.add_argument('--seed', type=int, default=0, help='--check: the original\'s torch seed')
    p.add_argument('--torchlars_path', default='',
                   help='checkout of github.com/kakaobrain/torchlars: use its lars.py for the '
                        'original (the C++ kernel replaced); default: torchlars if installed, '
                        'else the transcription here')
    a = p.parse_args(argv)
    # their scheduler.step(epoch) call is deprecated in torch 2.x (same closed-form lr)
    warnings.filterwarnings('ignore', message='The epoch parameter', category=UserWarning)
    if a.check:
        return 0 if run_check(a) else 1

    load_before = load_avg()
    threads = a.torch_threads or os.cpu_count()
    orig_step, orig_info = build_original(a.csi_path, a.batch_size, threads,
                                          torchlars_path=a.torchlars_path)
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
    sys.exit(main())
