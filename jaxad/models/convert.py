"""torchvision ResNet weights -> jaxad encoder variables.

    python -m jaxad.models.convert --in resnet152.pth --out DIR [--depth 152]

reads a torchvision-format `state_dict` (`.pth`/`.pt` with torch installed;
`.npz` of arrays named as torch names them; `.safetensors` with the
`safetensors` package) and writes DIR/encoder.npz + DIR/meta.json. Set
`config.model.init_from=DIR` (with model.stem='imagenet', usually
model.input_norm='imagenet') and the method's init starts the `encoder` from it;
the heads stay randomly initialised.

Name mapping (torchvision -> flax, `resnet.py`):

    conv1.weight                      params/conv1/kernel        OIHW -> HWIO
    bn1.{weight,bias}                 params/bn1/{scale,bias}
    bn1.{running_mean,running_var}    batch_stats/bn1/{mean,var}
    layer{s}.{b}.conv{i}.*            .../layer{s}_{b}/conv{i}/*
    layer{s}.{b}.downsample.0.*       .../layer{s}_{b}/shortcut_conv/*
    layer{s}.{b}.downsample.1.*       .../layer{s}_{b}/shortcut_bn/*
    *.num_batches_tracked             ignored
    fc.{weight,bias}                  fc/{kernel,bias} (kernel = weight.T), kept apart

A leading 'module.' (DataParallel) is stripped. Conversion is strict: missing or
unexpected keys and shape mismatches are listed in one ConversionError.

Output: DIR/encoder.npz holds float32 arrays under flattened flax names
('params/layer1_0/conv1/kernel', 'batch_stats/bn1/mean', 'fc/kernel'); DIR/meta.json
records format, arch, depth, width_per_group, width and the source file.
"""
import argparse
import functools
import json
import os
import sys

import numpy as np

from jaxad.errors import ConfigError, JaxadError
from jaxad.models.resnet import BOTTLENECK_STAGE_SIZES, STAGE_SIZES, arch_name

FORMAT = 'jaxad-encoder-v1'
WEIGHTS_FILE = 'encoder.npz'
META_FILE = 'meta.json'
_SHOW = 12  # keys listed per category in an error


class ConversionError(ConfigError):
    """A weight file that does not fit the requested architecture, or cannot be read."""


# ------------------------------------------------------------------ name mapping

def torch_name(collection, path):
    """Flax variable ('params', ('layer1_0', 'shortcut_conv', 'kernel')) -> torch key."""
    *modules, leaf = path
    parts = []
    for m in modules:
        if m.startswith('layer') and '_' in m:
            parts.extend(m.split('_', 1))
        elif m == 'shortcut_conv':
            parts.append('downsample.0')
        elif m == 'shortcut_bn':
            parts.append('downsample.1')
        else:
            parts.append(m)
    leaf = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
            ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
            ('batch_stats', 'var'): 'running_var'}[(collection, leaf)]
    return '.'.join(parts + [leaf])


def _to_flax(name, array):
    """A torch array -> its flax layout (conv OIHW -> HWIO)."""
    array = np.asarray(array, np.float32)
    if name.endswith('.weight') and array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    return array


def _torch_shape(flax_shape):
    return tuple(flax_shape[i] for i in (3, 2, 0, 1)) if len(flax_shape) == 4 else tuple(flax_shape)


@functools.lru_cache(maxsize=16)
def encoder_shapes(depth, width_per_group=64, width=64):
    """{'params', 'batch_stats'} shapes of the ImageNet-stem encoder (no compute)."""
    import jax
    import jax.numpy as jnp

    from jaxad.models.resnet import ResNet
    model = ResNet(depth=depth, stem='imagenet', width=width, width_per_group=width_per_group)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                               train=False))
    return {k: shapes[k] for k in ('params', 'batch_stats')}


