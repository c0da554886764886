"""OECL / self-OECL on one-class Fashion-MNIST (small, CPU-friendly defaults).

apt-get install -y dataset-fashion-mnist
python -m jaxad.main --config=configs/oecl_fmnist.py:normal_class=0 --workdir=/tmp/oecl_fm0
python -m jaxad.main --config=configs/oecl_fmnist.py:normal_class=0,self --workdir=/tmp/soecl_fm0

28x28 grey images repeated to 3 channels, so the SimCLR colour augmentations and the
CIFAR ResNet-18 apply unchanged. Outlier exposure (OECL): CIFAR-10's training images
(TFDS cifar10, downloaded and prepared on first use as in configs/csi_cifar.py, or the JPEG
archive given as oe_path), resized to 28x28 on load and turned grey (oecl.oe_grayscale) so
that colour alone does not give the outliers away. `self`:
self-OECL (rotated normal images as outliers, no auxiliary data).

Arguments: normal_class (int, '0+3', 'all' or a comma list), self (flag), epochs (20),
warmup_epochs (2; the paper's 50 of 500 is 10%), width (16; the paper's is 64),
batch_size (64; self-OECL: 32), num_samples (8 test-time views; paper 32), alpha (1.0),
path (IDX dir), oe (folder | numpy | other_classes), oe_path (default with oe=folder:
TFDS cifar10), tfds_data_dir (of that TFDS cifar10), seed.
"""
from jaxad import config as jc

# Loaded by path (not `from configs import ...`): works from any working directory.
recipes = jc.config_module(__file__, 'recipes')


def get_config(arg=None):
    arg = jc.parse_arg(arg, normal_class='0', self=False, epochs=20, warmup_epochs=2,
                       width=16, batch_size=0, num_samples=8, alpha=1.0,
                       path='/usr/share/datasets/fashion-mnist', oe='folder', oe_path='',
                       tfds_data_dir='', seed=0)
    c = recipes.oecl_base()
    c.seed = arg.seed
    c.data.source = 'fashion_mnist'
    c.data.path = arg.path
    c.data.image_size = 28
    c.data.channels = 3
    jc.set_normal_classes(c, arg.normal_class)
    c.model.width = arg.width
    c.optim.epochs = arg.epochs
    c.oecl.alpha = arg.alpha
    c.oecl.warmup_epochs = arg.warmup_epochs
    c.eval.num_samples = arg.num_samples
    c.checkpoint.every_steps = 1000
    if arg.self:
        c.method = 'self_oecl'
        c.batch_size = arg.batch_size or 32
        c.oe.source = 'normal'
    else:
        c.batch_size = arg.batch_size or 64
        if arg.oe == 'folder' and not arg.oe_path:  # CIFAR-10 from TFDS (first use: download)
            c.oe.source, c.oe.tfds_name = 'tfds', 'cifar10'
            c.oe.tfds_data_dir = arg.tfds_data_dir
            c.oe.tfds_download = True
            c.oe.tfds_alternative = ('give the CIFAR-10 JPEG archive instead: --config=configs/'
                                     'oecl_fmnist.py:oe_path=/path/to/cifar10-jpg.tar.gz')
        else:
            recipes.set_outlier_exposure(c, arg.oe, arg.oe_path, 'configs/oecl_fmnist.py')
        c.oecl.oe_grayscale = arg.oe != 'other_classes'  # FMNIST's own classes are grey
    return c
