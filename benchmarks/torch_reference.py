"""A plain PyTorch CSI training step: the baseline that jaxad's throughput is compared with.

python benchmarks/torch_reference.py --batch_size 32 --image_size 32 --steps 20
python benchmarks/torch_reference.py --config configs/csi_cifar.py --batch_size 128

The same computation as jaxad's CSI step (`jaxad/methods/csi.py`, `jaxad/models/resnet.py`,
`jaxad/optim.py`), written the way a PyTorch user would write it; the step itself uses no
jaxad code (its settings may come from a jaxad config, see `--config` below):

* model: ResNet-18 with the CIFAR stem (3x3 conv, no max-pool, BasicBlocks [2, 2, 2, 2] of
  width * {1, 2, 4, 8}, 1x1 conv + BN shortcuts, inputs normalised by (x - 0.5) / 0.5), the
  projection head Linear(f, f) -> ReLU -> Linear(f, proj_dim) and the shift head Linear(f, K);
  module names follow the Flax parameter tree so weights can be copied across;
* views: B uint8 images -> B x 2 views x K rotations in jaxad's (B, 2, K) row layout: each view
  is h-flipped at random, rotated by k * 90 degrees, then gets its own CSI SimCLR augmentation
  (colour jitter p = 0.8 with contrast and HSV in random order, grayscale p = 0.2, random
  resized crop by affine_grid / grid_sample with reflection padding), all batched on the device;
* loss: NT-Xent (tau = 0.5, CSI's eps = 1e-8 inside the log) + shift cross-entropy;
* update: a transcription of torchlars' LARS around momentum SGD (trust ratio 1e-3 * ||p|| /
  (||g|| + wd ||p|| + eps), weight decay 1e-6, momentum 0.9), at a constant learning rate;
* precision: bf16 autocast + channels_last on CUDA, float32 on the CPU (the loss in float32).

`measure()` times the whole step (augmentation, forward, backward, update), compiled by nobody:
eager PyTorch, cudnn.benchmark on. Prints one JSON line. Never part of the test pass/fail.

`--config` (`load_config`) executes a jaxad config file, which imports `jaxad.config` and
with it jax, Flax, ml_collections and jaxad's model and method modules; `settings_from_config`
then reads sizes, loss and optimiser values from the ConfigDict (or its nested dict).
Without `--config` the script imports torch and NumPy only. benchmarks/parity.py (a loaded
jaxad config) and benchmarks/throughput.py (`measure_json`, the config as JSON) take their
settings from jaxad configs as well. benchmarks/vs_original_csi.py --check compares one step
of this file's model, loss and LARS with the original alinlab/CSI code's and with jaxad's.
"""
import argparse
import contextlib
import importlib.util
import json
import math
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
DEFAULT_AUG = dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), brightness=0.4,
                   contrast=0.4, saturation=0.4, hue=0.1, jitter_p=0.8, gray_p=0.2)


# ------------------------------------------------------------------------------------ model


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, eps=1e-5, momentum=0.1)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5, momentum=0.1)
        self.has_shortcut = stride != 1 or in_planes != planes
        if self.has_shortcut:
            self.shortcut_conv = nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(planes, eps=1e-5, momentum=0.1)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.has_shortcut:
            x = self.shortcut_bn(self.shortcut_conv(x))
        return F.relu(x + y)


class CSINet(nn.Module):
    """CIFAR ResNet-18 + CSI heads; forward returns {'features', 'proj', 'shift_logits'}."""

    def __init__(self, width=64, proj_dim=128, num_shifts=4, channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-5, momentum=0.1)
        blocks, in_planes = [], width
        for stage in range(4):
            planes = width * 2 ** stage
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append((f'layer{stage + 1}_{block}', BasicBlock(in_planes, planes, stride)))
                in_planes = planes
        self.blocks = nn.ModuleDict(blocks)
        self.proj_hidden = nn.Linear(in_planes, in_planes)
        self.proj_out = nn.Linear(in_planes, proj_dim)
        self.shift_cls = nn.Linear(in_planes, num_shifts)

    def forward(self, x):
        x = (x - 0.5) / 0.5
        x = F.relu(self.bn1(self.conv1(x)))
        for block in self.blocks.values():
            x = block(x)
        feats = x.float().mean(dim=(2, 3))  # the heads run in the autocast dtype, as in jaxad
        z = self.proj_out(F.relu(self.proj_hidden(feats)))
        return {'features': feats, 'proj': z.float(), 'shift_logits': self.shift_cls(feats).float()}


