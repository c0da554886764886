"""self-OECL on one-class CIFAR-10 (docs/methods.md §6): no auxiliary data.

python -m jaxad.main --config=configs/self_oecl_cifar.py:normal_class=0 --workdir=/tmp/soecl_c0

The normal images rotated by 0 and 90 degrees are the in-distribution instances of
NT-Xent; a second, independently shuffled stream of the normal images rotated by 180 and
270 degrees is the outlier exposure (oe.source=normal). 32 images per step, each giving
2 views x 2 rotations on both sides (256 embeddings). Otherwise OECL's recipe.

Arguments: normal_class (int, '0+3', 'all' or a comma list), path (CIFAR-10 JPEG folder
or .tar.gz), epochs (500), alpha (1.0), warmup_epochs (50), seed.
"""
import os

from jaxad import config as jc

# Loaded by path (not `from configs import ...`): works from any working directory.
recipes = jc.config_module(__file__, 'recipes')

DEFAULT_JPG = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data',
                           'cifar10-jpg.tar.gz')


def get_config(arg=None):
    arg = jc.parse_arg(arg, normal_class='0', path='', epochs=500, alpha=1.0,
                       warmup_epochs=50, seed=0)
    c = recipes.oecl_base()
    c.method = 'self_oecl'
    c.seed = arg.seed
    c.batch_size = 32
    c.data.source = 'folder'
    c.data.path = arg.path or os.path.abspath(DEFAULT_JPG)
    c.data.image_size = 32
    jc.set_normal_classes(c, arg.normal_class)
    c.oe.source = 'normal'
    c.oecl.alpha = arg.alpha
    c.oecl.warmup_epochs = arg.warmup_epochs
    c.optim.epochs = arg.epochs
    return c
