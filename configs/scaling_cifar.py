"""CSI on one-class CIFAR-10 at large global batch: the scaling study's config and sweep.

python launch/sweep.py --config=configs/scaling_cifar.py --root=runs/scaling --format=commands
python launch/sweep.py --config=configs/scaling_cifar.py:epochs=200 --root=runs/scaling \
    --format=slurm_array > sweep.sbatch && sbatch sweep.sbatch
python -m jaxad.main --config=configs/scaling_cifar.py --config.batch_size=1024 --workdir=/tmp/s1k

`get_config` is configs/csi_cifar.py (same arguments: normal_class, dataset,
path, tfds_data_dir, epochs, seed) with what a batch-size study needs: the
learning rate scaled from the paper's setting (0.1 at 128 images per step)
by `optim.lr_rule`, a fixed epoch budget (so larger batches take fewer
steps) and more frequent logging so even short runs give several
throughput points. `get_sweep`: global batch 256..4096 x lr rule
(linear, sqrt) x 3 seeds = 30 runs; `--axis` on launch/sweep.py replaces it.
"""
import importlib.util
import os

# configs/csi_cifar.py, loaded by path so this file loads from any working directory.
_spec = importlib.util.spec_from_file_location(
    '_jaxad_cfg_csi_cifar', os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         'csi_cifar.py'))
_csi_cifar = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_csi_cifar)

BATCH_SIZES = [256, 512, 1024, 2048, 4096]
LR_RULES = ['linear', 'sqrt']
SEEDS = [0, 1, 2]


def get_config(arg=None):
    c = _csi_cifar.get_config(arg, what='configs/scaling_cifar.py')
    c.batch_size = 256
    c.log_every = 10
    c.checkpoint.every_steps = 500
    if 'lr_rule' in c.optim:  # the large-batch knobs of jaxad.optim
        c.optim.lr_rule = 'linear'
        c.optim.lr_base_batch = 128  # the paper's 0.1 at 128 images per step
    return c


def get_sweep(arg=None):
    axes = {'batch_size': BATCH_SIZES}
    if 'lr_rule' in get_config(arg).optim:
        axes['optim.lr_rule'] = LR_RULES
    axes['seed'] = SEEDS
    return axes
