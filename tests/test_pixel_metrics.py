"""Pixel-level MVTec metrics: sklearn and slow literal references, and hand-computed AUPRO cases."""
from bisect import bisect

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from jaxad import metrics, pixel_metrics as pm


def random_case(seed, n=3, h=12, w=12, decimals=1, anomaly_frac=0.15):
    """Blob-shaped masks (several components of various sizes) and maps with many ties."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(n, h, w)), sigma=(0, 1.2, 1.2))
    masks = noise > np.quantile(noise, 1 - anomaly_frac)
    masks[0, 0, 0], masks[0, -1, -1] = True, False  # both kinds present
    maps = rng.normal(size=(n, h, w)) + 1.5 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    return maps, masks.astype(int)


# --- pixel AUROC ---------------------------------------------------------------------------

@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('decimals', [None, 1, 0])
@pytest.mark.parametrize('anomaly_frac', [0.1, 0.7])  # 0.7: anomalous pixels are the majority
def test_pixel_auroc_matches_sklearn(seed, decimals, anomaly_frac):
    maps, masks = random_case(seed, decimals=decimals, anomaly_frac=anomaly_frac)
    want = skm.roc_auc_score(masks.ravel(), maps.ravel())
    assert pm.pixel_auroc(maps, masks) == pytest.approx(want, abs=1e-12)
    assert pm.pixel_auroc(maps.astype(np.float32), masks.astype(bool)) == pytest.approx(
        skm.roc_auc_score(masks.ravel(), maps.astype(np.float32).ravel()), abs=1e-12)


def test_pixel_auroc_hand_cases():
    masks = np.array([[[0, 0, 1, 1]]])
    assert pm.pixel_auroc(np.array([[[0., 1., 2., 3.]]]), masks) == 1.0
    assert pm.pixel_auroc(np.array([[[3., 2., 1., 0.]]]), masks) == 0.0
    assert pm.pixel_auroc(np.ones((1, 1, 4)), masks) == 0.5
    assert pm.pixel_auroc(np.array([[[0, 1, 1, 2]]]), masks) == 0.875  # int maps work


# --- AUPRO: official MVTec algorithm -------------------------------------------------------

def official_trapezoid(x, y, x_max):
    """generic_util.trapezoid of the MVTec AD evaluation code, restated."""
    x, y = np.asarray(x), np.asarray(y)
    correction = 0.0
    if x_max not in x:
        ins = bisect(x, x_max)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction


def slow_aupro(maps, masks, fpr_limit=0.3):
    """Threshold loop over every distinct score, 8-connected regions, official integration."""
    masks = masks.astype(bool)
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        flagged = maps >= t
        pros.append(np.mean([flagged[i][r].sum() / r.sum() for i, r in regions]))
        fprs.append((flagged & ~masks).sum() / (~masks).sum())
    fprs.append(1.0)
    pros.append(1.0)
    return official_trapezoid(fprs, pros, fpr_limit) / fpr_limit


@pytest.mark.parametrize('seed', range(5))
@pytest.mark.parametrize('decimals', [None, 1, 0])
@pytest.mark.parametrize('fpr_limit', [0.3, 0.05, 1.0])
def test_aupro_matches_slow_reference(seed, decimals, fpr_limit):
    maps, masks = random_case(seed, decimals=decimals, anomaly_frac=0.1 + 0.05 * seed)
    got = pm.aupro(maps, masks, fpr_limit)
    assert got == pytest.approx(slow_aupro(maps, masks, fpr_limit), abs=1e-6)
    assert pm.aupro(maps.astype(np.float32), masks, fpr_limit) == pytest.approx(
        slow_aupro(maps.astype(np.float32), masks, fpr_limit), abs=1e-6)


def test_aupro_perfect_map():
    _, masks = random_case(0)
    assert pm.aupro(masks.astype(float), masks) == pytest.approx(1.0, abs=1e-12)
    assert pm.aupro(masks.astype(float), masks, fpr_limit=1.0) == pytest.approx(1.0, abs=1e-12)


def test_aupro_two_regions_by_hand():
    # One 2x7 image: region A = 1 pixel, region B = 3 pixels, 10 normal pixels.
    masks = np.zeros((1, 2, 7), int)
    masks[0, 0, 0] = 1
    masks[0, 0, 4:7] = 1
    maps = np.zeros((1, 2, 7))
    maps[0, 0, 0] = 10.0  # A first: PRO 0.5 at FPR 0
    maps[0, 1, 0:2] = 5.0  # then two normals: FPR 0.2, PRO 0.5
    maps[0, 0, 4:6] = 4.0  # then 2 of B's 3 pixels: PRO 0.5 + 0.5 * 2/3 = 5/6 at FPR 0.2
    # the rest (8 normals, 1 pixel of B) at 0: (1, 1); at FPR 0.3 the PRO is 5/6 + (1/6)(0.1/0.8)
    y_cut = 5 / 6 + 1 / 48
    want = (0.5 * 0.2 + 0.5 * (5 / 6 + y_cut) * 0.1) / 0.3
    assert pm.aupro(maps, masks) == pytest.approx(want, abs=1e-12)
    assert want == pytest.approx(0.6145833333333333, abs=1e-12)
    # B fully detected together with the two normals: (0, 0.5) -> (0.2, 1.0) -> flat at 1
    maps[0, 0, 6] = 5.0
    maps[0, 0, 4:6] = 5.0
    assert pm.aupro(maps, masks) == pytest.approx((0.5 * (0.5 + 1.0) * 0.2 + 0.1) / 0.3, abs=1e-12)


def test_aupro_uses_8_connectivity():
    # diagonal pair = one region under 8-connectivity (two under 4), plus a single far pixel
    masks = np.zeros((1, 5, 5), int)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 4, 4] = 1
    maps = np.zeros((1, 5, 5))
    maps[0, 4, 4] = 1.0  # detects the single pixel only: PRO 1/2 (it would be 1/3 with 4-conn)
    # curve (0, 0) -> (0, 0.5) -> (1, 1): y(0.3) = 0.65
    assert pm.aupro(maps, masks) == pytest.approx(0.5 * (0.5 + 0.65) * 0.3 / 0.3, abs=1e-12)


def test_aupro_constant_map():
    _, masks = random_case(1)
    # every pixel tied: one segment (0, 0) -> (1, 1); area to L is L^2 / 2, normalised L / 2
    assert pm.aupro(np.full(masks.shape, 0.7), masks) == pytest.approx(0.15, abs=1e-12)
    assert pm.aupro(np.full(masks.shape, 0.7), masks, 0.1) == pytest.approx(0.05, abs=1e-12)


def test_aupro_reversed_map_is_zero_up_to_limit():
    _, masks = random_case(2)
    # all normals above all anomalies: PRO = 0 while FPR < 1
    assert pm.aupro(1.0 - masks, masks) == pytest.approx(0.0, abs=1e-12)


# --- AUPRO as ReContrast / RD4AD print it --------------------------------------------------

def slow_aupro_recontrast(maps, masks, num_th=200):
    """RD4AD compute_pro, called once per anomalous image, averaged (ReContrast utils.evaluation)."""
    out = []
    for amap, mask in zip(maps, masks):
        if not mask.any():
            continue
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        min_th, max_th = amap.min(), amap.max()
        fprs, pros = [], []
        for th in np.arange(min_th, max_th, (max_th - min_th) / num_th):
            binary = amap > th
            pros.append(np.mean([binary[lab == k].sum() / (lab == k).sum()
                                 for k in range(1, n + 1)]))
            fprs.append(np.logical_and(1 - mask, binary).sum() / (1 - mask).sum())
        fprs, pros = np.array(fprs), np.array(pros)
        keep = fprs < 0.3
        out.append(skm.auc(fprs[keep] / fprs[keep].max(), pros[keep]))
    return np.mean(out)


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('num_th', [200, 37])
def test_aupro_recontrast_matches_slow_reference(seed, num_th):
    maps, masks = random_case(seed, n=4, h=16, w=16, decimals=None)
    masks[3] = 0  # a normal image, skipped
    want = slow_aupro_recontrast(maps, masks, num_th)
    assert pm.aupro_recontrast(maps, masks, num_th) == pytest.approx(want, abs=1e-12)


# --- image F1max and the bundle ------------------------------------------------------------

@pytest.mark.parametrize('seed', range(5))
@pytest.mark.parametrize('decimals', [None, 1, 0])
def test_image_f1max_brute_force(seed, decimals):
    rng = np.random.default_rng(seed)
    labels = (rng.random(80 + 30 * seed) < 0.2 + 0.15 * seed).astype(int)
    labels[:2] = [0, 1]
    scores = rng.normal(size=len(labels)) + labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    want = max(skm.f1_score(labels, scores >= t) for t in np.unique(scores))
    assert pm.image_f1max(scores, labels) == pytest.approx(want, abs=1e-12)


def test_image_f1max_hand_case():
    assert pm.image_f1max([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    # best: flag all three top images, TP 2, FP 1: F1 = 4 / 5
    assert pm.image_f1max([0.5, 0.4, 0.9, 0.8], [1, 0, 0, 1]) == pytest.approx(0.8)


def test_pixel_metrics_bundle():
    maps, masks = random_case(3)
    scores = maps.reshape(len(maps), -1).max(1)
    labels = np.array([0, 1, 1])
    out = pm.pixel_metrics(maps, masks, scores, labels)
    assert set(out) == {'pixel_AUROC', 'AUPRO', 'image_AUROC', 'image_F1max'}
    assert out['pixel_AUROC'] == pm.pixel_auroc(maps, masks)
    assert out['AUPRO'] == pm.aupro(maps, masks, 0.3)
    assert out['image_AUROC'] == metrics.auroc(scores, labels)
    assert all(isinstance(v, float) for v in out.values())
    assert set(pm.pixel_metrics(maps, masks)) == {'pixel_AUROC', 'AUPRO'}
    with pytest.raises(ValueError, match='both'):
        pm.pixel_metrics(maps, masks, scores)


# --- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize('fn', [pm.pixel_auroc, pm.aupro, pm.aupro_recontrast])
def test_errors(fn):
    maps, masks = random_case(0)
    with pytest.raises(ValueError, match='no anomalous pixel'):
        fn(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match='no normal pixel'):
        fn(maps, np.ones_like(masks))
    with pytest.raises(ValueError, match='differ in shape'):
        fn(maps, masks[:, :-1])
    with pytest.raises(ValueError, match=r'\(N, H, W\)'):
        fn(maps[0], masks[0])
    with pytest.raises(ValueError, match='0 \\(normal\\) or 1'):
        fn(maps, masks * 255)
    bad = maps.copy()
    bad[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match='NaN'):
        fn(bad, masks)


def test_argument_errors():
    maps, masks = random_case(0)
    for limit in (0.0, 1.5):
        with pytest.raises(ValueError, match='fpr_limit'):
            pm.aupro(maps, masks, limit)
    with pytest.raises(ValueError, match='num_thresholds'):
        pm.aupro_recontrast(maps, masks, 1)
    with pytest.raises(ValueError, match='both kinds'):
        pm.image_f1max([0.1, 0.2], [1, 1])
