"""kNN on a fixed encoder's features (feature_knn, docs/methods.md §8): no training.

python -m jaxad.main --config=configs/knn_features.py:encoder=pixels,normal_class=3 \
    --workdir=/tmp/knn_pixels_3
python -m jaxad.models.convert --in resnet50-0676ba61.pth --out /data/r50
python -m jaxad.main --config=configs/knn_features.py:encoder=resnet50,weights=/data/r50,dataset=cifar10,normal_class=0 \
    --workdir=/tmp/knn_r50_c0
python -m jaxad.main --config=configs/knn_features.py:encoder=dinov2_vits14,weights=dinov2_vits14_pretrain.pth,dataset=cifar10,normal_class=0 \
    --workdir=/tmp/knn_dinov2_c0

Arguments:
  encoder      pixels (the raw pixels: the raw-pixel 1-NN baseline), a jaxad ResNet name
               (resnet18, resnet50, ..., wide_resnet50_2; ImageNet stem and normalisation,
               images resized to image_size), or a ViT (dino_vits16, dino_vits8, dino_vitb16,
               dinov2_vits14, dinov2_vitb14, dinov2_vitl14, dinov2_vits14_reg: the class token)
  weights      ResNet: a directory written by `python -m jaxad.models.convert` from
               torchvision's ImageNet checkpoint, or a jaxad run; ViT: the .pth file itself;
               `random` runs the pipeline with random weights (tests); required
  dataset      digits (default: scikit-learn's, no download), or a CIFAR config's data
               (cifar10 from TFDS; with path=: the CIFAR-10 JPEG archive)
  k, metric    neighbours (1) and distance (l2 | cosine)
  patch_maps   anomaly maps from each patch feature's distance to the nearest normal patch
               (ResNet stage 3, ViT patch tokens; image score: the map's maximum)
  coreset      fraction of the normal patches kept in the memory bank (greedy k-center)
  image_size   side the ResNet sees (224, ImageNet's; 0 = the data's)
  normal_class, seed
"""
from jaxad import config as jc
from jaxad.errors import ConfigError

csi_cifar = jc.config_module(__file__, 'csi_cifar')
quickstart = jc.config_module(__file__, 'quickstart')

# Where each torchvision ImageNet checkpoint comes from (a machine with internet).
TORCHVISION_WEIGHTS = {
    'resnet18': 'https://download.pytorch.org/models/resnet18-f37072fd.pth',
    'resnet34': 'https://download.pytorch.org/models/resnet34-b627a593.pth',
    'resnet50': 'https://download.pytorch.org/models/resnet50-0676ba61.pth',
    'resnet101': 'https://download.pytorch.org/models/resnet101-63fe2227.pth',
    'resnet152': 'https://download.pytorch.org/models/resnet152-394f9c45.pth',
    'wide_resnet50_2': 'https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth',
}

# ViT checkpoints (timm / DINO / DINOv2 state-dict layout, read by jaxad.models.vit):
# name -> (URL, architecture, patch) for random weights of the same shape.
_DINO, _DINOV2 = 'https://dl.fbaipublicfiles.com/dino/', 'https://dl.fbaipublicfiles.com/dinov2/'
VIT_WEIGHTS = {
    'dino_vits16': (_DINO + 'dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth',
                    'vit_small', 16),
    'dino_vits8': (_DINO + 'dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth',
                   'vit_small', 8),
    'dino_vitb16': (_DINO + 'dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth',
                    'vit_base', 16),
    'dinov2_vits14': (_DINOV2 + 'dinov2_vits14/dinov2_vits14_pretrain.pth', 'vit_small', 14),
    'dinov2_vitb14': (_DINOV2 + 'dinov2_vitb14/dinov2_vitb14_pretrain.pth', 'vit_base', 14),
    'dinov2_vitl14': (_DINOV2 + 'dinov2_vitl14/dinov2_vitl14_pretrain.pth', 'vit_large', 14),
    'dinov2_vits14_reg': (_DINOV2 + 'dinov2_vits14/dinov2_vits14_reg4_pretrain.pth',
                          'vit_small', 14),
}
# DINO's and DINOv2's position interpolation maps coordinates by (grid + 0.1) / grid.
DINO_POS_OFFSET = 0.1


def get_config(arg=None):
    arg = jc.parse_arg(arg, encoder='pixels', weights='', dataset='digits', path='',
                       tfds_data_dir='', normal_class='0', k=1, metric='l2', image_size=224,
                       patch_maps=False, coreset=1.0, seed=0)
    if arg.dataset == 'digits' and not arg.path:
        c = quickstart.get_config(f'normal_class={arg.normal_class}')
    else:
        c = csi_cifar.get_config(
            f'normal_class={arg.normal_class},dataset={arg.dataset}'
            + (f',path={arg.path}' if arg.path else '')
            + (f',tfds_data_dir={arg.tfds_data_dir}' if arg.tfds_data_dir else ''),
            what='configs/knn_features.py')
    c.method = 'feature_knn'
    c.seed = arg.seed
    c.feature_knn.patch_maps, c.feature_knn.coreset = arg.patch_maps, arg.coreset
    c.feature_knn.k, c.feature_knn.metric = arg.k, arg.metric
    if arg.encoder == 'pixels':
        c.feature_knn.encoder = 'pixels'
        return c
    if arg.encoder in VIT_WEIGHTS:
        url, arch, patch = VIT_WEIGHTS[arg.encoder]
        if not arg.weights:
            raise ConfigError(f'configs/knn_features.py: encoder={arg.encoder} needs its '
                              f'weights: fetch {url} and pass weights=PATH (the .pth itself; '
                              'weights=random: random weights, for tests)')
        c.feature_knn.encoder = 'vit'
        c.feature_knn.image_size = arg.image_size
        c.feature_knn.pos_offset = DINO_POS_OFFSET
        if arg.weights == 'random':
            c.feature_knn.vit, c.feature_knn.patch = arch, patch
        else:
            c.feature_knn.weights = arg.weights
        c.eval.num_samples = 1
        return c
    if arg.encoder not in TORCHVISION_WEIGHTS:
        raise ConfigError(f'configs/knn_features.py: unknown encoder {arg.encoder!r}; choose '
                          f'pixels or one of {", ".join(list(TORCHVISION_WEIGHTS) + list(VIT_WEIGHTS))}')
    if not arg.weights:
        raise ConfigError(
            f'configs/knn_features.py: encoder={arg.encoder} needs its ImageNet weights: fetch '
            f'{TORCHVISION_WEIGHTS[arg.encoder]}, convert it with `python -m '
            f'jaxad.models.convert --in {TORCHVISION_WEIGHTS[arg.encoder].rsplit("/", 1)[1]} '
            '--out DIR` and pass weights=DIR (weights=random: random weights, for tests)')
    c.feature_knn.encoder = 'resnet'
    c.feature_knn.image_size = arg.image_size
    c.model.name = arg.encoder
    c.model.stem = 'imagenet'
    c.model.input_norm = 'imagenet'
    c.model.proj_dim = 0
    c.model.bn_mode = 'frozen'
    c.model.init_from = '' if arg.weights == 'random' else arg.weights
    c.eval.num_samples = 1
    return c
