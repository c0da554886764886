"""A synthetic MVTec-AD-style data set: periodic textures with planted defects and masks.

    python -m jaxad.data.synthetic --out /tmp/synth_mvtec [--size 64] [--num_train 64]

writes OUT/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>} in
MVTec's layout (read it with data.source=mvtec, data.path=OUT, data.category=<category>).

Normal images are a woven texture: two oriented sinusoids at a fixed frequency with a
random phase and a small random orientation jitter, plus pixel noise, in the category's
colours. Defects (one per anomalous test image, placed at random, the mask marking exactly
the changed pixels):
  scratch  a thin bright or dark line segment
  hole     a dark filled disc
  stain    a blob where the weave is replaced by another orientation and colour
Every image is a pure function of (category, split, index, seed), so the set is
reproducible. ReContrast's MVTec numbers need MVTec and ImageNet weights, neither of
which is here; this set exercises the whole pixel pipeline and is learnable from scratch.
"""
import argparse
import os

import numpy as np

CATEGORIES = {  # name -> (colour A, colour B, weave period in pixels, orientation in degrees)
    'weave': ((150, 110, 70), (90, 60, 40), 6.0, 30.0),
    'mesh': ((170, 170, 180), (60, 60, 70), 8.0, 0.0),
}
DEFECTS = ('scratch', 'hole', 'stain')


def _weave(rng, size, period, angle_deg, jitter_deg=4.0):
    """Values in [0, 1]: the product of two orthogonal oriented cosines, random phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = np.deg2rad(angle_deg + rng.uniform(-jitter_deg, jitter_deg))
    phase = rng.uniform(0, 2 * np.pi, 2)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    w = np.cos(2 * np.pi * u / period + phase[0]) * np.cos(2 * np.pi * v / period + phase[1])
    return 0.5 + 0.5 * w


def _colourise(t, colour_a, colour_b, rng, noise=6.0):
    a, b = np.asarray(colour_a, np.float64), np.asarray(colour_b, np.float64)
    img = b + t[..., None] * (a - b) + rng.normal(0, noise, t.shape + (3,))
    return np.clip(img, 0, 255)


def normal_image(rng, size, category):
    colour_a, colour_b, period, angle = CATEGORIES[category]
    return _colourise(_weave(rng, size, period, angle), colour_a, colour_b, rng)


def _disc(size, cy, cx, r):
    yy, xx = np.mgrid[0:size, 0:size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def plant_defect(rng, image, defect, category, scale=1.0):
    """(image with the defect, bool mask of the changed pixels); `scale` multiplies the
    defect's size (1: radii 4-10% of the side, scratches 25-50% long)."""
    size = image.shape[0]
    img = image.copy()
    lo, hi = size // 8, size - size // 8
    if defect == 'scratch':
        length = min(rng.uniform(0.25, 0.5) * scale, 0.7) * size
        theta = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(lo, hi, 2)
        t = np.linspace(-0.5, 0.5, int(4 * length))[:, None]
        pts = np.stack([cy + t[:, 0] * length * np.sin(theta),
                        cx + t[:, 0] * length * np.cos(theta)], 1)
        mask = np.zeros((size, size), bool)
        width = max(1, int(round(size * scale / 64)))
        for y, x in np.round(pts).astype(int):
            mask[max(y - width // 2, 0):y + width // 2 + 1,
                 max(x - width // 2, 0):x + width // 2 + 1] = True
        img[mask] = 250.0 if rng.uniform() < 0.5 else 15.0
    elif defect == 'hole':
        r = rng.uniform(0.04, 0.09) * size * scale
        mask = _disc(size, *rng.uniform(lo, hi, 2), r)
        img[mask] = rng.uniform(10, 35)
    elif defect == 'stain':
        colour_a, colour_b, period, angle = CATEGORIES[category]
        mask = np.zeros((size, size), bool)
        centre = rng.uniform(lo, hi, 2)
        for _ in range(3):  # an irregular blob: a few overlapping discs
            mask |= _disc(size, *(centre + rng.normal(0, size * 0.03 * scale, 2)),
                          rng.uniform(0.05, 0.1) * size * scale)
        other = _colourise(_weave(rng, size, period * 1.6, angle + 45.0),
                           colour_b, (200, 60, 60), rng)
        img[mask] = other[mask]
    else:
        raise ValueError(f'unknown defect {defect!r}; choose from {DEFECTS}')
    return img, mask


def _rng(seed, category, split, index):
    return np.random.default_rng([seed, sorted(CATEGORIES).index(category), split, index])


def generate(category='weave', size=64, num_train=64, num_good_test=16, num_per_defect=8,
             defects=DEFECTS, seed=0, defect_scale=1.0):
    """In-memory set: dict(train=(N, S, S, 3) uint8, test=(M, S, S, 3) uint8,
    test_labels (M,) 0 = good else 1 + defect index, masks (M, S, S) uint8 0/1)."""
    if category not in CATEGORIES:
        raise ValueError(f'unknown category {category!r}; choose from {sorted(CATEGORIES)}')
    train = np.stack([normal_image(_rng(seed, category, 0, i), size, category)
                      for i in range(num_train)]).astype(np.uint8)
    test, labels, masks = [], [], []
    for i in range(num_good_test):
        test.append(normal_image(_rng(seed, category, 1, i), size, category))
        labels.append(0)
        masks.append(np.zeros((size, size), bool))
    for d, defect in enumerate(defects):
        for i in range(num_per_defect):
            rng = _rng(seed, category, 2 + d, i)
            img, mask = plant_defect(rng, normal_image(rng, size, category), defect, category,
                                     defect_scale)
            test.append(img)
            labels.append(1 + d)
            masks.append(mask)
    return dict(train=train, test=np.stack(test).astype(np.uint8),
                test_labels=np.asarray(labels, np.int32),
                masks=np.stack(masks).astype(np.uint8), defects=tuple(defects))


def write_mvtec(root, category='weave', **kwargs):
    """Writes `generate(category, **kwargs)` in MVTec's folder layout under root/category;
    returns the in-memory set."""
    from PIL import Image
    data = generate(category, **kwargs)
    cat = os.path.join(os.fspath(root), category)

    def save(array, *parts):
        path = os.path.join(cat, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(array).save(path)

    for i, image in enumerate(data['train']):
        save(image, 'train', 'good', f'{i:03d}.png')
    counts = {}
    for image, label, mask in zip(data['test'], data['test_labels'], data['masks']):
        name = 'good' if label == 0 else data['defects'][label - 1]
        i = counts[name] = counts.get(name, -1) + 1
        save(image, 'test', name, f'{i:03d}.png')
        if label:
            save(mask * 255, 'ground_truth', name, f'{i:03d}_mask.png')
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', required=True)
    parser.add_argument('--category', default='weave', choices=sorted(CATEGORIES))
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--num_train', type=int, default=64)
    parser.add_argument('--num_good_test', type=int, default=16)
    parser.add_argument('--num_per_defect', type=int, default=8)
    parser.add_argument('--defect_scale', type=float, default=1.0)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    data = write_mvtec(args.out, args.category, size=args.size, num_train=args.num_train,
                       num_good_test=args.num_good_test, num_per_defect=args.num_per_defect,
                       seed=args.seed, defect_scale=args.defect_scale)
    print(f'wrote {len(data["train"])} train and {len(data["test"])} test images to '
          f'{os.path.join(args.out, args.category)}')


if __name__ == '__main__':
    main()
