"""The scaling study at CPU size: CSI on scikit-learn digits, a few steps per run.

python launch/sweep.py --config=configs/scaling_tiny.py --root=/tmp/study_tiny --format=run

What `colabs/scaling_study.ipynb` and the tests run when there is no
accelerator: the same pipeline as configs/scaling_cifar.py (sweep, JSONL
metrics, results.json, collect, plot) in about a minute, with numbers that
mean nothing (6 steps of a width-8 ResNet-10 on 8x8 digits, their own size: one block per
stage, half ResNet-18's compile time, which is most of a CPU run). Global batch
16, 32, 64 (divisible by 1, 2, 4 or 8 devices), one seed.
"""
from jaxad import config as jc

BATCH_SIZES = [16, 32, 64]
SEEDS = [0]


def get_config(arg=None):
    arg = jc.parse_arg(arg, normal_class='0', steps=6, seed=0)
    c = jc.csi_base()
    c.seed = arg.seed
    c.data.source = 'digits'
    c.data.image_size = 8
    jc.set_normal_classes(c, arg.normal_class)
    c.model.name = 'resnet10'
    c.model.width = 8
    c.model.proj_dim = 32
    c.batch_size = 32
    c.total_steps = arg.steps
    c.log_every = 2  # steps 2, 4, 6: the first (with compilation) is skipped by collect
    c.optim.warmup_epochs = 1
    c.optim.epochs = 1
    if 'lr_rule' in c.optim:
        c.optim.lr_rule = 'sqrt'
        c.optim.lr_base_batch = 32
    c.eval.batch_size = 128
    c.eval.num_samples = 1
    c.checkpoint.every_steps = 1000  # only the final checkpoint
    c.checkpoint.use_async = False
    return c


def get_sweep(arg=None):
    del arg
    return {'batch_size': BATCH_SIZES, 'seed': SEEDS}
