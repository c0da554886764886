"""Tests of jaxad.data.augment against NumPy references and CSI's formulas."""
import colorsys
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad.data import augment as A
from tests.helpers import import_torch


def _image(seed, shape=(12, 12, 3)):
    return jax.random.uniform(jax.random.PRNGKey(seed), shape, jnp.float32)


def _ref_reflect(coord, size):
    """Reflect about the pixel edges -0.5 and size - 0.5 until inside, then clip."""
    lo, hi = -0.5, size - 0.5
    while coord < lo or coord > hi:
        coord = 2 * lo - coord if coord < lo else 2 * hi - coord
    return min(max(coord, 0.0), size - 1.0)


def _ref_affine_sample(image, theta):
    """NumPy torch grid_sample(affine_grid(theta)), bilinear, reflection, align_corners=False."""
    image = np.asarray(image, np.float64)
    theta = np.asarray(theta, np.float64)
    height, width, _ = image.shape
    out = np.zeros_like(image)
    for i in range(height):
        for j in range(width):
            base = np.array([(2 * j + 1) / width - 1, (2 * i + 1) / height - 1, 1.0])
            gx, gy = theta @ base
            x = _ref_reflect(((gx + 1) * width - 1) / 2, width)
            y = _ref_reflect(((gy + 1) * height - 1) / 2, height)
            x0, y0 = math.floor(x), math.floor(y)
            for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                    if yy < height and xx < width:  # torch skips out-of-range corners
                        out[i, j] += wy * wx * image[yy, xx]
    return out


def _crop_theta(params):
    w, h, bx, by = params
    return np.array([[w, 0, bx], [0, h, by]])


# --- simclr_augment end to end ---------------------------------------------

def test_simclr_augment_batch_jit_vmap():
    images = jax.random.uniform(jax.random.PRNGKey(0), (8, 16, 16, 3))
    fn = jax.jit(jax.vmap(A.simclr_augment))
    keys = jax.random.split(jax.random.PRNGKey(1), 8)
    out = fn(keys, images)
    assert out.shape == images.shape and out.dtype == jnp.float32
    assert float(out.min()) >= -1e-6 and float(out.max()) <= 1 + 1e-6
    np.testing.assert_array_equal(out, fn(keys, images))
    other = fn(jax.random.split(jax.random.PRNGKey(2), 8), images)
    assert np.all(np.abs(np.asarray(other - out)).max(axis=(1, 2, 3)) > 1e-3)
    # One image, eight keys: eight distinct views.
    same = fn(keys, jnp.broadcast_to(images[0], images.shape))
    flat = np.asarray(same).reshape(8, -1)
    dists = np.abs(flat[:, None] - flat[None]).max(-1)
    assert np.all(dists[~np.eye(8, dtype=bool)] > 1e-3)


def test_simclr_augment_fixed_scale_and_identity_settings():
    image = _image(3, (16, 16, 3))
    key = jax.random.PRNGKey(4)
    fixed = jax.jit(lambda k, x: A.simclr_augment(k, x, crop_scale=(0.54, 0.54)))(key, image)
    assert fixed.shape == image.shape and bool(jnp.all(jnp.isfinite(fixed)))
    # No jitter, no gray, full-image crop: the image comes back unchanged.
    ident = jax.jit(lambda k, x: A.simclr_augment(
        k, x, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0))(key, image)
    np.testing.assert_allclose(ident, image, atol=1e-6)


def test_to_float():
    x = np.array([[0, 51, 255]], np.uint8)
    out = A.to_float(x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, [[0.0, 0.2, 1.0]], rtol=1e-6)


# --- geometry ----------------------------------------------------------------

def test_rot90_matches_numpy_static_and_traced():
    image = _image(5, (6, 6, 3))
    jitted = jax.jit(A.rot90)
    for k in range(-1, 5):
        expected = np.rot90(np.asarray(image), k, axes=(0, 1))
        np.testing.assert_array_equal(A.rot90(image, k), expected)
        np.testing.assert_array_equal(jitted(image, jnp.int32(k)), expected)
    batched = jax.vmap(A.rot90, in_axes=(None, 0))(image, jnp.arange(4))
    for k in range(4):
        np.testing.assert_array_equal(batched[k], np.rot90(np.asarray(image), k, axes=(0, 1)))


def test_rot90_non_square():
    image = _image(6, (4, 6, 3))
    np.testing.assert_array_equal(A.rot90(image, 1), np.rot90(np.asarray(image), 1, axes=(0, 1)))
    with pytest.raises(ValueError, match='square'):
        jax.jit(A.rot90)(image, 1)