# ------------------------------------------------------------------------- augmentation
# Batched versions of jaxad/data/augment.py: x is float (N, C, H, W) in [0, 1].


def rgb_to_hsv(x):
    """CSI's atan2-hue RGB -> HSV on (N, 3, H, W); NaN/inf (black pixels) -> 0."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    c_max = x.max(dim=1).values
    c_min = x.min(dim=1).values
    hue = torch.atan2(math.sqrt(3.0) * (g - b), 2.0 * r - g - b)
    hue = torch.remainder(hue, 2.0 * math.pi) / (2.0 * math.pi)
    hsv = torch.stack([hue, (c_max - c_min) / c_max, c_max], dim=1)
    return torch.where(torch.isfinite(hsv), hsv, torch.zeros_like(hsv))


def hsv_to_rgb(hsv):
    """The hexcone HSV -> RGB that CSI uses, on (N, 3, H, W)."""
    h, s, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype, device=hsv.device).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h, 6.0)
    t = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return v - v * s * t


def _col(p):
    return p.view(-1, 1, 1, 1)


def adjust_contrast(x, factor):
    mean = x.mean(dim=(2, 3), keepdim=True)
    return torch.clamp((x - mean) * _col(factor) + mean, 0.0, 1.0)


def adjust_hsv(x, hue_shift, sat_factor, val_factor):
    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, 0] + hue_shift.view(-1, 1, 1) * 255.0 / 360.0, 1.0)
    hsv = torch.stack([hue, hsv[:, 1] * sat_factor.view(-1, 1, 1),
                       hsv[:, 2] * val_factor.view(-1, 1, 1)], dim=1)
    return hsv_to_rgb(torch.clamp(hsv, 0.0, 1.0))


def adjust_color(x, contrast, hue_shift, sat, val, contrast_first):
    """Per-sample contrast and HSV adjustment in per-sample order (both orders computed)."""
    a = adjust_hsv(adjust_contrast(x, contrast), hue_shift, sat, val)
    b = adjust_contrast(adjust_hsv(x, hue_shift, sat, val), contrast)
    return torch.where(_col(contrast_first), a, b)


def _uniform(n, lo, hi, gen, device):
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def color_jitter(x, gen, brightness, contrast, saturation, hue, p):
    n, dev = x.shape[0], x.device
    jittered = adjust_color(
        x, _uniform(n, max(1 - contrast, 0), 1 + contrast, gen, dev),
        _uniform(n, -hue, hue, gen, dev),
        _uniform(n, max(1 - saturation, 0), 1 + saturation, gen, dev),
        _uniform(n, max(1 - brightness, 0), 1 + brightness, gen, dev),
        torch.rand(n, generator=gen, device=dev) < 0.5)
    return torch.where(_col(torch.rand(n, generator=gen, device=dev) < p), jittered, x)


def random_grayscale(x, gen, p):
    luma = sum(w * x[:, i] for i, w in enumerate(GRAY_WEIGHTS)).unsqueeze(1).expand_as(x)
    return torch.where(_col(torch.rand(x.shape[0], generator=gen, device=x.device) < p), luma, x)


def sample_crop_params(n, height, width, gen, device, scale, ratio, num_tries=10):
    """(n, 4) crops (w_frac, h_frac, bx, by) as jaxad's sample_crop_params, per sample."""
    area = _uniform((n, num_tries), scale[0], scale[1], gen, device) * (height * width)
    aspect = torch.exp(_uniform((n, num_tries), math.log(ratio[0]), math.log(ratio[1]),
                                gen, device))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)
    ok = fits.gather(1, first)[:, 0]
    w = torch.where(ok, w.gather(1, first)[:, 0], torch.full_like(w[:, 0], width))
    h = torch.where(ok, h.gather(1, first)[:, 0], torch.full_like(h[:, 0], height))
    # randint(w - W, W - w + 1) with per-sample bounds.
    bx = torch.floor(torch.rand(n, generator=gen, device=device) * (2 * (width - w) + 1)) + w - width
    by = torch.floor(torch.rand(n, generator=gen, device=device) * (2 * (height - h) + 1)) + h - height
    return torch.stack([w / width, h / height, bx / width, by / height], dim=1)


