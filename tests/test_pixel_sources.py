"""Pixel-mask sources: the MVTec-AD layout and anomalib-style folders (jaxad.data.pixel_sources)."""
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxad import config as jc
from jaxad import train
from jaxad.data import pixel_sources, sources
from jaxad.errors import ConfigError, DataError
from tests.helpers import tiny_config

SIZE = 20  # original side; resized to 16, not a multiple, so nearest neighbour is exercised


def texture(seed, size=SIZE, grey=False):
    rng = np.random.default_rng(seed)
    shape = (size, size) if grey else (size, size, 3)
    return rng.integers(80, 140, shape, dtype=np.uint8)


def square(seed, size=SIZE):
    """(top, left, side) of a planted defect, different per image."""
    rng = np.random.default_rng(1000 + seed)
    side = int(rng.integers(3, 8))
    top, left = rng.integers(0, size - side, 2)
    return int(top), int(left), side


def write_mvtec(root, category='carpet', grey=False, n_train=8, defects=('cut', 'hole'),
                n_defect=2, n_good_test=2):
    """root/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>};
    returns {test image path: full-size mask}."""
    cat = root / category
    masks = {}
    for sub in ('train/good', 'test/good'):
        (cat / sub).mkdir(parents=True)
    for i in range(n_train):
        Image.fromarray(texture(i, grey=grey)).save(cat / 'train/good' / f'{i:03d}.png')
    for i in range(n_good_test):
        Image.fromarray(texture(100 + i, grey=grey)).save(cat / 'test/good' / f'{i:03d}.png')
    for d, defect in enumerate(defects):
        (cat / 'test' / defect).mkdir()
        (cat / 'ground_truth' / defect).mkdir(parents=True)
        for i in range(n_defect):
            seed = 200 + 10 * d + i
            image, mask = texture(seed, grey=grey), np.zeros((SIZE, SIZE), np.uint8)
            top, left, side = square(seed)
            image[top:top + side, left:left + side] = 255
            mask[top:top + side, left:left + side] = 255
            path = cat / 'test' / defect / f'{i:03d}.png'
            Image.fromarray(image).save(path)
            Image.fromarray(mask).save(cat / 'ground_truth' / defect / f'{i:03d}_mask.png')
            masks[str(path)] = mask
    return masks


def nearest(mask, size):
    """Nearest-neighbour resize by Pillow's rule (source pixel under the target's centre)."""
    idx = np.floor((np.arange(size) + 0.5) * mask.shape[0] / size).astype(int)
    return (mask[np.ix_(idx, idx)] > 0).astype(np.uint8)


@pytest.fixture(scope='module')
def mvtec(tmp_path_factory):
    root = tmp_path_factory.mktemp('mvtec')
    masks = write_mvtec(root, 'carpet')
    write_mvtec(root, 'screw', grey=True, defects=('thread_top',))
    return root, masks


# ----------------------------------------------------------------------- MVTec


