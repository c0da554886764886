"""Helpers several methods share, in one neutral module: no method module imports another
method module (tests/test_structure.py), only `jaxad.methods.base` (the contract) and this.

Nothing outside jaxad/methods/ reads these; they are not part of the method contract
(docs/architecture.md §3).
"""
import jax
import jax.numpy as jnp

from jaxad.data import augment
from jaxad.errors import TrainingError

# CIFAR-10's class names in label order: how `paper_one_class` recognises the data set, from
# any source.
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                   'ship', 'truck')


def augment_kwargs(aug_cfg, crop_scale):
    """Keyword arguments of `augment.simclr_augment` from `config.augment`."""
    return dict(crop_scale=tuple(crop_scale), crop_ratio=tuple(aug_cfg.crop_ratio),
                brightness=aug_cfg.brightness, contrast=aug_cfg.contrast,
                saturation=aug_cfg.saturation, hue=aug_cfg.hue,
                jitter_p=aug_cfg.jitter_p, gray_p=aug_cfg.gray_p)


def require_budget(method, what):
    """`method`'s step budget, or TrainingError naming `what` needs it (a method built only to
    score has none: `Method(config, budget=None)`)."""
    if method.budget is None:
        raise TrainingError(
            f'{type(method).__name__}: {what} is unknown: this method object was built '
            'without a step budget (the trainer configures it: '
            'get_method(config, budget=StepBudget(steps_per_epoch, total_steps)))')
    return method.budget


def augment_view(key, image, aug_kwargs, flip_p=0.5):
    """One SimCLR view of a float image: random h-flip, then CSI's jitter/grey/crop.

    torchvision's order (crop, flip, jitter, grey) differs; flip commutes with the
    colour ops and the crop distribution is mirror-symmetric, so the views agree in
    distribution.
    """
    flip_key, aug_key = jax.random.split(key)
    return augment.simclr_augment(aug_key, augment.random_hflip(flip_key, image, flip_p),
                                  **aug_kwargs)


def train_views(key, images, rotations, aug_kwargs, flip_p=0.5, grey=False):
    """OECL's training views (AnoMem's with rotations (0,)): uint8 (B, H, W, C) ->
    float32 (2 * R * B, H, W, C), rows (view, rotation, image).

    Each image's two views are drawn from a key folded with its position in the global
    batch; a view's rotations share its augmentation (rotated after augmenting). grey:
    convert the (RGB) images to grey first (oecl.oe_grayscale: colour OE, grey data).
    """
    def one_image(image_key, image):
        x = augment.to_float(image)
        if grey:
            x = augment.grayscale(x)

        def one_view(view_key):
            v = augment_view(view_key, x, aug_kwargs, flip_p)
            return jnp.stack([augment.rot90(v, int(k)) for k in rotations])
        return jax.vmap(one_view)(jax.random.split(image_key, 2))  # (2, R, H, W, C)

    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
    views = jax.vmap(one_image)(keys, images)  # (B, 2, R, H, W, C)
    views = jnp.moveaxis(views, 0, 2)  # (2, R, B, H, W, C)
    return views.reshape((-1,) + views.shape[3:])
