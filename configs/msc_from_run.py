"""MSC fine-tuning of the encoder of a finished jaxad run (e.g. a CSI run): no ImageNet needed.

python -m jaxad.main --config=configs/csi_fmnist.py:normal_class=0 --workdir=/tmp/csi_fm0
python -m jaxad.main --config=configs/msc_from_run.py:run=/tmp/csi_fm0 --workdir=/tmp/msc_fm0

There is no data= argument: the run's config gives the data set, normal class and encoder
architecture (a one-class table run is refused: point run= at a single-class run); its latest
checkpoint gives the encoder weights and BatchNorm statistics (`model.init_from=run`).
The centre is computed from that encoder before the first step; BN stays frozen.
Arguments: run (workdir), epochs, lr, angular, blur (probability), seed.
"""
from jaxad import config as jc
from jaxad.errors import ConfigError

# Loaded by path (not `from configs import ...`): works from any working directory.
recipes = jc.config_module(__file__, 'recipes')


def get_config(arg=None):
    arg = jc.parse_arg(arg, run='', epochs=20, lr=1e-5, angular=False, blur=0.0, seed=0)
    if not arg.run:
        raise ConfigError('configs/msc_from_run.py needs run=WORKDIR of a finished jaxad run')
    base = jc.load_run_config(arg.run)
    c = recipes.msc_base()
    c.seed = arg.seed
    c.data = base.data
    c.table.classes = ''
    if base.table.classes:
        raise ConfigError(f'{arg.run} is a one-class table; point run= at a single-class run')
    for key in ('name', 'stem', 'width', 'input_norm', 'dtype', 'conv_impl'):
        c.model[key] = base.model[key]
    c.model.init_from = arg.run
    c.msc.angular = arg.angular
    # Small images: the MoCo-v2 blur (sigma up to 2 px) would erase a 28-32 px image.
    c.msc.blur_p = arg.blur
    c.msc.eval_center_crop = 1.0  # the run's own resolution, no crop
    c.optim.lr = arg.lr
    c.optim.epochs = arg.epochs
    return c
