"""MCL on Fashion-MNIST (Debian's dataset-fashion-mnist IDX files), sized for a CPU run.

apt-get install -y dataset-fashion-mnist
python -m jaxad.main --config=configs/mcl_fmnist.py:normal_class=0 --workdir=/tmp/mcl_fm0
python -m jaxad.main --config=configs/mcl_fmnist.py:normal_class=0+1+2+3+4,arch=resnet34,width=64

28x28 grayscale repeated to 3 channels, so the colour augmentations and the CIFAR ResNet
apply unchanged. Defaults are small (ResNet-18 of width 16, 32 images per step, 10 epochs);
the paper recipe is configs/mcl_cifar.py. Arguments: normal_class (an int, ints joined by
'+' for the labelled multi-class setting, 'all' or a comma list for the one-class table),
arch, width, epochs, batch_size, sei_views, path, seed.
"""
from jaxad import config as jc

# Loaded by path (not `from configs import ...`): works from any working directory.
recipes = jc.config_module(__file__, 'recipes')


def get_config(arg=None):
    arg = jc.parse_arg(arg, normal_class='0', arch='resnet18', width=16, epochs=10,
                       batch_size=32, sei_views=8, path='/usr/share/datasets/fashion-mnist',
                       seed=0)
    c = recipes.mcl_base()
    c.seed = arg.seed
    c.data.source = 'fashion_mnist'
    c.data.path = arg.path
    c.data.image_size = 28
    c.data.channels = 3
    jc.set_normal_classes(c, arg.normal_class)
    c.mcl.num_classes = jc.classes_per_detector(arg.normal_class)
    c.mcl.sei_views = arg.sei_views
    c.model.name = arg.arch
    c.model.width = arg.width
    c.batch_size = arg.batch_size
    c.optim.epochs = arg.epochs
    c.log_every = 25
    c.eval.batch_size = 64
    c.checkpoint.every_steps = 500
    return c
