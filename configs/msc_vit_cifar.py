"""MSC on one-class CIFAR-10 with a ViT encoder (DINO or DINOv2 weights): the mean-shifted
loss on the unit class token (docs/methods.md §3, §8).

wget https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth
python -m jaxad.main --config=configs/msc_vit_cifar.py:normal_class=0,weights=dinov2_vits14_pretrain.pth \
    --workdir=/tmp/msc_vit_c0

Arguments: normal_class, weights (a timm, DINO or DINOv2 state dict: .pth, .safetensors or
.npz; its shapes give the architecture), image_size (224; a multiple of the patch size),
epochs, path (CIFAR-10 JPEG archive; default TFDS cifar10), tfds_data_dir, angular, seed.
Everything else is MSC's ResNet recipe (configs/recipes.py, set up as in configs/msc_cifar.py:
SGD, lr 1e-5, 20 epochs), which the paper tuned for ResNet-152, not for a ViT: a starting
point, not a reproduction.
"""
from jaxad import config as jc
from jaxad.errors import ConfigError

# Loaded by path (not `from configs import ...`): works from any working directory.
msc_cifar = jc.config_module(__file__, 'msc_cifar')


def get_config(arg=None):
    arg = jc.parse_arg(arg, normal_class='0', weights='', image_size=224, epochs=20, path='',
                       tfds_data_dir='', angular=False, seed=0)
    if not arg.weights:
        raise ConfigError('configs/msc_vit_cifar.py needs ViT weights: fetch e.g. '
                          'https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/'
                          'dinov2_vits14_pretrain.pth and pass weights=PATH')
    c = msc_cifar.msc_cifar_base(arg, 'configs/msc_vit_cifar.py')
    c.msc.encoder = 'vit'
    c.msc.vit_weights = arg.weights
    c.msc.vit_pos_offset = 0.1  # DINO's and DINOv2's position interpolation
    c.msc.image_size = arg.image_size
    c.msc.eval_center_crop = 1.0
    c.optim.freeze = ()
    return c
