"""AnoMem (docs/methods.md §7, an inferred sketch) on one-class Fashion-MNIST (Debian's IDX files).

apt-get install -y dataset-fashion-mnist
python -m jaxad.main --config=configs/anomem_fmnist.py:normal_class=0 --workdir=/tmp/anomem_fm0

The CPU-budget comparison with CSI (RESULTS.md: 100 steps of 32 images, width 16):
python -m jaxad.main --config=configs/anomem_fmnist.py:normal_class=0,width=16 \
    --config.batch_size=32 --config.total_steps=100 --config.log_every=25 \
    --config.optim.epochs=1 --config.optim.warmup_epochs=0 --workdir=/tmp/runs/anomem_fm0

28x28 grayscale repeated to 3 channels, as configs/csi_fmnist.py. Arguments: normal_class
(an index, 'all' or a comma list for the one-class table), epochs, width, path, seed.
"""
from jaxad import config as jc

# Loaded by path (not `from configs import ...`): works from any working directory.
recipes = jc.config_module(__file__, 'recipes')


def get_config(arg=None):
    arg = jc.parse_arg(arg, normal_class='0', epochs=100, width=64,
                       path='/usr/share/datasets/fashion-mnist', seed=0)
    c = recipes.anomem_base()
    c.seed = arg.seed
    c.data.source = 'fashion_mnist'
    c.data.path = arg.path
    c.data.image_size = 28
    jc.set_normal_classes(c, arg.normal_class)
    c.model.width = arg.width
    c.optim.epochs = arg.epochs
    return c
