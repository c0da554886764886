"""Method recipes and helpers shared by the config files (not by jaxad itself).

A recipe is the common base (`jaxad.config.base_config`) with a method's published
training setup (optimiser, schedule, batch, model); data and the per-run arguments are the
config file's. Config files load this module by path, so they work from any directory:

    from jaxad import config as jc
    recipes = jc.config_module(__file__, 'recipes')
    c = recipes.msc_base()

(From the repository root, `from configs import recipes` gives the same functions.)
"""
from jaxad import config as jc
from jaxad.errors import ConfigError


def msc_base():
    """MSC's training recipe (docs/methods.md §3.2) on top of the common base; data and encoder are
    the config file's."""
    c = jc.base_config('msc')
    c.model.bn_mode = 'frozen'  # model.eval() for the whole run
    c.model.proj_dim = 0
    c.batch_size = 64
    c.optim.name = 'sgd'
    c.optim.lr = 1e-5
    c.optim.momentum = 0.0
    c.optim.weight_decay = 5e-5
    c.optim.schedule = 'constant'
    c.optim.epochs = 20
    c.eval.batch_size = 128
    c.checkpoint.every_steps = 500
    return c


def mcl_base():
    """MCL's training recipe (docs/methods.md §4.2, `mcl_main.py`) on top of the common base; data and
    mcl.num_classes are the config file's."""
    c = jc.base_config('mcl')
    c.model.name = 'resnet34'
    c.model.stem = 'cifar'  # conv1 3x3 stride 1, no max-pool
    # The code's ResNet is torchvision's (convs kaiming-normal fan_out); its replaced 3x3 conv1
    # and the projector keep torch's default init.
    c.model.init = 'torchvision'
    c.model.input_norm = 'none'  # ToTensor() only
    c.model.proj_hidden = 2048  # Linear(512, 2048) - ReLU - Linear(2048, 128), no BN
    c.model.proj_dim = 128
    # Images per step; x 4 rotations = the code's batch_size 1024, x 2 views = 2048 rows.
    c.batch_size = 256
    c.optim.name = 'sgd'
    c.optim.nesterov = True
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-6
    # The code's lr = 0.3 * (rotated images per batch) / 256 = 0.3 * batch_size / 64: 1.2 at
    # the default batch, and the same rule at any other batch size.
    c.optim.lr = 0.3
    c.optim.lr_rule = 'linear'
    c.optim.lr_base_batch = 64
    c.optim.schedule = 'cosine'  # CosineAnnealingLR per step, no warm-up
    c.optim.final_lr_fraction = 5e-4  # eta_min = lr * 5e-4
    c.optim.epochs = 400
    c.eval.batch_size = 128  # x 8 SEI views
    return c


def oecl_base():
    """OECL's recipe (docs/methods.md §6.2) on top of the common base; data and oe are the config
    file's. realOECL's "LARS" never applies its trust ratio: plain SGD + momentum with
    coupled weight decay, cosine over 500 epochs (per step here, per epoch there)."""
    c = jc.base_config('oecl')
    c.batch_size = 64  # ID images per step (+ as many OE images); self-OECL: 32
    c.model.proj_hidden = 0  # Linear(feat, feat): 512 for ResNet-18
    c.model.proj_bn = True  # Linear -> BatchNorm1d -> ReLU -> Linear(128)
    c.model.input_norm = 'cifar'  # mean (125.3, 123.0, 113.9)/255, std (63.0, 62.1, 66.7)/255
    c.optim.name = 'sgd'
    c.optim.lr = 0.1
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.optim.schedule = 'cosine'
    c.optim.epochs = 500
    c.augment.crop_scale = (0.08, 1.0)
    c.eval.num_samples = 32  # num_aug: the clean view + 32 SimCLR views per test image
    c.eval.batch_size = 128
    return c


def recontrast_base():
    """ReContrast's MVTec recipe (docs/methods.md §5.3, recontrast_mvtec.py) on top of the common base:
    WideResNet-50-2 (ImageNet stem and normalisation), 256 px, batch 16, 2000 iterations,
    AdamW(2e-3) on bottleneck + decoder and AdamW(1e-5) on the encoder (betas 0.9/0.999,
    decay 1e-5), constant rates, no augmentation. Data (mvtec or folder_masks) and the
    encoder BN mode (model.bn_mode; per category in the code) are the config file's."""
    c = jc.base_config('recontrast')
    c.model.name = 'wide_resnet50_2'
    c.model.stem = 'imagenet'
    c.model.input_norm = 'imagenet'
    c.model.proj_dim = 0
    c.data.image_size = 256
    c.data.normal_classes = (0,)
    c.batch_size = 16
    c.total_steps = 2000
    c.optim.name = 'adamw'
    c.optim.lr = 2e-3
    c.optim.betas = (0.9, 0.999)
    c.optim.weight_decay = 1e-5
    c.optim.eps = 1e-8
    c.optim.schedule = 'constant'
    c.optim.group_lr = (('^encoder/', 1e-5),)
    c.eval.batch_size = 16
    c.checkpoint.every_steps = 250
    c.log_every = 50
    return c


def anomem_base():
    """AnoMem (docs/methods.md §7, an [inferred] sketch) on top of the common base; data and oe are the
    config file's. CSI-like SimCLR training: CSI's LARS (lr 0.1, momentum 0.9, wd 1e-6,
    x10 warm-up over 10 epochs then cosine) and augmentations, 2 views per image (no
    rotations), so twice CSI's images per step fit in half its rows. 500 epochs [inferred]."""
    c = jc.base_config('anomem')
    c.batch_size = 256  # x 2 views = 512 rows (CSI: 128 x 4 rotations x 2 views)
    c.optim.epochs = 500
    c.eval.num_samples = 1  # unused: AnoMem scores the clean test image
    return c


OE_SOURCES = ('folder', 'numpy', 'other_classes')  # the OECL config files' `oe` argument


def set_outlier_exposure(c, oe, oe_path, what):
    """config.oe from the `oe` / `oe_path` arguments of an OECL config file."""
    if oe not in OE_SOURCES:
        raise ConfigError(f'{what}: unknown oe={oe!r}; choose one of {", ".join(OE_SOURCES)}')
    c.oe.source = oe
    if oe == 'other_classes':
        return
    if not oe_path:
        raise ConfigError(
            f'{what}: oe={oe} needs oe_path. The paper\'s CIFAR-10 outlier exposure '
            '(Tiny80M, or the 300K-random-images substitute) is not available here: pass '
            'oe_path=<image folder or .tar.gz with train/<class>/ images> (or an .npz with '
            'oe=numpy), or oe=other_classes to expose the other classes of the data set')
    if oe == 'numpy':
        c.oe.numpy_path = oe_path
    else:
        c.oe.path = oe_path


# ReContrast's per-category encoder BN mode (the code's recontrast_mvtec.py): eval for these,
# train for the other MVTec categories; VisA: eval for cashew and pcb1 (docs/methods.md §5.3).
EVAL_BN_CATEGORIES = {'mvtec': ('toothbrush', 'leather', 'grid', 'tile', 'wood', 'screw'),
                      'visa': ('cashew', 'pcb1')}
