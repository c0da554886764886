"""CSI on one-class Fashion-MNIST (Debian's dataset-fashion-mnist IDX files).

apt-get install -y dataset-fashion-mnist
python -m jaxad.main --config=configs/csi_fmnist.py:normal_class=0 --workdir=/tmp/csi_fm0

28x28 grayscale, repeated to 3 channels so the SimCLR colour augmentations
and the CIFAR ResNet-18 apply unchanged (colour jitter then acts on
brightness/contrast only). Arguments: normal_class (an index, 'all' or a comma list
for the one-class table), epochs, width, path, seed.
"""
from jaxad import config as jc


def get_config(arg=None):
    arg = jc.parse_arg(arg, normal_class='0', epochs=100, width=64,
                       path='/usr/share/datasets/fashion-mnist', seed=0)
    c = jc.csi_base()
    c.seed = arg.seed
    c.data.source = 'fashion_mnist'
    c.data.path = arg.path
    c.data.image_size = 28
    jc.set_normal_classes(c, arg.normal_class)
    c.model.width = arg.width
    c.optim.epochs = arg.epochs
    return c