def expected_keys(depth, width_per_group=64, width=64):
    """{torch key: (collection, flax path, torch shape)} of the encoder."""
    from flax import traverse_util
    out = {}
    for collection, tree in encoder_shapes(depth, width_per_group, width).items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            out[torch_name(collection, path)] = (collection, path, _torch_shape(leaf.shape))
    return out


def infer_arch(state_dict):
    """(depth, width_per_group, width) that a torchvision ResNet state_dict looks like."""
    sd = _strip(state_dict)
    try:
        width = int(np.shape(sd['conv1.weight'])[0])
        blocks = []
        for s in range(1, 5):
            idx = {int(k.split('.')[1]) for k in sd if k.startswith(f'layer{s}.')}
            blocks.append(max(idx) + 1 if idx else 0)
        bottleneck = 'layer1.0.conv3.weight' in sd
        table = BOTTLENECK_STAGE_SIZES if bottleneck else STAGE_SIZES
        depth = next(d for d, sizes in table.items() if tuple(sizes) == tuple(blocks))
        wpg = int(np.shape(sd['layer1.0.conv1.weight'])[0]) * 64 // width if bottleneck else 64
    except (KeyError, StopIteration, ValueError, IndexError) as e:
        raise ConversionError('the weights do not look like a torchvision ResNet '
                              f'(conv1.weight and layer1..layer4 blocks expected; {e!r})') from e
    return depth, wpg, width


