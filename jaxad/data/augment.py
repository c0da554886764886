"""On-device SimCLR augmentation with CSI's semantics (docs/methods.md §1.2, §2.3).

Every function works on ONE float32 image (H, W, C) in [0, 1] with its own
PRNG key, so callers draw per-sample parameters with
`jax.vmap(fn)(jax.random.split(key, n), images)`. Everything is pure
`jax.numpy` and jittable. Arithmetic is elementwise (no matmul), so results
do not depend on the accelerator's default matmul precision.

The layers mirror alinlab/CSI `models/transform_layers.py`:
ColorJitterLayer -> RandomColorGrayLayer -> RandomResizedCropLayer, the crop
being an affine `grid_sample` (bilinear, reflection padding,
align_corners=False) written out by hand below.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def to_float(images_uint8):
    """uint8 pixels -> float32 in [0, 1]."""
    return jnp.asarray(images_uint8, jnp.float32) / 255.0


def rot90(image, k):
    """Rotate by k * 90 degrees in the (H, W) plane, as np.rot90(image, k, axes=(0, 1)).

    This is torch.rot90(x, k, (2, 3)) on NCHW. `k` may be traced; a traced k
    needs a square image because the four branches must share one shape.
    """
    if isinstance(k, (int, np.integer)):
        return jnp.rot90(image, int(k), axes=(0, 1))
    if image.shape[0] != image.shape[1]:
        raise ValueError(
            f'rot90 with a traced k needs a square image, got shape {image.shape}')
    branches = [functools.partial(jnp.rot90, k=i, axes=(0, 1)) for i in range(4)]
    return jax.lax.switch(jnp.mod(k, 4), branches, image)


def hflip(image):
    """Mirror left-right (CSI's HorizontalFlipLayer with sign -1 is exactly this)."""
    return image[:, ::-1]


def random_hflip(key, image, p=0.5):
    """Mirror left-right with probability p."""
    return jnp.where(jax.random.bernoulli(key, p), hflip(image), image)


def rgb_to_hsv(rgb):
    """RGB (..., 3) -> HSV (..., 3) with CSI's atan2 hue.

    The atan2 hue differs from the hexcone hue by up to ~1.2 degrees away
    from multiples of 30 degrees, so `hsv_to_rgb(rgb_to_hsv(x))` is only
    close to x (within ~0.02); CSI's colour jitter inherits this.
    Undefined values (s for black pixels) are set to 0, as in CSI.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    c_max = jnp.max(rgb, axis=-1)
    c_min = jnp.min(rgb, axis=-1)
    hue = jnp.arctan2(math.sqrt(3.0) * (g - b), 2.0 * r - g - b)
    hue = jnp.mod(hue, 2.0 * math.pi) / (2.0 * math.pi)
    hsv = jnp.stack([hue, (c_max - c_min) / c_max, c_max], axis=-1)
    return jnp.where(jnp.isfinite(hsv), hsv, 0.0)


def hsv_to_rgb(hsv):
    """HSV (..., 3) -> RGB (..., 3), the hexcone formula used by CSI."""
    h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
    k = jnp.mod(jnp.array([5.0, 3.0, 1.0], hsv.dtype) + 6.0 * h, 6.0)
    t = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
    return v - v * s * t


def adjust_contrast(image, factor):
    """(x - per-channel spatial mean) * factor + mean, clamped to [0, 1].

    CSI uses the per-channel mean, not torchvision's grayscale mean.
    """
    mean = jnp.mean(image, axis=(0, 1), keepdims=True)
    return jnp.clip((image - mean) * factor + mean, 0.0, 1.0)


def adjust_hsv(image, hue_shift, sat_factor, val_factor):
    """Shift hue and scale saturation and value in HSV space (CSI's RandomHSVFunction).

    `hue_shift` is in CSI's units: the hue moves by hue_shift * 255 / 360 of
    the circle (a CSI quirk that we keep).
    """
    hsv = rgb_to_hsv(image)
    hue = jnp.mod(hsv[..., 0] + hue_shift * 255.0 / 360.0, 1.0)
    hsv = jnp.stack([hue, hsv[..., 1] * sat_factor, hsv[..., 2] * val_factor], axis=-1)
    return hsv_to_rgb(jnp.clip(hsv, 0.0, 1.0))


def adjust_color(image, contrast_factor, hue_shift, sat_factor, val_factor, contrast_first):
    """The deterministic core of `color_jitter`: contrast and HSV adjustment in either order.

    `contrast_first` may be a traced bool. Identity parameters (1, 0, 1, 1)
    give the HSV round trip of the image, not the image itself (see
    `rgb_to_hsv`).
    """
    def contrast_then_hsv(x):
        return adjust_hsv(adjust_contrast(x, contrast_factor), hue_shift, sat_factor, val_factor)

    def hsv_then_contrast(x):
        return adjust_contrast(adjust_hsv(x, hue_shift, sat_factor, val_factor), contrast_factor)

    return jax.lax.cond(contrast_first, contrast_then_hsv, hsv_then_contrast, image)


def _factor_range(value, name):
    """torchvision/CSI range [max(1 - value, 0), 1 + value] of a multiplicative factor."""
    if value < 0:
        raise ValueError(f'{name} must be non-negative, got {value}')
    return max(1.0 - value, 0.0), 1.0 + value


def color_jitter(key, image, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8):
    """CSI's ColorJitterLayer on one image: with probability p adjust colours, else identity.

    Factors: contrast ~ U(1-c, 1+c), value (brightness) ~ U(1-b, 1+b),
    saturation ~ U(1-s, 1+s) (lower ends clipped at 0), hue shift
    ~ U(-hue, hue) in CSI's units (see `adjust_hsv`). CSI picks the order of
    the contrast and HSV steps once per batch; here each sample draws its own
    order, which has the same marginal distribution per image. The strengths
    are static Python floats.
    """
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f'hue must be in [0, 0.5], got {hue}')
    keys = jax.random.split(key, 6)
    c_lo, c_hi = _factor_range(contrast, 'contrast')
    s_lo, s_hi = _factor_range(saturation, 'saturation')
    v_lo, v_hi = _factor_range(brightness, 'brightness')
    jittered = adjust_color(
        image,
        contrast_factor=jax.random.uniform(keys[0], minval=c_lo, maxval=c_hi),
        hue_shift=jax.random.uniform(keys[1], minval=-hue, maxval=hue),
        sat_factor=jax.random.uniform(keys[2], minval=s_lo, maxval=s_hi),
        val_factor=jax.random.uniform(keys[3], minval=v_lo, maxval=v_hi),
        contrast_first=jax.random.bernoulli(keys[4]))
    return jnp.where(jax.random.bernoulli(keys[5], p), jittered, image)


def grayscale(image):
    """Luma 0.299 R + 0.587 G + 0.114 B, repeated to 3 channels."""
    luma = sum(w * image[..., i] for i, w in enumerate(_GRAY_WEIGHTS))
    return jnp.stack([luma] * 3, axis=-1)


def random_grayscale(key, image, p=0.2):
    """CSI's RandomColorGrayLayer: grayscale with probability p."""
    return jnp.where(jax.random.bernoulli(key, p), grayscale(image), image)


def affine_grid(theta, height, width):
    """torch.nn.functional.affine_grid for one (2, 3) theta, align_corners=False.

    Returns (height, width, 2) normalised (x, y) sampling positions: output
    pixel centres at (2j + 1) / W - 1 mapped through theta.
    """
    xs = (2.0 * jnp.arange(width, dtype=jnp.float32) + 1.0) / width - 1.0
    ys = (2.0 * jnp.arange(height, dtype=jnp.float32) + 1.0) / height - 1.0
    xs, ys = xs[None, :], ys[:, None]
    gx = theta[0, 0] * xs + theta[0, 1] * ys + theta[0, 2]
    gy = theta[1, 0] * xs + theta[1, 1] * ys + theta[1, 2]
    return jnp.stack([gx, gy], axis=-1)


def _reflect_and_clip(coord, size):
    """Pixel coordinate reflected about [-0.5, size - 0.5], then clipped to [0, size - 1].

    torch's reflection padding for align_corners=False (reflect_coordinates
    with twice_low=-1, twice_high=2*size-1, then clip_coordinates).
    """
    dist = jnp.abs(coord + 0.5)
    extra = jnp.mod(dist, size)
    even_flips = jnp.mod(jnp.floor(dist / size), 2.0) == 0.0
    reflected = jnp.where(even_flips, extra - 0.5, size - extra - 0.5)
    return jnp.clip(reflected, 0.0, size - 1.0)


def grid_sample(image, grid):
    """torch grid_sample(bilinear, padding_mode='reflection', align_corners=False) for one image.

    image (H, W, C); grid (Ho, Wo, 2) of normalised (x, y) in the torch
    convention. Returns (Ho, Wo, C). map_coordinates(mode='mirror') is not
    a substitute: it reflects about pixel centres, not pixel edges.
    """
    height, width = image.shape[:2]
    ix = _reflect_and_clip(((grid[..., 0] + 1.0) * width - 1.0) / 2.0, width)
    iy = _reflect_and_clip(((grid[..., 1] + 1.0) * height - 1.0) / 2.0, height)
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    wx, wy = (ix - x0)[..., None], (iy - y0)[..., None]
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    # After clipping, x0 + 1 can only leave the image when its weight is 0.
    x1, y1 = jnp.minimum(x0 + 1, width - 1), jnp.minimum(y0 + 1, height - 1)
    return ((image[y0, x0] * (1.0 - wx) + image[y0, x1] * wx) * (1.0 - wy)
            + (image[y1, x0] * (1.0 - wx) + image[y1, x1] * wx) * wy)


def sample_crop_params(key, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                       num_tries=10):
    """CSI's RandomResizedCropLayer._sample_latent for one image -> (w_frac, h_frac, bx, by).

    Draws `num_tries` (area, log-ratio) pairs, w = round(sqrt(area * r)),
    h = round(sqrt(area / r)) in pixels, keeps the first that fits, else the
    full image; bias = randint(w - W, W - w + 1) / W (likewise for y), which
    keeps the crop inside the image. CSI pools the 10 * N tries of a batch;
    here each sample has its own tries. CSI also swaps H and W in the
    bookkeeping, which only matters for non-square images; we do not.
    """
    keys = jax.random.split(key, 4)
    target_area = jax.random.uniform(
        keys[0], (num_tries,), minval=scale[0], maxval=scale[1]) * (height * width)
    aspect = jnp.exp(jax.random.uniform(
        keys[1], (num_tries,), minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
    w = jnp.round(jnp.sqrt(target_area * aspect))
    h = jnp.round(jnp.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(fits)
    w = jnp.where(fits[first], w[first], width).astype(jnp.int32)
    h = jnp.where(fits[first], h[first], height).astype(jnp.int32)
    bx = jax.random.randint(keys[2], (), w - width, width - w + 1)
    by = jax.random.randint(keys[3], (), h - height, height - h + 1)
    return jnp.stack([w / width, h / height, bx / width, by / height]).astype(jnp.float32)


def apply_crop(image, params):
    """Resample `image` on the crop (w_frac, h_frac, bx, by), output the same size.

    theta = [[w_frac, 0, bx], [0, h_frac, by]] in normalised coordinates;
    (1, 1, 0, 0) is the identity. CSI's trailing adaptive_avg_pool2d to the
    input size is a no-op and is left out.
    """
    w_frac, h_frac, bx, by = params[0], params[1], params[2], params[3]
    theta = jnp.array([[w_frac, 0.0, bx], [0.0, h_frac, by]], jnp.float32)
    return grid_sample(image, affine_grid(theta, image.shape[0], image.shape[1]))


def random_resized_crop(key, image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """CSI's RandomResizedCropLayer on one image; scale=(s, s) fixes the area (test time)."""
    params = sample_crop_params(key, image.shape[0], image.shape[1], scale, ratio)
    return apply_crop(image, params)


def simclr_augment(key, image, *, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
                   brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                   jitter_p=0.8, gray_p=0.2):
    """CSI's CIFAR SimCLR augmentation: colour jitter -> grayscale -> resized crop."""
    jitter_key, gray_key, crop_key = jax.random.split(key, 3)
    x = color_jitter(jitter_key, image, brightness, contrast, saturation, hue, jitter_p)
    x = random_grayscale(gray_key, x, gray_p)
    return random_resized_crop(crop_key, x, crop_scale, crop_ratio)


def gaussian_blur(image, sigma, max_sigma=2.0):
    """Separable Gaussian blur of one image with a (traced) standard deviation `sigma` pixels.

    The kernel has a static support of +-ceil(3 * max_sigma) taps, weights
    exp(-x^2 / 2 sigma^2) normalised to sum 1, edge padding. This stands in for the
    MoCo-v2 `ImageFilter.GaussianBlur(radius=sigma)` (PIL's radius is a standard
    deviation); PIL approximates the Gaussian with box filters, so the two agree in
    distribution, not pixel for pixel.
    """
    half = int(math.ceil(3 * max_sigma))
    taps = jnp.arange(-half, half + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * jnp.square(taps / jnp.maximum(sigma, 1e-3)))
    weights = weights / jnp.sum(weights)

    def along(x, axis):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (half, half)
        padded = jnp.pad(x, pad, mode='edge')
        size = x.shape[axis]
        return sum(w * jax.lax.slice_in_dim(padded, i, i + size, axis=axis)
                   for i, w in enumerate(weights))
    return along(along(image, 0), 1)


def random_gaussian_blur(key, image, p=0.5, sigma=(0.1, 2.0)):
    """MoCo-v2's blur: with probability p, sigma ~ U(sigma) (no-op when p == 0)."""
    if p <= 0:
        return image
    apply_key, sigma_key = jax.random.split(key)
    s = jax.random.uniform(sigma_key, (), minval=sigma[0], maxval=sigma[1])
    return jnp.where(jax.random.bernoulli(apply_key, p),
                     gaussian_blur(image, s, max_sigma=sigma[1]), image)


def resize(image, size):
    """Bilinear resize of one image to (size, size) (identity when it already is)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return jax.image.resize(image, (size, size, image.shape[2]), 'bilinear', antialias=False)


def center_crop_resized(image, size, crop_fraction):
    """torchvision Resize(size / crop_fraction) -> CenterCrop(size) on one image."""
    if crop_fraction >= 1.0:
        return resize(image, size)
    big = resize(image, int(round(size / crop_fraction)))
    top = (big.shape[0] - size) // 2
    left = (big.shape[1] - size) // 2
    return big[top:top + size, left:left + size]
