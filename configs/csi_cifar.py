"""CSI with the paper's defaults (docs/methods.md §2.4): one-class CIFAR and friends.

python -m jaxad.main --config=configs/csi_cifar.py:normal_class=0 --workdir=/tmp/csi_c10_0

Arguments (after ':', comma separated):
  normal_class  int, or ints joined by '+' (default 0 = airplane); 'all' or a comma
                list (0,3,5) trains the one-class table, one detector per item
  dataset       cifar10 (the default without `path`) | cifar100 | svhn_cropped: TFDS data,
                downloaded and prepared on first use; cifar10_jpg (the default with `path`)
  path          the CIFAR-10 JPEG folder or .tar.gz (train/<class>/, test/<class>/)
  tfds_data_dir TFDS data dir (default: TFDS_DATA_DIR or ~/tensorflow_datasets)
  epochs        training epochs (paper: 1000)

Paper layout: 128 images per step (32 per GPU x 4 GPUs), each as 4 rotations x
2 views = 1024 embeddings; LARS (torchlars) lr 0.1, momentum 0.9, wd 1e-6,
x10 warm-up over 10 epochs then cosine; tau = 0.5; CIFAR ResNet-18.

Data: without `path`, CIFAR-10 is TFDS's `cifar10`, downloaded (163 MiB) and prepared as
ArrayRecord into tfds_data_dir on the first run, as `tfds.load` does. tensorflow-datasets
(`pip install -e '.[tfds]'`) cannot prepare it without TensorFlow (its cifar builder
extracts, reads and PNG-encodes with TF: jaxad/data/sources.py, `_download_and_prepare`),
so the first run also needs `pip install tensorflow`; later runs read the prepared files
without it. Offline, or without TFDS, give the CIFAR-10 JPEG archive as `path=`. Where
any of this is missing, the run stops with one line saying what to run.
"""
from jaxad import config as jc
from jaxad.errors import ConfigError

TFDS = {'cifar10': 'label', 'cifar100': 'coarse_label', 'svhn_cropped': 'label'}


def set_cifar_data(c, arg, what='configs/csi_cifar.py'):
    """config.data from the dataset / path / tfds_data_dir arguments (shared by the CIFAR
    configs of the other methods; those without a `dataset` argument read CIFAR-10).

    dataset '' (the default): cifar10_jpg when `path` is given, else TFDS cifar10. Nothing
    points outside the repository: the JPEG archive is only read from `path`. `what` is the
    config file named in the error message's alternative.
    """
    c.data.image_size = 32
    dataset = arg.get('dataset', '') or ('cifar10_jpg' if arg.path else 'cifar10')
    if dataset == 'cifar10_jpg':
        if not arg.path:
            raise ConfigError(f'{what}: dataset=cifar10_jpg needs path=/path/to/'
                              'cifar10-jpg.tar.gz (a folder or .tar.gz of train/<class>/ and '
                              'test/<class>/ images); without path, CIFAR-10 comes from TFDS')
        c.data.source = 'folder'
        c.data.path = arg.path
    elif dataset in TFDS:
        if arg.path:
            raise ConfigError(f'{what}: path={arg.path} is the CIFAR-10 JPEG folder or '
                              f'archive (dataset=cifar10_jpg), but dataset={dataset} reads '
                              'TFDS: drop path, or set tfds_data_dir for the TFDS data dir')
        # cifar100 uses the 20 coarse superclasses, as in CSI's Table 1(b).
        c.data.source = 'tfds'
        c.data.tfds_name = dataset
        c.data.tfds_data_dir = arg.tfds_data_dir
        c.data.label_key = TFDS[dataset]
        c.data.tfds_download = True  # first use downloads and prepares it (tfds.load's way)
        if dataset == 'cifar10':
            c.data.tfds_alternative = ('give the CIFAR-10 JPEG archive instead: '
                                       f'--config={what}:path=/path/to/cifar10-jpg.tar.gz')
    else:
        raise ConfigError(f'unknown dataset {dataset!r}; choose cifar10_jpg, '
                          + ', '.join(TFDS))


def get_config(arg=None, what='configs/csi_cifar.py'):
    arg = jc.parse_arg(arg, normal_class='0', dataset='', path='',
                       tfds_data_dir='', epochs=1000, seed=0)
    c = jc.csi_base()
    c.seed = arg.seed
    c.optim.epochs = arg.epochs
    jc.set_normal_classes(c, arg.normal_class)
    set_cifar_data(c, arg, what)
    return c
