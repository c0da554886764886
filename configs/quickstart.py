"""CSI on scikit-learn's bundled digits: no download, a few minutes on 2 CPU cores.

python -m jaxad.main --config=configs/quickstart.py --workdir=/tmp/jaxad_quickstart
python -m jaxad.main --config=configs/quickstart.py:normal_class=3 --workdir=/tmp/qs3
python -m jaxad.main --config=configs/quickstart.py:normal_class=all --workdir=/tmp/qs_all

One-class: train on the digit `normal_class`, test on the whole held-out half
(label 1 = any other digit). A tiny ResNet-18 (width 16) on 16x16 images.
"""
from jaxad import config as jc


def get_config(arg=None):
    arg = jc.parse_arg(arg, normal_class='0', epochs=150, seed=0)
    c = jc.csi_base()
    c.seed = arg.seed
    c.data.source = 'digits'
    c.data.image_size = 16
    jc.set_normal_classes(c, arg.normal_class)
    c.model.width = 16
    c.batch_size = 32
    c.log_every = 25
    c.optim.warmup_epochs = 10
    c.optim.epochs = arg.epochs  # ~90 images per digit: 2 steps per epoch
    c.eval.batch_size = 128
    c.eval.num_samples = 4
    c.checkpoint.every_steps = 100
    return c
