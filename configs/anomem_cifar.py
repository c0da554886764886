"""AnoMem (docs/methods.md §7, an inferred sketch: no parity target) on one-class CIFAR.

python -m jaxad.main --config=configs/anomem_cifar.py:normal_class=0 --workdir=/tmp/anomem_c10_0

Arguments (after ':', comma separated):
  normal_class  int, or ints joined by '+' (default 0 = airplane); 'all' or a comma
                list (0,3,5) trains the one-class table, one detector per item
  dataset       cifar10 (the default without `path`) | cifar100 | svhn_cropped: TFDS data,
                downloaded and prepared on first use (see configs/csi_cifar.py);
                cifar10_jpg (the default with `path`)
  path          the CIFAR-10 JPEG folder or .tar.gz (train/<class>/, test/<class>/)
  tfds_data_dir TFDS data dir (default: TFDS_DATA_DIR or ~/tensorflow_datasets)
  epochs        training epochs (default 500 [inferred]; the paper's schedule was not recovered)
  seed

Recipe (`anomem_base`, configs/recipes.py): CIFAR ResNet-18 with Hopfield memories after layer2,
layer3 and layer4; 256 images per step x 2 SimCLR views, NT-Xent tau 0.5 + VICReg variance
term + memory pull; CSI's LARS (lr 0.1, x10 warm-up over 10 epochs, cosine). Scores: the
inverse-std-normalised sum of the per-scale mean deviations (`anomem`), and the anomaly map.
"""
from jaxad import config as jc

# Loaded by path (not `from configs import ...`): works from any working directory.
recipes = jc.config_module(__file__, 'recipes')
csi_cifar = jc.config_module(__file__, 'csi_cifar')


def get_config(arg=None):
    arg = jc.parse_arg(arg, normal_class='0', dataset='', path='',
                       tfds_data_dir='', epochs=500, seed=0)
    c = recipes.anomem_base()
    c.seed = arg.seed
    c.optim.epochs = arg.epochs
    jc.set_normal_classes(c, arg.normal_class)
    csi_cifar.set_cifar_data(c, arg, 'configs/anomem_cifar.py')
    return c
