"""Config building blocks shared by `configs/*.py`.

Every number that changes results lives in the ConfigDict; `train.py` writes
it to `workdir/config.json`. Config files call `parse_arg` for their
`--config=file.py:key=val,flag` argument and start from `base_config` (`csi_base`
is CSI's) or from a method recipe of configs/recipes.py.

The shared sections (data, model, optim, eval, ...) are defined here, one builder each
(`data_config`, `model_config`, ...: `base_config` puts them together); each method's own
section (`config.csi`, `config.msc`, ...) and its checks belong to the method class
(`default_config`, `validate`; jaxad/methods/base.py). This module imports jaxad.methods
only inside functions, and no method module imports it.
"""
import importlib.util
import os

import ml_collections

from jaxad.errors import ConfigError
from jaxad import density, optim
from jaxad.losses import NT_XENT_IMPLS
from jaxad.models import resnet


def parse_arg(arg, **defaults):
    """Parses 'key=val,flag' against typed defaults (big_vision style).

    Commas separate keys. An item with no '=' that is not a known key
    continues the previous string value, so `normal_class=0,3,5` is one value
    '0,3,5' (three one-class detectors); '+' joins the normal classes of one
    detector: `normal_class=0+3`.
    """
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    previous = None
    for item in arg.split(','):
        key, eq, value = item.partition('=')
        if not eq and key not in defaults and previous is not None:
            out[previous] = f'{out[previous]},{key}'
            continue
        previous = key if eq and isinstance(defaults.get(key), str) else None
        if key not in defaults:
            raise ConfigError(f'unknown config argument {key!r}; known: {", ".join(sorted(defaults))}')
        kind = type(defaults[key])
        if not eq:
            if kind is not bool:
                raise ConfigError(f'config argument {key!r} needs a value ({key}=...)')
            out[key] = True
        elif kind is bool:
            out[key] = value.lower() in ('1', 'true', 'yes')
        else:
            try:
                out[key] = kind(value)
            except ValueError as e:
                raise ConfigError(f'config argument {key}={value!r} is not a {kind.__name__}') from e
    return out


def normal_classes(value):
    """'3' or '0+3' -> (3,) or (0, 3)."""
    try:
        return tuple(int(c) for c in str(value).split('+'))
    except ValueError as e:
        raise ConfigError(f'normal_class={value!r}: expected an int or ints joined by "+"') from e


def classes_per_detector(normal_class):
    """The most normal classes one detector of a `normal_class` argument trains on
    ('all' -> 1): MCL's mcl.num_classes."""
    items = [i for i in str(normal_class).split(',') if i != 'all']
    return max([len(normal_classes(i)) for i in items] or [1])


def set_ood(c, ood):
    """eval.ood from a config file's `ood` argument: '' none, a TFDS name ('tfds:cifar100'),
    an .npz ('numpy:/path.npz') or an image folder / .tar.gz path."""
    if not ood:
        return
    kind, sep, rest = ood.partition(':')
    if sep and kind == 'tfds':
        c.eval.ood.source, c.eval.ood.tfds_name = 'tfds', rest
        c.eval.ood.tfds_download = True  # downloaded and prepared on first use
    elif sep and kind == 'numpy':
        c.eval.ood.source, c.eval.ood.numpy_path = 'numpy', rest
    else:
        c.eval.ood.source, c.eval.ood.path = 'folder', ood


def set_normal_classes(c, value):
    """Applies a config file's `normal_class` argument.

    '3' or '0+3': one detector (data.normal_classes). 'all' or '0,3,5': a
    one-class table, one detector per listed item (table.classes), trained
    as stacks by `jaxad.table`.
    """
    value = str(value)
    if value == 'all' or ',' in value:
        for item in value.split(','):
            if item != 'all':
                normal_classes(item)  # fail now on a typo, not after loading data
        c.table.classes = value
        c.data.normal_classes = ()
    else:
        c.table.classes = ''
        c.data.normal_classes = normal_classes(value)


