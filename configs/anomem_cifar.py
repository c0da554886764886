"""AnoMem (methods.md §7, an inferred sketch: no parity target) on one-class CIFAR.

python -m jaxad.main --config=configs/anomem_cifar.py:normal_class=0 --workdir=/tmp/anomem_c10_0

Arguments (after ':', comma separated):
  normal_class  int, or ints joined by '+' (default 0 = airplane); 'all' or a comma
                list (0,3,5) trains the one-class table, one detector per item
  dataset       cifar10_jpg (default: ../shared/data/cifar10-jpg.tar.gz or `path`),
                cifar10 | cifar100 | svhn_cropped (prepared TFDS data)
  path          the CIFAR-10 JPEG folder or .tar.gz (dataset=cifar10_jpg)
  tfds_data_dir TFDS data dir (TFDS datasets)
  epochs        training epochs (default 500 [inferred]; the paper's schedule was not recovered)
  seed

Recipe (`jaxad.config.anomem_base`): CIFAR ResNet-18 with Hopfield memories after layer2,
layer3 and layer4; 256 images per step x 2 SimCLR views, NT-Xent tau 0.5 + VICReg variance
term + memory pull; CSI's LARS (lr 0.1, x10 warm-up over 10 epochs, cosine). Scores: the
inverse-std-normalised sum of the per-scale mean deviations (`anomem`), and the anomaly map.
"""
import os

from jaxad import config as jc
from jaxad.errors import ConfigError

DEFAULT_JPG = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data',
                           'cifar10-jpg.tar.gz')
TFDS = {'cifar10': 'label', 'cifar100': 'coarse_label', 'svhn_cropped': 'label'}


def set_cifar_data(c, arg):
    """config.data from the dataset / path / tfds_data_dir arguments (as configs/csi_cifar.py)."""
    c.data.image_size = 32
    if arg.dataset == 'cifar10_jpg':
        c.data.source = 'folder'
        c.data.path = arg.path or os.path.abspath(DEFAULT_JPG)
    elif arg.dataset in TFDS:
        c.data.source = 'tfds'  # cifar100: the 20 coarse superclasses
        c.data.tfds_name = arg.dataset
        c.data.tfds_data_dir = arg.tfds_data_dir
        c.data.label_key = TFDS[arg.dataset]
    else:
        raise ConfigError(f'unknown dataset {arg.dataset!r}; choose cifar10_jpg, '
                          + ', '.join(TFDS))


def get_config(arg=None):
    arg = jc.parse_arg(arg, normal_class='0', dataset='cifar10_jpg', path='',
                       tfds_data_dir='', epochs=500, seed=0)
    c = jc.anomem_base()
    c.seed = arg.seed
    c.optim.epochs = arg.epochs
    jc.set_normal_classes(c, arg.normal_class)
    set_cifar_data(c, arg)
    return c