def test_hflip_matches_csi_flip_layer():
    image = _image(7, (5, 7, 3))
    np.testing.assert_array_equal(A.hflip(image), np.asarray(image)[:, ::-1])
    # CSI flips with theta = [[-1, 0, 0], [0, 1, 0]] through grid_sample.
    theta = jnp.array([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(A.grid_sample(image, A.affine_grid(theta, 5, 7)),
                               A.hflip(image), atol=1e-6)
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(A.random_hflip(key, image, p=0.0), image)
    np.testing.assert_array_equal(A.random_hflip(key, image, p=1.0), A.hflip(image))


def test_grid_sample_matches_numpy_reference():
    image = _image(8, (7, 10, 3))  # non-square catches x/y mix-ups
    rng = np.random.default_rng(0)
    thetas = [rng.uniform(-1.5, 1.5, (2, 3)) for _ in range(3)]
    thetas.append(np.array([[2.5, 0.3, 1.7], [-0.2, 3.0, -2.2]]))  # several reflections
    for theta in thetas:
        grid = A.affine_grid(jnp.asarray(theta, jnp.float32), 7, 10)
        np.testing.assert_allclose(A.grid_sample(image, grid), _ref_affine_sample(image, theta),
                                   atol=1e-5)


def test_grid_sample_matches_torch():
    torch = import_torch()
    functional = torch.nn.functional
    image = _image(9, (7, 10, 3))
    theta = np.array([[0.7, 0.4, 0.9], [-0.3, 1.2, -0.5]], np.float32)
    x = torch.from_numpy(np.asarray(image).transpose(2, 0, 1)[None].copy())
    grid = functional.affine_grid(torch.from_numpy(theta)[None], x.shape, align_corners=False)
    expected = functional.grid_sample(x, grid, mode='bilinear', padding_mode='reflection',
                                      align_corners=False)[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(
        A.grid_sample(image, A.affine_grid(jnp.asarray(theta), 7, 10)), expected, atol=1e-5)


def test_apply_crop_identity_and_centre_zoom():
    image = _image(10)
    np.testing.assert_allclose(A.apply_crop(image, jnp.array([1.0, 1.0, 0.0, 0.0])), image,
                               atol=1e-6)
    params = (0.5, 0.5, 0.0, 0.0)
    zoom = A.apply_crop(image, jnp.array(params))
    np.testing.assert_allclose(zoom, _ref_affine_sample(image, _crop_theta(params)), atol=1e-5)
    # On a ramp image[y, x] = x, output column j samples x = j / 2 + W / 4 - 1 / 4:
    # the central half of the image, magnified twice.
    width = 12
    ramp = jnp.broadcast_to(jnp.arange(width, dtype=jnp.float32)[None, :, None], (12, width, 1))
    np.testing.assert_allclose(A.apply_crop(ramp, jnp.array(params))[0, :, 0],
                               np.arange(width) / 2 + width / 4 - 0.25, atol=1e-5)


def test_random_crop_matches_reference_with_its_params():
    image = _image(11)
    key = jax.random.PRNGKey(12)
    params = A.sample_crop_params(key, 12, 12)
    out = jax.jit(A.random_resized_crop)(key, image)
    np.testing.assert_allclose(out, _ref_affine_sample(image, _crop_theta(np.asarray(params))),
                               atol=1e-5)


@pytest.mark.parametrize('scale', [(0.08, 1.0), (0.54, 0.54)])
def test_sample_crop_params_follow_csi(scale):
    size = 16
    keys = jax.random.split(jax.random.PRNGKey(13), 256)
    params = np.asarray(jax.vmap(lambda k: A.sample_crop_params(k, size, size, scale))(keys))
    w, h, bx, by = params.T
    # Whole pixels, inside the image, biases on CSI's integer grid.
    for frac in (w, h, bx, by):
        np.testing.assert_allclose(frac * size, np.round(frac * size), atol=1e-4)
    assert np.all((w > 0) & (w <= 1) & (h > 0) & (h <= 1))
    assert np.all(np.abs(bx) <= 1 - w + 1e-6) and np.all(np.abs(by) <= 1 - h + 1e-6)
    # w = round(sqrt(A r)), h = round(sqrt(A / r)) for some A, r in range:
    # the pixel intervals [w +- 0.5] x [h +- 0.5] must admit such A and r.
    wp, hp, area = w * size, h * size, size * size
    assert np.all((wp + 0.5) * (hp + 0.5) >= scale[0] * area)
    assert np.all((wp - 0.5) * (hp - 0.5) <= scale[1] * area)
    assert np.all((wp + 0.5) / (hp - 0.5) >= 3 / 4)
    assert np.all((wp - 0.5) / (hp + 0.5) <= 4 / 3)
    if scale[0] == scale[1]:
        np.testing.assert_allclose(w * h, scale[0], atol=2.5 / size)
    else:
        assert (w * h).std() > 0.1 and len(np.unique(bx)) > 5


def test_sample_crop_params_fall_back_to_full_image():
    params = A.sample_crop_params(jax.random.PRNGKey(0), 16, 16, scale=(2.0, 2.0))
    np.testing.assert_array_equal(params, [1.0, 1.0, 0.0, 0.0])


# --- colour --------------------------------------------------------------------

def test_grayscale():
    image = _image(14)
    gray = A.grayscale(image)
    x = np.asarray(image)
    expected = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    for c in range(3):
        np.testing.assert_allclose(gray[..., c], expected, atol=1e-6)
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(A.random_grayscale(key, image, p=1.0), gray)
    np.testing.assert_array_equal(A.random_grayscale(key, image, p=0.0), image)


def test_rgb_to_hsv_against_colorsys():
    x = np.asarray(_image(15, (16, 16, 3))).reshape(-1, 3)
    hsv = np.asarray(A.rgb_to_hsv(jnp.asarray(x)))
    ref = np.array([colorsys.rgb_to_hsv(*p) for p in x.astype(np.float64)])
    np.testing.assert_allclose(hsv[:, 1:], ref[:, 1:], atol=1e-6)
    # CSI's atan2 hue is within ~1.2 degrees of the hexcone hue.
    dh = np.abs(hsv[:, 0] - ref[:, 0])
    assert np.all(np.minimum(dh, 1 - dh) <= 1.25 / 360)
    # hsv_to_rgb is the exact hexcone inverse.
    np.testing.assert_allclose(A.hsv_to_rgb(jnp.asarray(ref, jnp.float32)), x, atol=1e-5)


def test_hsv_round_trip():
    x = _image(16, (16, 16, 3))
    err = np.abs(np.asarray(A.hsv_to_rgb(A.rgb_to_hsv(x)) - x))
    assert err.max() < 0.025 and err.mean() < 0.005
    # Exact where the atan2 and hexcone hues agree: hues at multiples of 30 degrees.
    palette = jnp.array([[0, 0, 0], [1, 1, 1], [0.3, 0.3, 0.3], [1, 0, 0], [0, 0.6, 0],
                         [0, 0, 0.8], [1, 1, 0], [0, 0.5, 0.5], [0.9, 0.2, 0.9]], jnp.float32)
    np.testing.assert_allclose(A.hsv_to_rgb(A.rgb_to_hsv(palette)), palette, atol=1e-6)


def test_adjust_contrast_formula():
    x = np.asarray(_image(17))
    for factor in (0.6, 1.0, 1.4):
        mean = x.mean(axis=(0, 1), keepdims=True)
        expected = np.clip((x - mean) * factor + mean, 0, 1)
        np.testing.assert_allclose(A.adjust_contrast(jnp.asarray(x), factor), expected, atol=1e-6)


def test_adjust_hsv_formula():
    x = _image(18)
    hsv = np.asarray(A.rgb_to_hsv(x))
    shift, sat, val = 0.07, 1.3, 0.8
    expected = np.stack([np.mod(hsv[..., 0] + shift * 255 / 360, 1),
                         hsv[..., 1] * sat, hsv[..., 2] * val], -1)
    expected = A.hsv_to_rgb(jnp.asarray(np.clip(expected, 0, 1)))
    np.testing.assert_allclose(A.adjust_hsv(x, shift, sat, val), expected, atol=1e-6)


def test_adjust_color_identity_and_order():
    x = _image(19)
    identity = dict(contrast_factor=1.0, hue_shift=0.0, sat_factor=1.0, val_factor=1.0)
    for first in (True, False):
        out = A.adjust_color(x, contrast_first=first, **identity)
        np.testing.assert_allclose(out, A.hsv_to_rgb(A.rgb_to_hsv(x)), atol=1e-6)
        np.testing.assert_allclose(out, x, atol=0.025)
    params = dict(contrast_factor=1.35, hue_shift=0.08, sat_factor=0.7, val_factor=1.2)
    fn = jax.jit(A.adjust_color)
    c_first = fn(x, contrast_first=jnp.bool_(True), **params)
    h_first = fn(x, contrast_first=jnp.bool_(False), **params)
    np.testing.assert_allclose(c_first, A.adjust_hsv(A.adjust_contrast(x, 1.35), 0.08, 0.7, 1.2),
                               atol=1e-6)
    np.testing.assert_allclose(h_first, A.adjust_contrast(A.adjust_hsv(x, 0.08, 0.7, 1.2), 1.35),
                               atol=1e-6)
    assert float(jnp.abs(c_first - h_first).max()) > 1e-3


def test_color_jitter_probability_and_range():
    x = _image(20)
    key = jax.random.PRNGKey(21)
    np.testing.assert_array_equal(A.color_jitter(key, x, p=0.0), x)
    out = jax.jit(A.color_jitter)(key, x)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    always = jax.vmap(lambda k: A.color_jitter(k, x, p=1.0))(jax.random.split(key, 4))
    assert np.all(np.abs(np.asarray(always - x)).max(axis=(1, 2, 3)) > 1e-2)
    with pytest.raises(ValueError):
        A.color_jitter(key, x, hue=0.7)