def apply_crop(x, params):
    """Bilinear reflection-padded resample of each image on its crop (N, 4)."""
    theta = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = params[:, 0], params[:, 1]
    theta[:, 0, 2], theta[:, 1, 2] = params[:, 2], params[:, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='reflection', align_corners=False)


def simclr_augment(x, gen, crop_scale, crop_ratio, brightness, contrast, saturation, hue,
                   jitter_p, gray_p):
    """CSI's CIFAR SimCLR augmentation on a batch: colour jitter -> grayscale -> resized crop."""
    x = color_jitter(x, gen, brightness, contrast, saturation, hue, jitter_p)
    x = random_grayscale(x, gen, gray_p)
    params = sample_crop_params(x.shape[0], x.shape[2], x.shape[3], gen, x.device,
                                crop_scale, crop_ratio)
    return apply_crop(x, params)


def train_views(images, num_shifts, gen, aug):
    """uint8 (B, H, W, C) on the device -> float (B * 2 * K, C, H, W) in the (B, 2, K) layout."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    b = x.shape[0]
    x = x.unsqueeze(1).expand(b, 2, *x.shape[1:])  # (B, 2, C, H, W): two views
    flip = torch.rand(b, 2, generator=gen, device=x.device) < 0.5
    x = torch.where(flip.view(b, 2, 1, 1, 1), x.flip(-1), x)
    x = torch.stack([torch.rot90(x, k, dims=(-2, -1)) for k in range(num_shifts)], dim=2)
    x = x.reshape(-1, *x.shape[3:])  # rows (b * 2 + v) * K + k
    return simclr_augment(x, gen, **aug)


def positive_index(batch_size, num_shifts):
    """Row of each row's positive: (b, v, k) -> (b, 1 - v, k)."""
    b, v, k = torch.meshgrid(torch.arange(batch_size), torch.arange(2), torch.arange(num_shifts),
                             indexing='ij')
    return ((b * 2 + (1 - v)) * num_shifts + k).reshape(-1)


def shift_labels(batch_size, num_shifts):
    return torch.arange(num_shifts).repeat(batch_size * 2)


# --------------------------------------------------------------------------------- loss


def nt_xent(z, pos_index, temperature=0.5, eps=1e-8):
    """CSI's NT_xent: mean_i -log(E_ip / (sum_{k != i} E_ik + eps) + eps), E = exp(cos / tau).

    Written with exp(cos/tau - 1/tau) and eps scaled by the same factor (same value, no
    overflow at small tau), as jaxad.losses.nt_xent.
    """
    u = F.normalize(z.float(), dim=1)
    logits = u @ u.t() / temperature
    shift = 1.0 / temperature
    not_self = 1.0 - torch.eye(u.shape[0], device=u.device, dtype=u.dtype)
    e = torch.exp(logits - shift) * not_self
    denom = e.sum(dim=1) + eps * math.exp(-shift)
    pos = torch.exp(logits.gather(1, pos_index.view(-1, 1))[:, 0] - shift)
    return torch.mean(-torch.log(pos / denom + eps))


def csi_loss(outputs, batch_size, num_shifts, temperature=0.5, shift_weight=1.0, eps=1e-8):
    """(loss, loss_con, loss_cls) on outputs of the (B, 2, K) views."""
    dev = outputs['proj'].device
    loss_con = nt_xent(outputs['proj'], positive_index(batch_size, num_shifts).to(dev),
                       temperature, eps)
    loss_cls = F.cross_entropy(outputs['shift_logits'].float(),
                               shift_labels(batch_size, num_shifts).to(dev))
    return loss_con + shift_weight * loss_cls, loss_con, loss_cls


# ---------------------------------------------------------------------------- optimiser


