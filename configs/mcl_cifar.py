"""MCL (masked contrastive learning + self-ensemble inference, docs/methods.md §4) on CIFAR-10.

python -m jaxad.main --config=configs/mcl_cifar.py:normal_class=0 --workdir=/tmp/mcl_c10_0
python -m jaxad.main --config=configs/mcl_cifar.py:normal_class=0+1+2+3+4+5+6+7+8+9,ood=tfds:cifar100 \
    --workdir=/tmp/mcl_c10_all   # the code's labelled multi-class setting: CIFAR-10 vs CIFAR-100

Arguments (after ':', comma separated):
  normal_class  int, or ints joined by '+' (labelled multi-class: the joint label is
                class position + mcl.num_classes * rotation); 'all' or a comma list (0,3,5)
                trains the one-class table, one detector per item
  path          the CIFAR-10 JPEG folder or .tar.gz (default: TFDS cifar10, downloaded and
                prepared on first use; see configs/csi_cifar.py)
  tfds_data_dir TFDS data dir (default: TFDS_DATA_DIR or ~/tensorflow_datasets)
  arch          resnet34 (code default) | resnet18 | resnet50 | resnet101
  epochs        training epochs (code config: 400; released checkpoint: 800)
  batch_size    images per step (x 4 rotations x 2 views); code: 256 (its 1024 rotated images)
  sei_views     8 (rotations x flip, code default) or 4 (rotations)
  combine       wa (harmonic mean, code default) | mean | min
  ood           anomalies from another data set's test split (needed when every class is
                normal): tfds:NAME (TFDS, e.g. tfds:cifar100), numpy:FILE.npz, or
                an image folder / .tar.gz with test/<class>/ images
  seed

mcl.num_classes is set to the most normal classes of any detector: the loss only needs
it >= that number (same-class tests are Delta mod num_classes == 0) and the scorer fits
num_classes x 4 Gaussians.
"""
from jaxad import config as jc

# Loaded by path (not `from configs import ...`): works from any working directory.
recipes = jc.config_module(__file__, 'recipes')
csi_cifar = jc.config_module(__file__, 'csi_cifar')


def get_config(arg=None):
    arg = jc.parse_arg(arg, normal_class='0', path='', tfds_data_dir='', arch='resnet34',
                       epochs=400, batch_size=256, sei_views=8, combine='wa', ood='', seed=0)
    c = recipes.mcl_base()
    c.seed = arg.seed
    csi_cifar.set_cifar_data(c, arg, 'configs/mcl_cifar.py')
    jc.set_normal_classes(c, arg.normal_class)
    c.mcl.num_classes = jc.classes_per_detector(arg.normal_class)
    c.mcl.sei_views = arg.sei_views
    c.mcl.combine = arg.combine
    c.model.name = arg.arch
    c.batch_size = arg.batch_size
    c.optim.epochs = arg.epochs
    jc.set_ood(c, arg.ood)
    return c
