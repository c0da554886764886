"""ReContrast on one MVTec-AD category with the paper's settings (docs/methods.md §5.3).

python -m jaxad.models.convert --in wide_resnet50_2-95faca4d.pth --out /data/wrn50_2
python -m jaxad.main --config=configs/recontrast_mvtec.py:category=bottle,path=/data/mvtec,weights=/data/wrn50_2 \
    --workdir=/tmp/recontrast_bottle

WideResNet-50-2 encoder (ImageNet weights from `weights`, a converted DIR; '' starts from
random weights, far from the paper), 256 px, batch 16, 2000 iterations, AdamW 2e-3
(bottleneck + decoder) and 1e-5 (encoder), seed 111 as the code. The encoder BN mode is
the code's per-category choice (eval for toothbrush, leather, grid, tile, wood, screw; train
for the rest) unless encoder_bn=train|eval. Image score: max of the map (max_ratio=0.01:
mean of the top 1%, the multi-class script's). Writes pixel_AUROC, AUPRO, image_AUROC and
image_F1max to results.json and overlay PNGs under WORKDIR/plots/overlays.

The synthetic MVTec-style set (no download, learnable from scratch):
python -m jaxad.data.synthetic --out /tmp/synth --size 64
python -m jaxad.main --config=configs/recontrast_mvtec.py:path=/tmp/synth,category=weave,size=64,arch=resnet18,steps=300 \
    --workdir=/tmp/recontrast_synth

Arguments: category, path (MVTec root), weights, arch (wide_resnet50_2 | resnet18 |
resnet50 | ...), size (256), steps (2000), batch_size (16), encoder_bn (auto | train |
eval), max_ratio (0), factor (0), width (64), stem (imagenet | cifar), seed (111).
"""
from jaxad import config as jc
from jaxad.errors import ConfigError

# Loaded by path (not `from configs import ...`): works from any working directory.
recipes = jc.config_module(__file__, 'recipes')


def get_config(arg=None):
    arg = jc.parse_arg(arg, category='bottle', path='', weights='', arch='wide_resnet50_2',
                       size=256, steps=2000, batch_size=16, encoder_bn='auto', max_ratio=0.0,
                       factor=0.0, width=64, stem='imagenet', seed=111)
    if not arg.path:
        raise ConfigError('configs/recontrast_mvtec.py needs path=<MVTec-AD root> (the folder '
                          'holding bottle/, cable/, ...) and category=<name>')
    if arg.encoder_bn not in ('auto', 'train', 'eval'):
        raise ConfigError(f'encoder_bn must be auto, train or eval, got {arg.encoder_bn!r}')
    c = recipes.recontrast_base()
    c.seed = arg.seed
    c.data.source = 'mvtec'
    c.data.path = arg.path
    c.data.category = arg.category
    c.data.image_size = arg.size
    c.model.name = arg.arch
    c.model.width = arg.width
    c.model.stem = arg.stem  # 'cifar': taps at full, 1/2 and 1/4 resolution (small images)
    c.model.init_from = arg.weights
    eval_bn = (arg.category in recipes.EVAL_BN_CATEGORIES['mvtec'] if arg.encoder_bn == 'auto'
               else arg.encoder_bn == 'eval')
    c.model.bn_mode = 'frozen' if eval_bn else 'batch'
    c.batch_size = arg.batch_size
    c.total_steps = arg.steps
    c.recontrast.max_ratio = arg.max_ratio
    c.recontrast.factor = arg.factor
    return c