def config_module(anchor, name):
    """The module `name`.py beside the file `anchor` (a config file's `__file__`), e.g. the
    method recipes: `recipes = jc.config_module(__file__, 'recipes')`.

    Loaded by path, as ml_collections loads config files: `configs` is importable as a
    package only from the repository root, not when jaxad is installed and a config file
    is given by path from elsewhere.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(anchor)), f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'_jaxad_config_{name}', path)
    if spec is None or not os.path.isfile(path):
        raise ConfigError(f'config module {path} does not exist')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def method_sections():
    """{section name: the registered method class that owns it}, in registry order (one
    entry per section: self_oecl shares OECL's `oecl`)."""
    from jaxad.methods import REGISTRY
    out = {}
    for cls in REGISTRY.values():
        out.setdefault(cls.config_section, cls)
    return out


def csi_base():
    """CSI with the paper's defaults (docs/methods.md §2); datasets override `data`. The common
    base of every config: `base_config('csi')`."""
    return base_config('csi')


def table_config():
    """The one-class table (`jaxad.table`)."""
    # One-class table (jaxad.table): '' = a single detector on data.normal_classes;
    # 'all' or '0,3,5' = one detector per class (items may be '0+3'), trained
    # stack_size at a time under jax.vmap (0 = all of a group at once).
    c = ml_collections.ConfigDict()
    c.classes = ''
    c.stack_size = 0
    c.stack_mode = 'auto'  # vmap | unroll | auto (unroll on CPU): jaxad.stacking
    return c


# data.on_device (jaxad.loop.input_on_device)
ON_DEVICE_SETTINGS = ('auto', 'true', 'false')


def data_config():
    """The data set, its normal classes and image geometry (`jaxad.data.sources`)."""
    c = ml_collections.ConfigDict()
    c.source = 'folder'
    c.path = ''
    c.image_size = 32
    c.channels = 3
    c.normal_classes = (0,)
    c.tfds_name = ''
    c.tfds_data_dir = ''  # '' = TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets)
    # True: a TFDS data set not yet prepared in tfds_data_dir is downloaded and prepared on
    # first use, as tfds.load does (tensorflow-datasets needs TensorFlow for that step only).
    c.tfds_download = False
    # What to do instead when TFDS cannot give the data, for the error message (the CIFAR
    # configs: "pass path=/path/to/cifar10-jpg.tar.gz ..."); '' = nothing to add.
    c.tfds_alternative = ''
    c.label_key = 'label'
    c.test_fraction = 0.5  # digits: held-out fraction
    c.split_seed = 0  # digits: seed of the stratified train/test split; folder_masks: of
    # the normal hold-out
    c.numpy_path = ''
    # Pixel-mask sources (jaxad.data.pixel_sources); set data.normal_classes=(0,).
    c.category = ''  # mvtec: the category folder under data.path (e.g. 'bottle')
    # folder_masks (anomalib Folder): folders relative to data.path ('' = unused)
    c.normal_dir = ''
    c.abnormal_dir = ''
    c.mask_dir = ''  # masks matched by stem: x.png -> x.png or x_mask.png
    c.normal_test_dir = ''  # '' = hold out normal_split_ratio of normal_dir for test
    c.normal_split_ratio = 0.2
    # Where each step's training batch is gathered: 'true' keeps the run's uint8 training
    # images on the devices (replicated) and the host sends only their positions; 'false'
    # sends every batch's images from the host; 'auto' keeps them on the devices when they
    # take at most a quarter of a device's memory (GPU/TPU; on CPU: from the host). The
    # batches are the same either way (jaxad.loop.DeviceInput).
    c.on_device = 'auto'
    return c


def model_config():
    """The network (`jaxad.models.resnet`)."""
    c = ml_collections.ConfigDict()
    c.name = 'resnet18'
    c.stem = 'cifar'
    c.width = 64
    c.proj_dim = 128
    c.dtype = 'float32'  # compute dtype; params stay float32
    c.bn_mode = 'batch'  # 'batch': global-batch statistics; 'frozen': running stats (MSC)
    # 1: statistics of the global batch (SyncBN, as CSI's and OECL's multi-GPU runs have it);
    # G > 1: per contiguous G-th of the batch (what G GPUs without SyncBN do)
    c.bn_groups = 1
    # The running variance as torch keeps it: the unbiased batch variance ('biased': flax's).
    c.bn_running_var = 'unbiased'
    c.conv_impl = 'auto'  # auto: matmul weight gradients on CPU (models/conv.py)
    # name: resnet18/34/50/101/152, wide_resnet50_2/101_2 (torchvision layouts).
    c.input_norm = 'csi'  # 'csi': (x-0.5)/0.5; 'imagenet': torchvision mean/std
    # A DIR written by `python -m jaxad.models.convert --in W.pth --out DIR`: the encoder
    # starts from it (needs stem='imagenet', width=64; heads stay random). '' = random init.
    c.init_from = ''
    # Initialisation (models/resnet.py): 'torch' = PyTorch's default Conv2d/Linear init, as
    # CSI's and OECL's CIFAR ResNets and heads start (all six originals are PyTorch code);
    # 'torchvision' = torchvision's ResNet init (MCL's recipe); 'flax' = lecun-normal, zero
    # biases (jaxad before this field). init_from replaces the encoder (MSC, ReContrast).
    # ReContrast and AnoMem do not read model.init / bn_running_var yet: ReContrast's
    # bottleneck and decoder set the code's init themselves, AnoMem's layers keep flax's; the
    # BN of both keeps flax's biased running variance.
    c.init = 'torch'
    c.proj_hidden = 0  # projection head hidden width; 0 = feature width (CSI)
    c.proj_bn = False  # BatchNorm after the hidden layer (OECL's head)
    return c


def oe_config():
    """Outlier exposure (`oe.source`)."""
    # Outlier exposure (OECL): '' none; 'normal' (the normal images again, shuffled on
    # their own: self-OECL); 'other_classes' (the data set's non-normal training images);
    # or a data source ('folder', 'tfds', ...) read with the fields below and fitted to
    # data.image_size / data.channels.
    c = ml_collections.ConfigDict()
    c.source = ''
    c.path = ''
    c.tfds_name = ''
    c.tfds_data_dir = ''
    c.tfds_download = False
    c.tfds_alternative = ''
    c.label_key = 'label'
    c.numpy_path = ''
    c.max_images = 0  # > 0: a seeded (config.seed) subset of this many outliers; 0 = all
    return c


def loss_config():
    """The shared contrastive-loss implementation (`jaxad.losses`)."""
    # Shared contrastive-loss implementation: 'dense' forms the (N, N) logits; 'chunked'
    # shards queries over 'data' and streams key blocks (large global batches, losses.py).
    c = ml_collections.ConfigDict()
    c.nt_xent = 'dense'
    c.key_block = 2048
    return c


def augment_config():
    """Training augmentation (`jaxad.data.augment`)."""
    c = ml_collections.ConfigDict()
    c.crop_scale = (0.08, 1.0)
    c.crop_ratio = (3 / 4, 4 / 3)
    c.brightness = 0.4
    c.contrast = 0.4
    c.saturation = 0.4
    c.hue = 0.1
    c.jitter_p = 0.8
    c.gray_p = 0.2
    return c


def optim_config():
    """The optimiser and learning-rate schedule (`jaxad.optim`)."""
    c = ml_collections.ConfigDict()
    c.name = 'lars'  # torchlars LARS around SGD(momentum)
    c.lr = 0.1  # base rate; the peak is lr x warmup_multiplier under csi_warmup_cosine
    c.lr_rule = 'none'  # 'linear': lr*B/lr_base_batch, 'sqrt': lr*sqrt(B/lr_base_batch)
    c.lr_base_batch = 256
    c.exclude_bn_bias = False  # True: no decay/LARS on BN and biases (SimCLR); CSI: False
    c.momentum = 0.9
    c.nesterov = False  # sgd only (MCL)
    c.betas = (0.9, 0.999)  # adamw
    # ((regex, lr), ...): matching params get their own optimiser at this base rate
    # (ReContrast: the encoder at 1e-5 beside the decoder's 2e-3)
    c.group_lr = ()
    c.freeze = ()  # regexes on param paths ('encoder/layer1_0/...'): kept fixed (MSC)
    c.final_lr_fraction = 0.0  # 'cosine' ends at lr * this (MCL: 5e-4)
    c.weight_decay = 1e-6
    c.trust_coef = 1e-3
    c.eps = 1e-8
    c.schedule = 'csi_warmup_cosine'  # | warmup_cosine | cosine | constant
    c.warmup_epochs = 10
    c.warmup_steps = 0  # > 0 overrides warmup_epochs
    c.warmup_multiplier = 10.0
    c.epochs = 1000
    return c


def eval_config():
    """Evaluation (`jaxad.evaluate`): test-time augmentation, density evaluators, plots and
    an out-of-distribution test set."""
    c = ml_collections.ConfigDict()
    c.batch_size = 256
    c.num_samples = 10  # test-time augmentations T (CSI: --ood_samples 10)
    c.crop_scale = 0.54  # fixed crop scale at test time (--resize_factor 0.54 --resize_fix)
    c.knn_k = 1
    c.plots = True  # roc.png + score_hist.png under workdir/plots (needs matplotlib)
    # Every result carries the image AUROC of the raw-pixel 1-NN detector on the same split
    # (jaxad.baseline): a learned detector below it says so. False: skip it (its cost is a
    # bank x test distance matrix over raw pixels, on the host).
    c.pixel_baseline = True
    c.num_overlays = 16  # pixel methods: overlay PNGs under workdir/plots/overlays
    c.save_maps = True  # pixel methods: every test map in workdir/anomaly_maps.npz
    # Density evaluators (jaxad.density) on the method's bank features, reported beside its
    # own scores: any of 'knn', 'gde', 'kde', 'mahalanobis', evaluated together in one pass.
    c.density = ()
    c.knn_metric = 'cosine'  # cosine (1 - cos) | l2 | sql2 (MSC: sql2, sum, normalised, k=2)
    c.knn_reduce = 'mean'  # mean | sum | kth of the k nearest distances
    c.knn_normalize = False  # l2/sql2 on l2-normalised features
    c.gde_ridge = 1e-6
    c.kde_temperature = 0.1
    c.maha_ridge = 1e-6
    c.maha_shared_cov = True
    c.density_test_block = 1024
    c.density_bank_block = 4096
    # Another data set's test split appended to the test set as anomalies (labelled
    # multi-class OOD, e.g. CIFAR-10 with normal_class=0+1+...+9 vs CIFAR-100): the
    # data-source fields of `config.data`, images fitted to its size and channels.
    c.ood = ml_collections.ConfigDict()
    c.ood.source = ''
    c.ood.path = ''
    c.ood.tfds_name = ''
    c.ood.tfds_data_dir = ''
    c.ood.tfds_download = False
    c.ood.tfds_alternative = ''
    c.ood.label_key = 'label'
    c.ood.numpy_path = ''
    return c


def checkpoint_config():
    """Checkpoint cadence and retention (`jaxad.checkpoint`)."""
    c = ml_collections.ConfigDict()
    c.every_steps = 1000
    c.max_to_keep = 3
    c.use_async = True
    return c


def export_config():
    """`--mode=export` (`jaxad.export`)."""
    # --mode=export: the platforms the artifact is lowered for (comma-separated, of cpu,
    # cuda, tpu); one StableHLO module serves them all, so a CPU-made artifact runs on
    # a GPU or TPU host. A platform it cannot be lowered for is an error, not dropped.
    c = ml_collections.ConfigDict()
    c.platforms = 'cpu,cuda,tpu'
    return c


def threshold_config():
    """The decision threshold (`jaxad.thresholds`)."""
    # Decision threshold on the headline score (jaxad.thresholds), saved as
    # workdir/threshold.json. holdout_fraction > 0 keeps that fraction of the normal
    # training images (seeded split) out of training and out of the scoring bank and
    # calibrates on them after training; 0 = the paper protocol (all of them train).
    c = ml_collections.ConfigDict()
    c.holdout_fraction = 0.0
    c.quantile = 0.95  # rule 'normal_quantile': this quantile of normal scores
    c.value = ml_collections.config_dict.placeholder(float)  # set: rule 'fixed'
    return c


def base_config(method='csi'):
    """The common base: the top-level fields, the shared sections with their defaults (one
    builder each: `table_config`, `data_config`, `model_config`, `oe_config`, `loss_config`,
    `augment_config`, `optim_config`, `eval_config`, `checkpoint_config`, `export_config`,
    `threshold_config`), every registered method's own section (its `default_config()`),
    and `method`. The method recipes of configs/recipes.py start from it."""
    c = ml_collections.ConfigDict()
    c.method = method
    c.seed = 0
    c.num_devices = 0  # 0 = all visible devices
    c.batch_size = 128  # global images per step: 32 per GPU x 4 GPUs; x 4 rotations x 2 views
    c.total_steps = 0  # 0 = optim.epochs x steps per epoch
    c.log_every = 50
    c.tensorboard = False  # also write metrics as TensorBoard event files to WORKDIR/tensorboard/
    c.table = table_config()
    c.data = data_config()
    c.model = model_config()
    # Each registered method's knobs (docs/methods.md §2-§7), read only by that method: the
    # defaults are its class's `default_config()` (jaxad/methods/<name>.py).
    for section, cls in method_sections().items():
        c[section] = cls.default_config()
    c.oe = oe_config()
    c.loss = loss_config()
    c.augment = augment_config()
    c.optim = optim_config()
    c.eval = eval_config()
    c.checkpoint = checkpoint_config()
    c.export = export_config()
    c.threshold = threshold_config()
    return c


def validate_config(config):
    """Checks that catch a bad config before any data is loaded, for single runs and tables
    alike: the shared sections here (the model's fields by `resnet.check_model_config`, the
    optimiser's and schedule's by `optim.check_config`), the method's own by its class
    (`validate`)."""
    def positive(name, value):
        if value <= 0:
            raise ConfigError(f'{name} must be > 0, got {value}')
    positive('batch_size', config.batch_size)
    positive('log_every', config.log_every)
    positive('checkpoint.every_steps', config.checkpoint.every_steps)
    positive('eval.batch_size', config.eval.batch_size)
    positive('eval.num_samples', config.eval.num_samples)
    if config.total_steps < 0:
        raise ConfigError(f'total_steps must be >= 0 (0 = from optim.epochs), got {config.total_steps}')
    if config.table.stack_size < 0:
        raise ConfigError(f'table.stack_size must be >= 0 (0 = no bound), got {config.table.stack_size}')
    if not config.data.normal_classes and not config.table.classes:
        raise ConfigError('data.normal_classes is empty: name at least one normal class '
                          '(or set table.classes, e.g. normal_class=all)')
    if config.loss.nt_xent not in NT_XENT_IMPLS:
        raise ConfigError(f'unknown loss.nt_xent {config.loss.nt_xent!r}; '
                          f'choose one of {", ".join(NT_XENT_IMPLS)}')
    positive('loss.key_block', config.loss.key_block)
    for name in density.config_names(config.eval):
        if name not in density.DENSITY_SCORERS:
            raise ConfigError(f'unknown eval.density {name!r}; choose from '
                              f'{", ".join(density.DENSITY_SCORERS)}')
    if density.config_names(config.eval):
        if config.eval.knn_metric not in density.KNN_METRICS:
            raise ConfigError(f'eval.knn_metric must be one of {density.KNN_METRICS}')
        if config.eval.knn_reduce not in density.KNN_REDUCES:
            raise ConfigError(f'eval.knn_reduce must be one of {density.KNN_REDUCES}')
        positive('eval.kde_temperature', config.eval.kde_temperature)
    if config.data.get('on_device', 'auto') not in ON_DEVICE_SETTINGS:
        raise ConfigError(f'data.on_device must be one of {", ".join(ON_DEVICE_SETTINGS)}, '
                          f'got {config.data.on_device!r}')
    if config.oe.get('max_images', 0) < 0:
        raise ConfigError(f'oe.max_images must be >= 0 (0 = all), got {config.oe.max_images}')
    resnet.check_model_config(config.model)
    optim.check_config(config.optim, config.batch_size)
    from jaxad.methods import method_class
    method_class(config.method).validate(config)  # the method's own checks (unknown: error)


# config.model fields added after runs were saved: the value a config.json without them was
# trained with, which load_run_config gives it (not today's default).
LEGACY_MODEL_FIELDS = {'init': 'flax', 'bn_running_var': 'biased'}


def load_run_config(workdir):
    """The ConfigDict of the run in `workdir`, rebuilt from its `config.json`.

    Fields are laid over `csi_base()`, so a config.json written before a field
    existed still gets its default; JSON lists become tuples where the default
    is a tuple. Raises ConfigError when `workdir` holds no run.
    """
    import json

    from jaxad import storage
    workdir = storage.normalize(workdir)
    storage.check_url(workdir, write=False)
    path = storage.join(workdir, 'config.json')
    if not storage.isfile(path):
        what = 'does not exist' if not storage.isdir(workdir) else 'has no config.json'
        raise ConfigError(f'workdir {workdir} {what}: it holds no training run (train one with '
                          '--mode=train, or pass the run\'s --config)')
    try:
        saved = json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f'cannot read {path}: {e}') from e
    if not isinstance(saved, dict):
        raise ConfigError(f'{path} does not hold a config (a JSON object)')

    def merge(base, new):
        out = dict(base)
        for key, value in new.items():
            old = base.get(key)
            if isinstance(old, dict) and isinstance(value, dict):
                out[key] = merge(old, value)
            elif isinstance(old, tuple) and isinstance(value, list):
                out[key] = _as_tuple(value)
            else:
                out[key] = value
        return out

    model = saved.get('model')
    if isinstance(model, dict):
        # A run saved before these fields existed was trained with flax's init and BN.
        for key, value in LEGACY_MODEL_FIELDS.items():
            model.setdefault(key, value)
    merged = merge(csi_base().to_dict(), saved)
    config = ml_collections.ConfigDict(merged)
    if config.threshold.value is None:  # keep it typed, as csi_base has it
        with config.unlocked():
            del config.threshold['value']
            config.threshold.value = ml_collections.config_dict.placeholder(float)
    return config


def _as_tuple(value):
    return tuple(_as_tuple(v) if isinstance(v, list) else v for v in value)
