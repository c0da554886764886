"""MSC on one-class CIFAR-10 with the paper's defaults (docs/methods.md §3): ImageNet ResNet-152.

python -m jaxad.models.convert --in resnet152-394f9c45.pth --out /data/r152
python -m jaxad.main --config=configs/msc_cifar.py:normal_class=0,weights=/data/r152 \
    --workdir=/tmp/msc_c0

Needs the torchvision ImageNet weights (converted with `jaxad.models.convert`); without
them MSC has nothing to shift and the run stops with a clear error. No ImageNet weights?
Start from a jaxad CSI run instead: configs/msc_from_run.py. Arguments: normal_class,
weights (converted DIR), arch (resnet152 | resnet18), epochs, path (CIFAR-10 JPEG folder or
.tar.gz; default: TFDS cifar10, downloaded and prepared on first use, see
configs/csi_cifar.py), tfds_data_dir, angular, seed.
"""
from jaxad import config as jc
from jaxad.errors import ConfigError

# Loaded by path (not `from configs import ...`): works from any working directory.
recipes = jc.config_module(__file__, 'recipes')
csi_cifar = jc.config_module(__file__, 'csi_cifar')

FROZEN_R152 = ('^encoder/(conv1|bn1|layer1_|layer2_)',)  # requires_grad=False in main.py


def msc_cifar_base(arg, what):
    """MSC's recipe on one-class CIFAR-10 from the arguments every MSC CIFAR config file
    takes (seed, path, tfds_data_dir, normal_class, angular, epochs); the encoder is the
    caller's (also configs/msc_vit_cifar.py). `what` names the config file in errors."""
    c = recipes.msc_base()
    c.seed = arg.seed
    csi_cifar.set_cifar_data(c, arg, what)
    jc.set_normal_classes(c, arg.normal_class)
    c.msc.angular = arg.angular
    c.optim.epochs = arg.epochs
    return c


def get_config(arg=None):
    arg = jc.parse_arg(arg, normal_class='0', weights='', arch='resnet152', epochs=20,
                       path='', tfds_data_dir='', angular=False, seed=0)
    if not arg.weights:
        raise ConfigError('configs/msc_cifar.py needs ImageNet weights: convert them with '
                          '`python -m jaxad.models.convert --in resnet152.pth --out DIR` and '
                          'pass weights=DIR (or use configs/msc_from_run.py)')
    c = msc_cifar_base(arg, 'configs/msc_cifar.py')
    c.model.name = arg.arch
    c.model.stem = 'imagenet'
    c.model.input_norm = 'imagenet'
    c.model.init_from = arg.weights
    c.msc.image_size = 224  # CIFAR images are up-sampled, as torchvision's transforms do
    # R152: Resize(256) -> CenterCrop(224); R18: Resize(224) (bicubic in the code).
    c.msc.eval_center_crop = 0.875 if arg.arch == 'resnet152' else 1.0
    c.optim.freeze = FROZEN_R152 if arg.arch == 'resnet152' else ()
    return c
