"""Pixel-level anomaly-detection metrics of the MVTec AD protocol, computed exactly on the host.

Same conventions as `jaxad.metrics` (the image-level metrics): a higher score is more anomalous,
label 1 is an anomaly (the positive class), inputs are NumPy arrays and results Python floats.

`maps` are anomaly maps of shape (N, H, W) at image resolution; `masks` the ground-truth masks
of the same shape, 1 = anomalous pixel (bool or {0, 1}). In ReContrast (docs/methods.md §5.4) a map is
M(x) = Σ over the six encoder/decoder feature pairs of the bilinearly upsampled 1 − channel cosine
similarity, smoothed per image by `scipy.ndimage.gaussian_filter(M, sigma=4)`; the image score
is max(M) (class-separated sets) or the mean of the top 1% pixels (unified multi-class setting).

Map values are compared in the dtype they arrive in (float32 maps are not widened, float64 maps
not rounded), so ties are exactly the ties of the input. Pass float32 maps to halve memory.

Two AUPRO definitions are in use and give different numbers:
  * `aupro`: the official MVTec AD evaluation (`pro_curve_util.compute_pro` + `generic_util.
    trapezoid`): one PRO curve pooled over all test images, exact at every distinct threshold,
    integrated up to FPR = fpr_limit and divided by fpr_limit. This is what `pixel_metrics`
    reports.
  * `aupro_recontrast`: RD4AD's `compute_pro` as ReContrast's `utils.evaluation` calls it: per
    anomalous image, 200 evenly spaced thresholds between that image's own min and max score,
    points with FPR < 0.3 kept, FPR rescaled by the largest kept FPR, then the mean over images.
    Use it only to compare with numbers printed by the ReContrast/RD4AD scripts.
"""
import numpy as np

from jaxad import metrics

# 8-connectivity, as the official MVTec code (scipy.ndimage.label with np.ones((3, 3))) and
# skimage.measure.label's default for 2-D masks (RD4AD/ReContrast) both use.
_STRUCTURE = np.ones((3, 3), dtype=int)
_CHUNK = 1 << 20  # bounds the temporaries of the vectorised passes (8 MiB per int64 array)


def _check_maps_masks(maps, masks):
    """(N, H, W) maps in a float dtype and bool masks, or a ValueError that says what is wrong."""
    maps = np.asarray(maps)
    masks = np.asarray(masks)
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)  # ints and bools: exact in float64
    if maps.ndim != 3 or masks.ndim != 3:
        raise ValueError(f'maps and masks must be (N, H, W), got shapes {maps.shape} and '
                         f'{masks.shape} (squeeze a channel axis, add a leading axis for one image)')
    if maps.shape != masks.shape:
        raise ValueError(f'maps and masks differ in shape: {maps.shape} vs {masks.shape}')
    if maps.size == 0:
        raise ValueError('maps and masks are empty')
    if not np.isfinite(maps).all():
        bad = int(np.sum(~np.isfinite(maps)))
        raise ValueError(f'maps contain {bad} NaN/inf value(s) out of {maps.size}')
    if masks.dtype != bool:
        if not np.all((masks == 0) | (masks == 1)):
            raise ValueError(f'masks must be 0 (normal) or 1 (anomaly), got values '
                             f'{np.unique(masks)[:10]} (binarise soft masks first, e.g. > 0.5)')
        masks = masks.astype(bool)
    n_pos = int(np.count_nonzero(masks))
    if n_pos == 0:
        raise ValueError(f'masks contain no anomalous pixel ({masks.size} pixels): pixel metrics '
                         'need at least one')
    if n_pos == masks.size:
        raise ValueError(f'masks contain no normal pixel ({masks.size} pixels are all anomalous): '
                         'pixel metrics need at least one')
    return maps, masks


def pixel_auroc(maps, masks):
    """ROC AUC over all pixels of all images pooled (anomalous pixel = positive), exact.

    Mann-Whitney: AUC = (#{(p, n): s_p > s_n} + ½ #{(p, n): s_p = s_n}) / (n_pos · n_neg), with the
    pair counts summed as exact integers from `searchsorted` of the smaller class into the sorted
    larger class. Equal to sklearn's `roc_auc_score(masks.ravel(), maps.ravel())` to float64
    rounding, ties included.

    Cost for P pixels: O(P log P) time (one sort); memory one copy of the map values in their own
    dtype (4 bytes/pixel for float32), a 1 byte/pixel mask and O(2^20) temporaries, i.e. about
    0.6 GB beyond the inputs for the full MVTec test set (1725 x 256 x 256 = 113M pixels), against
    ~3 GB for an int64 argsort plus label and score copies.
    """
    maps, masks = _check_maps_masks(maps, masks)
    n_pos = int(np.count_nonzero(masks))
    n_neg = masks.size - n_pos
    small_is_pos = n_pos <= n_neg
    big = maps[~masks] if small_is_pos else maps[masks]
    big.sort()
    small = maps[masks] if small_is_pos else maps[~masks]
    small.sort()  # sorted queries make searchsorted cache-friendly
    below = 0  # sum over small-class values of #big values strictly below
    below_or_tied = 0  # ... of #big values below or equal
    for start in range(0, len(small), _CHUNK):
        q = small[start:start + _CHUNK]
        below += int(np.searchsorted(big, q, side='left').sum())
        below_or_tied += int(np.searchsorted(big, q, side='right').sum())
    # below + below_or_tied = 2 x (#pairs with small > big) + #ties
    twice_u = below + below_or_tied
    if not small_is_pos:  # the count is for negatives beating positives: take the complement
        twice_u = 2 * n_pos * n_neg - twice_u
    return float(twice_u / (2.0 * n_pos * n_neg))