def test_mvtec_classes_labels_and_train_only_good(mvtec):
    root, _ = mvtec
    tr = pixel_sources.load_mvtec(root, 'carpet', 'train', 16)
    te = pixel_sources.load_mvtec(root, 'carpet', 'test', 16)
    assert tr.class_names == te.class_names == ['good', 'cut', 'hole']
    assert tr.images.shape == (8, 16, 16, 3) and (tr.labels == 0).all()
    assert tr.masks.shape == (8, 16, 16) and not tr.masks.any()
    np.testing.assert_array_equal(te.labels, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(sources.anomaly_labels(te.labels, (0,)), [0, 0, 1, 1, 1, 1])
    assert te.images.dtype == np.uint8 and te.masks.dtype == np.uint8
    # images are Pillow bilinear resizes of the files
    want = np.asarray(Image.open(root / 'carpet/test/hole/001.png').resize(
        (16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(te.images[5], want)


def test_mvtec_masks_follow_the_defects_after_resize(mvtec):
    root, full_masks = mvtec
    te = pixel_sources.load_mvtec(root, 'carpet', 'test', 16)
    assert te.masks.shape == (6, 16, 16) and set(np.unique(te.masks)) == {0, 1}
    assert not te.masks[te.labels == 0].any()  # good images: all-zero masks
    paths = [str(root / 'carpet/test' / d / f'{i:03d}.png') for d in ('cut', 'hole')
             for i in range(2)]
    for k, path in enumerate(paths):
        got, full = te.masks[2 + k], full_masks[path]
        np.testing.assert_array_equal(got, nearest(full, 16))
        # the square lands where it was, scaled by 16/20, give or take a pixel
        ys, xs = np.nonzero(got)
        top, left, side = square(200 + 10 * (k // 2) + k % 2)
        assert abs(ys.min() - top * 0.8) <= 1 and abs(xs.min() - left * 0.8) <= 1
        assert abs(ys.max() + 1 - (top + side) * 0.8) <= 1
        # the bright defect pixels of the resized image are inside the mask
        assert te.images[2 + k][got == 1].mean() > te.images[2 + k][got == 0].mean() + 50
    # image_size 0/None keeps the original size; masks stay exact
    orig = pixel_sources.load_mvtec(root, 'carpet', 'test', None)
    assert orig.images.shape == (6, SIZE, SIZE, 3)
    np.testing.assert_array_equal(orig.masks[2] * 255, full_masks[paths[0]])


def test_mvtec_grey_category_is_converted_to_channels(mvtec):
    root, _ = mvtec
    rgb = pixel_sources.load_mvtec(root, 'screw', 'test', 16, channels=3)
    assert rgb.images.shape == (4, 16, 16, 3) and rgb.class_names == ['good', 'thread_top']
    assert (rgb.images[..., 0] == rgb.images[..., 2]).all()
    grey = pixel_sources.load_mvtec(root, 'screw', 'test', 16, channels=1)
    assert grey.images.shape == (4, 16, 16, 1)
    np.testing.assert_array_equal(grey.masks, rgb.masks)


def test_mvtec_errors_name_the_path(mvtec, tmp_path):
    root, _ = mvtec
    with pytest.raises(DataError, match=r"'leather' is not in .*\['carpet', 'screw'\]"):
        pixel_sources.load_mvtec(root, 'leather', 'train', 16)
    with pytest.raises(DataError, match=r"category '' .*\['carpet', 'screw'\]"):
        pixel_sources.load_mvtec(root, '', 'train', 16)
    with pytest.raises(DataError, match='does not exist'):
        pixel_sources.load_mvtec(tmp_path / 'nope', 'carpet', 'train', 16)
    with pytest.raises(ConfigError, match='channels=2'):
        pixel_sources.load_mvtec(root, 'carpet', 'train', 16, channels=2)
    broken = tmp_path / 'broken'
    write_mvtec(broken, 'tile', defects=('crack',))
    os.remove(broken / 'tile/ground_truth/crack/001_mask.png')
    pixel_sources.load_mvtec(broken, 'tile', 'train', 16)  # train needs no masks
    with pytest.raises(DataError, match=r'test/crack/001.png has no mask .*001_mask.png'):
        pixel_sources.load_mvtec(broken, 'tile', 'test', 16)
    Image.fromarray(np.zeros((SIZE, 10), np.uint8)).save(
        broken / 'tile/ground_truth/crack/001_mask.png')
    with pytest.raises(DataError, match=r'001_mask.png is 20x10 \(HxW\) but its image'):
        pixel_sources.load_mvtec(broken, 'tile', 'test', 16)
    Image.fromarray(texture(0, size=12)).save(broken / 'tile/train/good/zzz.png')
    pixel_sources.load_mvtec(broken, 'tile', 'train', 16)  # resized: sizes may differ
    with pytest.raises(DataError, match=r'zzz.png is 12x12 \(HxW\) but .*000.png is 20x20'):
        pixel_sources.load_mvtec(broken, 'tile', 'train', None)


# ---------------------------------------------------------------------- Folder


def write_folders(root, n_normal=10, n_abnormal=3, mask_suffix='_mask'):
    for sub in ('good', 'bad', 'masks', 'good_test'):
        (root / sub).mkdir(parents=True)
    for i in range(n_normal):
        Image.fromarray(texture(i)).save(root / 'good' / f'n{i:02d}.png')
    for i in range(2):
        Image.fromarray(texture(50 + i)).save(root / 'good_test' / f't{i}.png')
    for i in range(n_abnormal):
        image, mask = texture(60 + i), np.zeros((SIZE, SIZE), np.uint8)
        image[i:i + 4, 2:6] = 255
        mask[i:i + 4, 2:6] = 255
        Image.fromarray(image).save(root / 'bad' / f'a{i}.png')
        suffix = mask_suffix if i % 2 else ''  # both x.png and x_mask.png are matched
        Image.fromarray(mask).save(root / 'masks' / f'a{i}{suffix}.png')
    return root


def folder(root, split, **kw):
    kw = dict(dict(abnormal_dir=str(root / 'bad'), mask_dir=str(root / 'masks'),
                   image_size=16), **kw)
    return pixel_sources.load_folder_masks(str(root / 'good'), split, **kw)


def test_folder_split_ratio_is_seeded_and_disjoint(tmp_path):
    root = write_folders(tmp_path)
    tr, te = folder(root, 'train'), folder(root, 'test')
    assert tr.class_names == te.class_names == ['normal', 'abnormal']
    assert len(tr) == 8 and (tr.labels == 0).all() and not tr.masks.any()
    np.testing.assert_array_equal(te.labels, [0, 0, 1, 1, 1])
    all_normal = folder(root, 'train', split_ratio=0.0).images
    assert len(all_normal) == 10
    # train + held-out normals are the normal folder, with no overlap
    got = np.concatenate([tr.images, te.images[:2]])
    assert sorted(map(bytes, got)) == sorted(map(bytes, all_normal))
    again = folder(root, 'test')
    np.testing.assert_array_equal(again.images, te.images)
    other = [folder(root, 'test', seed=s).images[:2] for s in range(1, 6)]
    assert any(not np.array_equal(o, te.images[:2]) for o in other)
    assert len(folder(root, 'train', split_ratio=0.5)) == 5
    with pytest.raises(ConfigError, match='normal_split_ratio=1.0'):
        folder(root, 'train', split_ratio=1.0)
    with pytest.raises(DataError, match='leaves none to train on'):
        folder(root, 'train', split_ratio=0.99)


def test_folder_normal_test_dir_masks_by_stem_and_no_masks(tmp_path):
    root = write_folders(tmp_path)
    tr = folder(root, 'train', normal_test_dir=str(root / 'good_test'))
    te = folder(root, 'test', normal_test_dir=str(root / 'good_test'))
    assert len(tr) == 10 and len(te) == 5  # split_ratio unused
    np.testing.assert_array_equal(te.labels, [0, 0, 1, 1, 1])
    assert not te.masks[:2].any()
    for i in range(3):  # a0.png <- a0.png, a1.png <- a1_mask.png, a2.png <- a2.png
        full = np.zeros((SIZE, SIZE), np.uint8)
        full[i:i + 4, 2:6] = 1
        np.testing.assert_array_equal(te.masks[2 + i], nearest(full, 16))
    plain = folder(root, 'test', mask_dir='')
    assert plain.masks is None and len(plain) == 5
    np.testing.assert_array_equal(plain.images, folder(root, 'test').images)
    assert folder(root, 'train', mask_dir='').masks is None
    os.remove(root / 'masks' / 'a1_mask.png')
    with pytest.raises(DataError, match=r'bad/a1.png has no mask in .*masks'):
        folder(root, 'test')
    with pytest.raises(DataError, match='abnormal folder .*nope does not exist'):
        folder(root, 'test', abnormal_dir=str(root / 'nope'))
    with pytest.raises(ConfigError, match='normal_dir is empty'):
        pixel_sources.load_folder_masks('', 'train')


# ---------------------------------------------------------------- config entry


def test_load_split_dispatch_and_auxiliary_drops_masks(mvtec, tmp_path):
    root, _ = mvtec
    c = jc.csi_base().data
    c.update(source='mvtec', path=str(root), category='carpet', image_size=16)
    te = sources.load_split(c, 'test')
    assert te.masks.shape == (6, 16, 16) and te.name == 'mvtec:carpet [test]'
    write_folders(tmp_path / 'f')
    c = jc.csi_base().data
    c.update(source='folder_masks', path=str(tmp_path / 'f'), normal_dir='good',
             abnormal_dir='bad', mask_dir='masks', image_size=16, normal_split_ratio=0.3)
    te = sources.load_split(c, 'test')
    assert len(te) == 6 and te.masks.shape == (6, 16, 16)
    aux = sources.load_auxiliary(ml_collections.ConfigDict(
        dict(source='mvtec', path=str(root), category='screw')), 'train', (8, 8, 3), 'oe')
    assert aux.images.shape == (8, 8, 8, 3) and aux.masks is None
    ood = sources.with_ood(te, ml_collections.ConfigDict(
        dict(source='mvtec', path=str(root), category='screw')))
    assert len(ood) == 6 + 4 and ood.masks is None and ood.class_names[-1].startswith('OOD')
    assert sources.with_ood(te, ml_collections.ConfigDict(dict(source=''))) is te


def test_trainer_setup_accepts_mvtec(mvtec, tmp_path):
    root, _ = mvtec
    config = tiny_config('', **{'data.source': 'mvtec', 'data.path': str(root),
                                'data.category': 'carpet', 'data.image_size': 16,
                                'data.numpy_path': ''})
    setup = train.Setup(config, str(tmp_path))
    try:
        assert setup.image_shape == (16, 16, 3) and len(setup.normal_indices) == 8
        assert setup.test_set.masks.shape == (6, 16, 16)
        assert setup.test_set.class_names == ['good', 'cut', 'hole']
    finally:
        setup.checkpoints.close()