def _strip(state_dict):
    keys = list(state_dict)
    if keys and all(k.startswith('module.') for k in keys):
        return {k[len('module.'):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _listing(title, items):
    items = sorted(items)
    more = f' ... and {len(items) - _SHOW} more' if len(items) > _SHOW else ''
    return f'{len(items)} {title}: {", ".join(items[:_SHOW])}{more}'


def torchvision_to_flax(state_dict, depth, width_per_group=64, width=64):
    """torch-named arrays -> {'params', 'batch_stats'} (+ 'fc' when the dict has one).

    `state_dict` maps torchvision names to arrays (numpy or anything np.asarray
    takes). Strict: every encoder variable must be present with the right shape and
    nothing else may be (besides fc.* and num_batches_tracked).
    """
    from flax import traverse_util
    depth, width_per_group, width = int(depth), int(width_per_group), int(width)
    if depth not in STAGE_SIZES and depth not in BOTTLENECK_STAGE_SIZES:
        raise ConversionError(f'ResNet depth {depth} is not supported; choose from '
                              f'{sorted(STAGE_SIZES) + sorted(BOTTLENECK_STAGE_SIZES)}')
    sd = {k: v for k, v in _strip(state_dict).items() if not k.endswith('num_batches_tracked')}
    fc = {k: sd.pop(k) for k in [k for k in sd if k.startswith('fc.')]}
    want = expected_keys(depth, width_per_group, width)
    missing = set(want) - set(sd)
    unexpected = set(sd) - set(want)
    bad_shapes = [f'{k} {tuple(np.shape(sd[k]))} (want {want[k][2]})'
                  for k in sorted(set(want) & set(sd)) if tuple(np.shape(sd[k])) != want[k][2]]
    if missing or unexpected or bad_shapes:
        problems = [_listing(t, x) for t, x in (('missing keys', missing),
                                                 ('unexpected keys', unexpected),
                                                 ('shape mismatches', bad_shapes)) if x]
        hint = ''
        try:
            looks = infer_arch(sd)
            if looks != (depth, width_per_group, width):
                hint = (f' The weights look like {arch_name(*looks[:2])} (depth {looks[0]}, '
                        f'width_per_group {looks[1]}, width {looks[2]}).')
        except ConversionError:
            pass
        raise ConversionError(
            f'the state_dict does not fit {arch_name(depth, width_per_group)} (depth {depth}, '
            f'width_per_group {width_per_group}, width {width}): ' + '; '.join(problems) + '.'
            + hint)
    flat = {(want[k][0],) + want[k][1]: _to_flax(k, v) for k, v in sd.items()}
    out = traverse_util.unflatten_dict(flat)
    out = {'params': out['params'], 'batch_stats': out['batch_stats']}
    if fc:
        if set(fc) != {'fc.weight', 'fc.bias'}:
            raise ConversionError(f'unexpected fc keys {sorted(fc)} (want fc.weight, fc.bias)')
        out['fc'] = {'kernel': np.asarray(fc['fc.weight'], np.float32).T,
                     'bias': np.asarray(fc['fc.bias'], np.float32)}
    return out


# ------------------------------------------------------------------ reading weights

def _unwrap(obj, path):
    for key in ('state_dict', 'model'):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ConversionError(f'{path}: expected a state_dict (a dict of tensors, or '
                              f"{{'state_dict': ...}} / {{'model': ...}}), got {type(obj).__name__}")
    return obj


def load_state_dict(path):
    """A weight file -> {torch name: float32 numpy array}."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f'{path}: no such file')
    ext = os.path.splitext(path)[1].lower()
    if ext in ('.pth', '.pt', '.bin'):
        try:
            import torch
        except ImportError as e:
            raise ConversionError(f'{path}: reading .pth/.pt needs torch (pip install torch), '
                                  'or save the state_dict as .npz / .safetensors') from e
        try:
            obj = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:  # noqa: BLE001 (torch raises many kinds)
            raise ConversionError(f'{path}: torch.load failed ({type(e).__name__}: {e}). Only '
                                  'tensors and plain containers are read (weights_only=True); '
                                  'save model.state_dict() itself.') from e
        sd = _unwrap(obj, path)
        out = {}
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise ConversionError(f'{path}: entry {k!r} is a {type(v).__name__}, not a tensor')
            v = v.detach().cpu()
            out[k] = (v.float() if v.is_floating_point() else v).numpy()
        return out
    if ext == '.npz':
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:
            raise ConversionError(f'{path}: cannot read as .npz ({e})') from e
    if ext == '.safetensors':
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise ConversionError(f'{path}: reading .safetensors needs the safetensors package '
                                  '(pip install safetensors), or use .npz / .pth') from e
        try:
            return dict(load_file(path))
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f'{path}: cannot read as .safetensors ({e})') from e
    raise ConversionError(f'{path}: unknown weight format {ext!r}; use .pth/.pt (torch), '
                          '.npz or .safetensors')


# ------------------------------------------------------------------ converted directories

def save_converted(variables, out_dir, meta):
    """Writes DIR/encoder.npz (flattened flax names) and DIR/meta.json."""
    from flax import traverse_util
    os.makedirs(out_dir, exist_ok=True)
    flat = traverse_util.flatten_dict(variables, sep='/')
    np.savez(os.path.join(out_dir, WEIGHTS_FILE),
             **{k: np.asarray(v, np.float32) for k, v in flat.items()})
    with open(os.path.join(out_dir, META_FILE), 'w') as f:
        json.dump(dict(meta, format=FORMAT), f, indent=2, sort_keys=True)


def is_run_dir(directory):
    """True for a jaxad training run's workdir (config.json and checkpoints/)."""
    return (os.path.isfile(os.path.join(directory, 'config.json'))
            and os.path.isdir(os.path.join(directory, 'checkpoints')))


def load_run_encoder(workdir, scope='encoder'):
    """(variables, meta) of the `scope` subtree of a jaxad run's latest checkpoint.

    Lets one method start from another's trained encoder (MSC from a CSI run).
    """
    import orbax.checkpoint as ocp
    ckpt_dir = os.path.join(workdir, 'checkpoints')
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    if not steps:
        raise ConversionError(f'model.init_from={workdir}: the run has no finished checkpoint '
                              f'in {ckpt_dir}')
    path = os.path.join(ckpt_dir, str(steps[-1]), 'state')
    import jax
    try:
        # Concrete arrays even when called while the init function is being traced.
        with jax.ensure_compile_time_eval():
            state = ocp.PyTreeCheckpointer().restore(path)
    except Exception as e:  # noqa: BLE001 - any orbax failure is a bad run directory here
        raise ConversionError(f'model.init_from={workdir}: cannot read {path}: {e}') from e
    variables = {}
    for collection in ('params', 'batch_stats'):
        tree = state.get(collection, {})
        if scope not in tree:
            raise ConversionError(f'model.init_from={workdir}: its {collection} have no '
                                  f'{scope!r} subtree')
        variables[collection] = jax_to_numpy(tree[scope])
    meta = {'arch': f'jaxad run {workdir} step {steps[-1]}', 'source': path}
    return variables, meta


def jax_to_numpy(tree):
    if isinstance(tree, dict):
        return {k: jax_to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def load_converted(directory):
    """(variables {'params', 'batch_stats'[, 'fc']} of numpy arrays, meta) of a DIR
    written by this module, or of a jaxad run's workdir (its latest encoder)."""
    from flax import traverse_util
    directory = os.fspath(directory)
    if is_run_dir(directory):
        return load_run_encoder(directory)
    weights, meta_path = (os.path.join(directory, n) for n in (WEIGHTS_FILE, META_FILE))
    if not (os.path.isfile(weights) and os.path.isfile(meta_path)):
        raise ConversionError(f'{directory}: not a converted encoder directory (expected '
                              f'{WEIGHTS_FILE} and {META_FILE}; write one with '
                              '`python -m jaxad.models.convert --in W.pth --out DIR`)')
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get('format') != FORMAT:
        raise ConversionError(f'{meta_path}: format {meta.get("format")!r}, expected {FORMAT!r}')
    with np.load(weights, allow_pickle=False) as f:
        flat = {k: f[k] for k in f.files}
    return traverse_util.unflatten_dict(flat, sep='/'), meta


@functools.lru_cache(maxsize=2)
def _load_cached(directory, mtime):
    del mtime  # part of the cache key only
    return load_converted(directory)


def init_variables(model, key, input_shape, init_from='', skip=()):
    """{'params', 'batch_stats'} of `model` for inputs (H, W, C), the encoder taken from
    `init_from` (a converted DIR or a jaxad run; '' = random): every method's init."""
    import jax.numpy as jnp
    variables = model.init(key, jnp.zeros((2,) + tuple(input_shape), jnp.float32), train=False)
    variables = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
    return init_encoder_from(variables, init_from, skip=skip)


def init_encoder_from(variables, directory, scope='encoder', skip=()):
    """`variables` with params/batch_stats[scope] replaced by a converted DIR ('' = as is).

    Structure and shapes must match exactly (the model must be the converted
    architecture with stem='imagenet'); other subtrees (heads) are left alone. `skip`:
    name prefixes of file entries the model does not build (ReContrast: 'layer4_').
    Safe inside a jitted or vmapped init: the weights enter through one
    `jax.pure_callback` instead of being embedded as (up to 230 MB of) constants in
    the compiled program. The file is read once per process (cached by path, mtime).
    """
    if not directory:
        return variables
    import jax
    from flax import traverse_util
    directory = os.path.abspath(os.fspath(directory))
    weights = os.path.join(directory, WEIGHTS_FILE)
    if is_run_dir(directory):
        weights = os.path.join(directory, 'checkpoints')  # a new checkpoint changes its mtime
    mtime = os.path.getmtime(weights) if os.path.exists(weights) else None
    loaded, meta = _load_cached(directory, mtime)
    targets, sources = {}, {}
    for collection in ('params', 'batch_stats'):
        if scope not in variables.get(collection, {}) or collection not in loaded:
            raise ConversionError(f'model.init_from: the model has no {collection}/{scope} '
                                  'subtree to load the encoder into')
        have = traverse_util.flatten_dict(variables[collection][scope], sep='/')
        new = {k: v for k, v in traverse_util.flatten_dict(loaded[collection], sep='/').items()
               if not k.startswith(tuple(skip))}
        problems = [_listing(t, x) for t, x in (
            ('missing in the file', set(have) - set(new)),
            ('not in the model', set(new) - set(have)),
            ('shape mismatches', [f'{k} file {new[k].shape} model {tuple(have[k].shape)}'
                                  for k in sorted(set(have) & set(new))
                                  if tuple(new[k].shape) != tuple(have[k].shape)])) if x]
        if problems:
            hint = ''
            if 'conv1/kernel' in have and tuple(have['conv1/kernel'].shape[:2]) != (7, 7):
                hint = " The weights need model.stem='imagenet'."
            raise ConversionError(
                f'model.init_from={directory} ({meta.get("arch")}) does not fit the model\'s '
                f'{collection}/{scope}: ' + '; '.join(problems) + '.' + hint)
        for k, leaf in have.items():
            targets[(collection, k)] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
            sources[(collection, k)] = new[k]
    keys = sorted(targets)
    values = jax.pure_callback(
        lambda: [np.asarray(sources[k], targets[k].dtype) for k in keys],
        [targets[k] for k in keys], vmap_method='broadcast_all')
    out = dict(variables)
    for collection in ('params', 'batch_stats'):
        flat = {k: v for (c, k), v in zip(keys, values) if c == collection}
        out[collection] = dict(variables[collection])
        out[collection][scope] = traverse_util.unflatten_dict(flat, sep='/')
    return out


# ------------------------------------------------------------------ CLI

def convert_file(in_path, out_dir, depth=None, width_per_group=None):
    """Reads `in_path`, converts, writes `out_dir`; returns the meta dict."""
    sd = _strip(load_state_dict(in_path))
    if depth is None or width_per_group is None:
        looks = infer_arch(sd)
        depth = looks[0] if depth is None else depth
        width_per_group = looks[1] if width_per_group is None else width_per_group
    width = int(np.shape(sd['conv1.weight'])[0]) if 'conv1.weight' in sd else 64
    variables = torchvision_to_flax(sd, depth, width_per_group, width)
    from jaxad.models.resnet import count_params
    meta = dict(arch=arch_name(depth, width_per_group), depth=int(depth),
                width_per_group=int(width_per_group), width=width,
                encoder_params=count_params(variables['params']), has_fc='fc' in variables,
                source=os.path.abspath(os.fspath(in_path)))
    save_converted(variables, out_dir, meta)
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m jaxad.models.convert',
        description='Convert torchvision ResNet weights into a jaxad encoder directory '
                    '(for config.model.init_from).')
    parser.add_argument('--in', dest='in_path', required=True,
                        help='torchvision state_dict: .pth/.pt (needs torch), .npz or .safetensors')
    parser.add_argument('--out', required=True, help='output directory (encoder.npz + meta.json)')
    parser.add_argument('--depth', type=int, default=None,
                        help=f'ResNet depth, one of {sorted(STAGE_SIZES) + sorted(BOTTLENECK_STAGE_SIZES)} '
                             '(default: inferred from the weights)')
    parser.add_argument('--width_per_group', type=int, default=None,
                        help='64, or 128 for wide_resnet50_2 (default: inferred)')
    args = parser.parse_args(argv)
    try:
        meta = convert_file(args.in_path, args.out, args.depth, args.width_per_group)
    except JaxadError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'wrote {os.path.join(args.out, WEIGHTS_FILE)}: {meta["arch"]}, '
          f'{meta["encoder_params"]:,} encoder params' + (', fc kept' if meta['has_fc'] else '')
          + f'. Use: --config.model.name={meta["arch"]} --config.model.stem=imagenet '
          f'--config.model.input_norm=imagenet --config.model.init_from={args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

