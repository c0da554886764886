"""self-OECL on one-class CIFAR-10 (docs/methods.md §6): no auxiliary data.

python -m jaxad.main --config=configs/self_oecl_cifar.py:normal_class=0 --workdir=/tmp/soecl_c0

The normal images rotated by 0 and 90 degrees are the in-distribution instances of
NT-Xent; a second, independently shuffled stream of the normal images rotated by 180 and
270 degrees is the outlier exposure (oe.source=normal). 32 images per step, each giving
2 views x 2 rotations on both sides (256 embeddings). Otherwise OECL's recipe.

Arguments: normal_class (int, '0+3', 'all' or a comma list), path (CIFAR-10 JPEG folder
or .tar.gz; default: TFDS cifar10, downloaded and prepared on first use, see
configs/csi_cifar.py), tfds_data_dir, epochs (500), alpha (1.0), warmup_epochs (50), seed.
"""
from jaxad import config as jc

# Loaded by path (not `from configs import ...`): works from any working directory.
recipes = jc.config_module(__file__, 'recipes')
csi_cifar = jc.config_module(__file__, 'csi_cifar')


def get_config(arg=None):
    arg = jc.parse_arg(arg, normal_class='0', path='', tfds_data_dir='', epochs=500,
                       alpha=1.0, warmup_epochs=50, seed=0)
    c = recipes.oecl_base()
    c.method = 'self_oecl'
    c.seed = arg.seed
    c.batch_size = 32
    csi_cifar.set_cifar_data(c, arg, 'configs/self_oecl_cifar.py')
    jc.set_normal_classes(c, arg.normal_class)
    c.oe.source = 'normal'
    c.oecl.alpha = arg.alpha
    c.oecl.warmup_epochs = arg.warmup_epochs
    c.optim.epochs = arg.epochs
    return c