class LARS:
    """torchlars' LARS around SGD(momentum, weight_decay), transcribed, applied to every tensor.

    g' = (g + wd p) * a, a = trust * ||p|| / (||g|| + wd ||p|| + eps) where both norms are
    positive, else 1; buf = m buf + g' (buf = g' at first); p -= lr buf. One fused
    `torch._foreach_*` call per stage, as a careful PyTorch user would write it.
    exclude_1d: no decay and no adaptation for 1-D tensors (BN and biases), as jaxad's
    optim.exclude_bn_bias (CSI: False).
    """

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=1e-6, trust_coef=1e-3,
                 eps=1e-8, exclude_1d=False):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.momentum, self.wd = lr, momentum, weight_decay
        self.trust, self.eps = trust_coef, eps
        self.bufs = None
        adapt = [not (exclude_1d and p.ndim <= 1) for p in self.params]
        self.decay = [weight_decay if a else 0.0 for a in adapt]
        self.adapt = torch.tensor(adapt, device=self.params[0].device)

    @torch.no_grad()
    def step(self):
        params = self.params
        grads = [p.grad for p in params]
        p_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        ratio = self.trust * p_norm / (g_norm + self.wd * p_norm + self.eps)
        a = torch.where((p_norm > 0) & (g_norm > 0) & self.adapt, ratio, torch.ones_like(ratio))
        updates = torch._foreach_add(grads, torch._foreach_mul(params, self.decay))
        torch._foreach_mul_(updates, list(a.unbind(0)))
        if self.bufs is None:
            self.bufs = updates
        else:
            torch._foreach_mul_(self.bufs, self.momentum)
            torch._foreach_add_(self.bufs, updates)
        torch._foreach_add_(params, self.bufs, alpha=-self.lr)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


# -------------------------------------------------------------------------------- step


def make_step(model, opt, batch_size, num_shifts, aug, gen, temperature, shift_weight, eps,
              amp_dtype, channels_last):
    """images (uint8 on the device) -> (loss tensor, views shape): one full training step."""
    device_type = next(model.parameters()).device.type

    def step(images):
        with torch.no_grad():
            views = train_views(images, num_shifts, gen, aug)
        if channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            out = model(views)
        loss, _, _ = csi_loss(out, batch_size, num_shifts, temperature, shift_weight, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss, tuple(views.shape), tuple(out['proj'].shape), tuple(out['shift_logits'].shape)
    return step


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure(batch_size, image_size, width, num_shifts, steps=20, warmup=2, device=None, *,
            channels=3, proj_dim=128, temperature=0.5, shift_weight=1.0, eps=1e-8, aug=None,
            lr=0.1, momentum=0.9, weight_decay=1e-6, trust_coef=1e-3, lars_eps=1e-8,
            lars_exclude_1d=False, amp=None, channels_last=None, seed=0):
    """Median wall time of `steps` CSI training steps after `warmup` untimed ones.

    device None: CUDA when available, else the CPU. amp / channels_last None: on for CUDA,
    off elsewhere. Returns a JSON-ready dict.
    """
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    cuda = device.type == 'cuda'
    amp = cuda if amp is None else amp
    channels_last = cuda if channels_last is None else channels_last
    if cuda:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)
    aug = dict(DEFAULT_AUG, **(aug or {}))
    model = CSINet(width, proj_dim, num_shifts, channels).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = LARS(model.parameters(), lr, momentum, weight_decay, trust_coef, lars_eps,
               lars_exclude_1d)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    step = make_step(model, opt, batch_size, num_shifts, aug, gen, temperature, shift_weight,
                     eps, torch.bfloat16 if amp else None, channels_last)
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (batch_size, image_size, image_size, channels),
                                           dtype=np.uint8)).to(device)

    views = batch_size * 2 * num_shifts
    for _ in range(max(warmup, 1)):  # at least one: cudnn autotuning, allocator warm-up
        loss, view_shape, proj_shape, logit_shape = step(images)
    _sync(device)
    # The layout jaxad's step uses: B x 2 views x K rotations, NCHW here (NHWC in jaxad).
    assert view_shape == (views, channels, image_size, image_size), view_shape
    assert proj_shape == (views, proj_dim) and logit_shape == (views, num_shifts)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss, *_ = step(images)
        _sync(device)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {'impl': 'torch_reference', 'global_batch': batch_size, 'views_per_step': views,
            'view_shape_nchw': list(view_shape), 'image_size': image_size, 'width': width,
            'num_shifts': num_shifts, 'proj_dim': proj_dim,
            'num_params': sum(p.numel() for p in model.parameters()),
            'amp': 'bfloat16' if amp else None, 'channels_last': channels_last,
            'median_step_s': round(step_s, 4), 'images_per_s': round(batch_size / step_s, 2),
            'views_per_s': round(views / step_s, 1), 'steps_timed': steps,
            'final_loss': float(loss.detach()),
            'peak_memory_bytes': int(torch.cuda.max_memory_allocated(device)) if cuda else None,
            'device': torch.cuda.get_device_name(device) if cuda else 'cpu',
            'torch_threads': torch.get_num_threads(), 'torch': torch.__version__,
            'host': platform.processor() or platform.machine()}


