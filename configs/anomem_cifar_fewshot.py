"""AnoMem in the few-anomaly (outlier-exposure) setting on CIFAR (docs/methods.md §7, inferred).

python -m jaxad.main --config=configs/anomem_cifar_fewshot.py:normal_class=0,num_anomalies=10 \
    --workdir=/tmp/anomem_c10_0_few10

The one-class recipe of configs/anomem_cifar.py plus `num_anomalies` labelled anomalies: a
seeded subset (seed = `seed`) of the OTHER classes' training images (oe.source=other_classes,
oe.max_images=num_anomalies). That exposes the test anomalies' classes (the paper's
"unbalanced" protocol, not one-class). A small CNN on the stop-gradient deviation maps is
trained with BCE, normal vs those anomalies, jointly with the memory; its logit
('classifier') is the headline score.

Arguments: those of configs/anomem_cifar.py, plus num_anomalies (default 10, > 0) and
hinge (default 0.0: the weight of the anomalies' deviation hinge on the memory).
"""
from jaxad import config as jc
from jaxad.errors import ConfigError

# Loaded by path (not `from configs import ...`): works from any working directory.
recipes = jc.config_module(__file__, 'recipes')
csi_cifar = jc.config_module(__file__, 'csi_cifar')


def get_config(arg=None):
    arg = jc.parse_arg(arg, normal_class='0', dataset='', path='',
                       tfds_data_dir='', epochs=500, seed=0, num_anomalies=10, hinge=0.0)
    if arg.num_anomalies <= 0:
        raise ConfigError(f'num_anomalies must be > 0, got {arg.num_anomalies}')
    c = recipes.anomem_base()
    c.seed = arg.seed
    c.optim.epochs = arg.epochs
    jc.set_normal_classes(c, arg.normal_class)
    csi_cifar.set_cifar_data(c, arg, 'configs/anomem_cifar_fewshot.py')
    c.anomem.few_anomalies = True
    c.anomem.hinge_weight = float(arg.hinge)
    c.oe.source = 'other_classes'
    c.oe.max_images = int(arg.num_anomalies)
    return c