def _regions(masks):
    """Scores-independent part of the PRO curve: connected components of every mask.

    Yields (image index, label image, number of components, component sizes indexed by label)
    for the images that contain anomalous pixels.
    """
    # Imported here: scipy.ndimage takes 0.2 s to import, and only pixel-level runs need it
    # (every command line imports this module through jaxad.evaluate).
    from scipy import ndimage
    for i in range(masks.shape[0]):
        if masks[i].any():
            lab, n = ndimage.label(masks[i], structure=_STRUCTURE)
            yield i, lab, n, np.bincount(lab.ravel())


def aupro(maps, masks, fpr_limit=0.3):
    """Normalised area under the per-region-overlap curve up to FPR = fpr_limit (official MVTec AD).

    Ground-truth regions are the 8-connected components (3x3 structure of ones, as the official
    `generic_util`/`pro_curve_util` code) of every mask; with K regions over all images,
      PRO(t) = (1/K) Σ_regions |region ∩ {map >= t}| / |region|,
      FPR(t) = |normal pixels with map >= t| / |normal pixels|,
    at every distinct score t (no threshold grid). As in the official code the curve starts at
    (0, 0), is linear between consecutive distinct thresholds, is integrated by the trapezoid rule
    up to fpr_limit with the PRO linearly interpolated at exactly fpr_limit, and the area is
    divided by fpr_limit, so a perfect map gives 1.0. The official code obtains the curve from the
    cumulative sums of per-pixel increments (1/|region|/K for anomalous pixels, 1/#normal for
    normal ones) after sorting all pixels; here the same sums are taken in closed form: segments
    of the curve only widen at thresholds equal to a normal pixel's score v, running from
    (FPR(>v), PRO(>v)) to (FPR(>=v), PRO(>=v)), so
      area = Σ_v trapezoid of that segment clipped at fpr_limit,
    with FPR counts from the sorted normal scores and PRO from suffix sums of the sorted weighted
    anomalous scores. Only normal scores in the top fpr_limit fraction are visited. The result
    equals the official value up to float rounding (the official code keeps FPRs in float32,
    ~1e-7; here all is float64).

    Cost: O(P log P) time (sort of the normal scores, labelling is O(P)); memory one copy of the
    normal scores, a 1 byte/pixel mask, ~24 bytes per anomalous pixel and 8 bytes per distinct
    normal score above the FPR limit: measured 0.45 GB beyond the float32 inputs at 52M pixels
    (800 maps of 256 x 256, 7 s with pixel_auroc), so about 1 GB for the full MVTec test set;
    the official code needs ~2x the memory and ~4x the time (int64 argsort, float64 and uint32
    per-pixel increment arrays).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f'fpr_limit must be in (0, 1], got {fpr_limit}')
    maps, masks = _check_maps_masks(maps, masks)

    pos_scores, pos_weights = [], []
    n_regions = 0
    for i, lab, n, sizes in _regions(masks):
        inside = lab > 0
        pos_scores.append(maps[i][inside])
        pos_weights.append(1.0 / sizes[lab[inside]])
        n_regions += n
    pos = np.concatenate(pos_scores)
    order = np.argsort(pos, kind='stable')
    pos = pos[order]
    # suffix[j] = Σ_{k >= j} weight of the j-th smallest anomalous score; suffix[n_pos] = 0
    suffix = np.r_[np.cumsum(np.concatenate(pos_weights)[order][::-1])[::-1], 0.0]
    del pos_scores, pos_weights, order

    neg = maps[~masks]
    neg.sort()
    n_neg = len(neg)
    # Segments with FPR(>v) < fpr_limit are those of the normal values from index
    # floor((1 - fpr_limit) n_neg) on; start one lower against rounding (extra segments add 0).
    k = max(0, int(np.floor((1.0 - fpr_limit) * n_neg)) - 1)
    tail = neg[k:]
    starts = np.flatnonzero(np.r_[True, tail[1:] != tail[:-1]])
    ends = np.r_[starts[1:], len(tail)]

    area = 0.0
    for c in range(0, len(starts), _CHUNK):
        s, e = starts[c:c + _CHUNK], ends[c:c + _CHUNK]
        vals = tail[s]
        first = k + s  # index in neg of the first normal score equal to v
        if c == 0:
            first[0] = np.searchsorted(neg, vals[0], side='left')  # the block may begin before k
        x0 = (n_neg - (k + e)) / n_neg  # FPR(> v)
        x1 = (n_neg - first) / n_neg  # FPR(>= v)
        y0 = np.minimum(suffix[np.searchsorted(pos, vals, side='right')] / n_regions, 1.0)
        y1 = np.minimum(suffix[np.searchsorted(pos, vals, side='left')] / n_regions, 1.0)
        xe = np.minimum(x1, fpr_limit)
        live = x0 < fpr_limit
        ye = y0 + (y1 - y0) * (xe - x0) / (x1 - x0)  # = y1 unless cut at fpr_limit
        area += float(np.sum(np.where(live, 0.5 * (y0 + ye) * (xe - x0), 0.0)))
    return float(area / fpr_limit)


def aupro_recontrast(maps, masks, num_thresholds=200):
    """AUPRO as printed by ReContrast/RD4AD: mean over anomalous images of a per-image grid AUPRO.

    Reproduces `utils.evaluation` (called once per test image, for images with an anomalous
    mask) + RD4AD's `compute_pro(masks, amaps, num_th=200)`: thresholds
    `np.arange(min, max, (max - min) / num_thresholds)` of the image's own map, a pixel is flagged
    when map > threshold (strict), PRO = mean over the image's 8-connected regions (skimage
    `measure.label` default) of the flagged fraction, FPR over the image's normal pixels; points
    with FPR < 0.3 are kept, their FPR divided by the largest kept FPR (not by 0.3, and the curve
    need not start at FPR 0), and sklearn's `auc` taken. Not the official MVTec AUPRO (`aupro`):
    expect differences of a few points. Images without anomalous pixels are skipped (ReContrast
    skips label-0 images, which for MVTec are exactly those). Vectorised with sorted scores per
    region: O(P log P) time.
    """
    if int(num_thresholds) != num_thresholds or num_thresholds < 2:
        raise ValueError(f'num_thresholds must be an integer >= 2, got {num_thresholds}')
    maps, masks = _check_maps_masks(maps, masks)
    per_image = []
    for i, lab, n, sizes in _regions(masks):
        amap = maps[i]
        if not (~masks[i]).any():
            raise ValueError(f'image {i}: mask has no normal pixel, its FPR is undefined')
        lo, hi = amap.min(), amap.max()
        if lo == hi:
            raise ValueError(f'image {i}: anomaly map is constant ({lo}), no threshold grid')
        thresholds = np.arange(lo, hi, (hi - lo) / int(num_thresholds))
        flat_lab, flat_map = lab.ravel(), amap.ravel()
        order = np.lexsort((flat_map, flat_lab))  # by label, then score
        sorted_map, bounds = flat_map[order], np.r_[0, np.cumsum(sizes)]
        # number of pixels with map > t in each label group (0 = normal pixels)
        above = np.stack([sizes[g] - np.searchsorted(sorted_map[bounds[g]:bounds[g + 1]],
                                                     thresholds, side='right')
                          for g in range(n + 1)])
        fpr = above[0] / sizes[0]
        pro = np.mean(above[1:] / sizes[1:, None], axis=0)
        keep = fpr < 0.3
        if keep.sum() < 2:
            raise ValueError(f'image {i}: fewer than 2 thresholds with FPR < 0.3, the reference '
                             'code (sklearn.metrics.auc) fails here too')
        x, y = fpr[keep], pro[keep]
        with np.errstate(invalid='ignore', divide='ignore'):
            x = x / x.max()  # NaN when every kept FPR is 0, as in the reference
        # sklearn.metrics.auc: x here is non-increasing (thresholds ascend), direction -1
        per_image.append(-float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x))))
    return float(np.mean(per_image))


def image_f1max(scores, labels):
    """Largest F1 over all thresholds, anomaly = positive (anomalib's F1Max).

    A threshold t flags the images scored >= t; at every distinct score
    F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + n_anomalies), taken exactly (anomalib adds
    1e-10 to the denominator of 2PR/(P+R), a ~1e-10 difference). Equals the F1 at ReContrast's
    `return_best_thr` threshold (`evaluation_noseg`, medical sets).
    """
    scores, labels = metrics._check(scores, labels)
    tps, fps = metrics._curve(scores, labels)
    return float(np.max(2.0 * tps / (tps + fps + tps[-1])))


def pixel_metrics(maps, masks, image_scores=None, image_labels=None):
    """The MVTec numbers: pixel AUROC and AUPRO (official, FPR <= 0.3), and the image-level
    AUROC and F1max when image scores and labels are given (both or neither)."""
    out = {'pixel_AUROC': pixel_auroc(maps, masks), 'AUPRO': aupro(maps, masks, 0.3)}
    if (image_scores is None) != (image_labels is None):
        raise ValueError('give both image_scores and image_labels, or neither')
    if image_scores is not None:
        out['image_AUROC'] = metrics.auroc(image_scores, image_labels)
        out['image_F1max'] = image_f1max(image_scores, image_labels)
    return out
