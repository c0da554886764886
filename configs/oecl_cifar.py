"""OECL on one-class CIFAR-10 with the paper's recipe (docs/methods.md §6).

python -m jaxad.main --config=configs/oecl_cifar.py:normal_class=0,oe_path=/data/300K_random_images \
    --workdir=/tmp/oecl_c0
python -m jaxad.main --config=configs/oecl_cifar.py:normal_class=0,oe=other_classes \
    --workdir=/tmp/oecl_c0_other

The paper's outlier exposure for CIFAR-10 is Tiny80M (minus the CIFAR images). Tiny
Images has been withdrawn and no substitute (e.g. the 300K random images) ships here, so
oe=folder (the default) needs oe_path: an image folder or .tar.gz laid out as
`train/<any class>/*.png|jpg` (resized to 32x32 RGB on load). oe=other_classes uses the
other nine CIFAR-10 classes instead: that leaks the test anomalies' classes into training
(an outlier-exposure study, not the one-class protocol); oe=numpy reads oe_path as .npz.

Arguments (after ':', comma separated): normal_class (int, '0+3', 'all' or a comma list
for the one-class table), path (CIFAR-10 JPEG folder or .tar.gz; default: TFDS cifar10,
downloaded and prepared on first use, see configs/csi_cifar.py), tfds_data_dir, oe (folder |
numpy | other_classes), oe_path, epochs (500), alpha (1.0), warmup_epochs (50), seed.

Recipe: 64 normal + 64 OE images per step, two SimCLR views each (no blur); SGD lr 0.1,
momentum 0.9, wd 5e-4, cosine over 500 epochs; ResNet-18 (CIFAR stem) with the
Linear-BN-ReLU-Linear(128) head; alpha = 0 for 50 epochs, then 1.
"""
from jaxad import config as jc

# Loaded by path (not `from configs import ...`): works from any working directory.
recipes = jc.config_module(__file__, 'recipes')
csi_cifar = jc.config_module(__file__, 'csi_cifar')


def get_config(arg=None):
    arg = jc.parse_arg(arg, normal_class='0', path='', tfds_data_dir='', oe='folder',
                       oe_path='', epochs=500, alpha=1.0, warmup_epochs=50, seed=0)
    c = recipes.oecl_base()
    c.seed = arg.seed
    csi_cifar.set_cifar_data(c, arg, 'configs/oecl_cifar.py')
    jc.set_normal_classes(c, arg.normal_class)
    recipes.set_outlier_exposure(c, arg.oe, arg.oe_path, 'configs/oecl_cifar.py')
    c.oecl.alpha = arg.alpha
    c.oecl.warmup_epochs = arg.warmup_epochs
    c.optim.epochs = arg.epochs
    return c
