"""CSI with the paper's defaults (docs/methods.md §2.4): one-class CIFAR and friends.

python -m jaxad.main --config=configs/csi_cifar.py:normal_class=0 --workdir=/tmp/csi_c10_0

Arguments (after ':', comma separated):
  normal_class  int, or ints joined by '+' (default 0 = airplane); 'all' or a comma
                list (0,3,5) trains the one-class table, one detector per item
  dataset       cifar10_jpg (default: ../shared/data/cifar10-jpg.tar.gz or `path`),
                cifar10 | cifar100 | svhn_cropped (prepared TFDS data)
  path          the CIFAR-10 JPEG folder or .tar.gz (dataset=cifar10_jpg)
  tfds_data_dir TFDS data dir (TFDS datasets)
  epochs        training epochs (paper: 1000)

Paper layout: 128 images per step (32 per GPU x 4 GPUs), each as 4 rotations x
2 views = 1024 embeddings; LARS (torchlars) lr 0.1, momentum 0.9, wd 1e-6,
x10 warm-up over 10 epochs then cosine; tau = 0.5; CIFAR ResNet-18.
"""
import os

from jaxad import config as jc
from jaxad.errors import ConfigError

DEFAULT_JPG = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data',
                           'cifar10-jpg.tar.gz')
TFDS = {'cifar10': 'label', 'cifar100': 'coarse_label', 'svhn_cropped': 'label'}


def set_cifar_data(c, arg):
    """config.data from the dataset / path / tfds_data_dir arguments (shared by the CIFAR
    configs of the other methods)."""
    c.data.image_size = 32
    if arg.dataset == 'cifar10_jpg':
        c.data.source = 'folder'
        c.data.path = arg.path or os.path.abspath(DEFAULT_JPG)
    elif arg.dataset in TFDS:
        # cifar100 uses the 20 coarse superclasses, as in CSI's Table 1(b).
        c.data.source = 'tfds'
        c.data.tfds_name = arg.dataset
        c.data.tfds_data_dir = arg.tfds_data_dir
        c.data.label_key = TFDS[arg.dataset]
    else:
        raise ConfigError(f'unknown dataset {arg.dataset!r}; choose cifar10_jpg, '
                          + ', '.join(TFDS))


def get_config(arg=None):
    arg = jc.parse_arg(arg, normal_class='0', dataset='cifar10_jpg', path='',
                       tfds_data_dir='', epochs=1000, seed=0)
    c = jc.csi_base()
    c.seed = arg.seed
    c.optim.epochs = arg.epochs
    jc.set_normal_classes(c, arg.normal_class)
    set_cifar_data(c, arg)
    return c