def settings_from_config(config):
    """measure() keyword arguments from a jaxad config (ConfigDict or its nested dict).

    The learning rate is the config's base lr, held constant (the step's cost does not
    depend on it).
    """
    c = config if isinstance(config, dict) else config.to_dict()
    data, model, loss, a, o = c['data'], c['model'], c['csi'], c['augment'], c['optim']
    if model['name'] != 'resnet18' or model['stem'] != 'cifar':
        raise ValueError(f"torch_reference implements the CIFAR ResNet-18 only, not "
                         f"{model['name']} with the {model['stem']!r} stem")
    if o['name'] != 'lars':
        raise ValueError(f"torch_reference implements the LARS optimiser only, not {o['name']!r}")
    return dict(image_size=data['image_size'], width=model['width'],
                num_shifts=loss['num_shifts'], channels=data['channels'],
                proj_dim=model['proj_dim'], temperature=loss['temperature'],
                shift_weight=loss['shift_weight'], eps=loss['eps'],
                aug=dict(crop_scale=tuple(a['crop_scale']), crop_ratio=tuple(a['crop_ratio']),
                         brightness=a['brightness'], contrast=a['contrast'],
                         saturation=a['saturation'], hue=a['hue'], jitter_p=a['jitter_p'],
                         gray_p=a['gray_p']),
                lr=o['lr'], momentum=o['momentum'], weight_decay=o['weight_decay'],
                trust_coef=o['trust_coef'], lars_eps=o['eps'],
                lars_exclude_1d=bool(o.get('exclude_bn_bias', False)))


def measure_json(spec):
    """measure() from a JSON string {'batch_size', 'steps', 'warmup', 'device', 'config'}.

    `config` is a jaxad config as a nested dict (ConfigDict.to_json()); used by
    benchmarks/throughput.py, which runs this in a child process.
    """
    spec = json.loads(spec)
    return measure(spec['batch_size'], steps=spec['steps'], warmup=spec['warmup'],
                   device=spec.get('device'), **settings_from_config(spec['config']))


def load_config(spec):
    """`path.py[:args]` -> the config file's get_config(args). Executing a jaxad config file
    imports jaxad.config (jax, Flax, ml_collections and jaxad's model and method modules)."""
    path, _, arg = spec.partition(':')
    module_spec = importlib.util.spec_from_file_location('_torch_reference_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default='', help='jaxad config file[:args] to read sizes, '
                        'loss and optimiser values from (flags below override)')
    parser.add_argument('--batch_size', type=int, default=None, help='global images per step')
    parser.add_argument('--image_size', type=int, default=None)
    parser.add_argument('--width', type=int, default=None)
    parser.add_argument('--num_shifts', type=int, default=None)
    parser.add_argument('--proj_dim', type=int, default=None)
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--device', default=None, help='cuda | cpu (default: cuda if available)')
    parser.add_argument('--amp', choices=('auto', 'true', 'false'), default='auto')
    parser.add_argument('--channels_last', choices=('auto', 'true', 'false'), default='auto')
    args = parser.parse_args(argv)
    kwargs = dict(image_size=32, width=64, num_shifts=4)
    batch_size = 32
    if args.config:
        config = load_config(args.config)
        kwargs.update(settings_from_config(config))
        batch_size = config.batch_size
    for name in ('image_size', 'width', 'num_shifts', 'proj_dim'):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.batch_size is not None:
        batch_size = args.batch_size
    tri = {'auto': None, 'true': True, 'false': False}
    result = measure(batch_size, steps=args.steps, warmup=args.warmup, device=args.device,
                     amp=tri[args.amp], channels_last=tri[args.channels_last], **kwargs)
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
    sys.exit(main())
