"""feature_knn on this machine: the ViT encoder's feature images/s, and the patch-bank
scorer's cost as the memory bank grows.

python benchmarks/feature_knn_throughput.py --arch=vit_small --patch=14 --image_size=224 \
    --batch=8 --batches=5 --bank_sizes=1000,10000,100000 --test_images=8

Features: `FeatureKNN.features` of the `vit` encoder (random weights of `--arch`, patch
`--patch`; the class token and the patch tokens, as patch_maps uses them), jitted as the
evaluator jits it (`jaxad.evaluate.make_feature_fn`, one device), `--batches` timed batches of
uint8 images after one compile: images/s. Scoring: `FeatureKNN.score` with patch maps, a
memory bank of each size in `--bank_sizes` (random features of the ViT's width), the
patches of `--test_images` images scored against it (kNN blockwise, jaxad.density): ms per
test image. One JSON line per measurement, each with the load average before and after.
Never part of the test pass/fail.
"""
import argparse
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--arch', default='vit_small')
    p.add_argument('--patch', type=int, default=14)
    p.add_argument('--image_size', type=int, default=224)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--batches', type=int, default=5)
    p.add_argument('--bank_sizes', default='1000,10000,100000')
    p.add_argument('--test_images', type=int, default=8)
    a = p.parse_args(argv)

    import jax
    import numpy as np
    from jaxad import config as jc
    from jaxad import evaluate as eval_lib
    from jaxad import sharding
    from jaxad.methods import get_method

    c = jc.base_config('feature_knn')
    c.data.image_size = a.image_size
    c.feature_knn.update(encoder='vit', vit=a.arch, patch=a.patch, patch_maps=True)
    method = get_method(c)
    mesh = sharding.make_mesh(1)
    variables = jax.jit(lambda: method.init_variables(jax.random.key(0),
                                                      (a.image_size, a.image_size, 3)))()
    features = eval_lib.make_feature_fn(method, mesh)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (a.batch, a.image_size, a.image_size, 3), dtype=np.uint8)
    index = np.arange(a.batch, dtype=np.int32)
    key = jax.random.key(0)
    load = os.getloadavg()
    t0 = time.perf_counter()
    out = jax.block_until_ready(features(variables, images, index, key))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(a.batches):
        out = features(variables, images, index, key)
    jax.block_until_ready(out)
    seconds = time.perf_counter() - t0
    grid = out['patches'].shape[1:3]
    print(json.dumps({
        'kind': 'features', 'arch': a.arch, 'patch': a.patch, 'image_size': a.image_size,
        'batch': a.batch, 'batches_timed': a.batches, 'patch_grid': list(grid),
        'width': int(out['feat'].shape[-1]), 'compile_s': round(compile_s, 2),
        'images_per_s': round(a.batch * a.batches / seconds, 2),
        'loadavg_before': [round(x, 2) for x in load],
        'loadavg_after': [round(x, 2) for x in os.getloadavg()],
        'device': jax.devices()[0].device_kind, 'jax': jax.__version__}), flush=True)

    width = int(out['feat'].shape[-1])
    test = {'feat': rng.normal(size=(a.test_images, width)).astype(np.float32),
            'patches': rng.normal(size=(a.test_images,) + tuple(grid) + (width,))
            .astype(np.float32)}
    score = jax.jit(method.score)
    for size in (int(s) for s in a.bank_sizes.split(',')):
        scoring = {'bank': rng.normal(size=(64, width)).astype(np.float32),
                   'patch_bank': rng.normal(size=(size, width)).astype(np.float32)}
        load = os.getloadavg()
        jax.block_until_ready(score(scoring, test))  # compile
        t0 = time.perf_counter()
        jax.block_until_ready(score(scoring, test))
        seconds = time.perf_counter() - t0
        print(json.dumps({
            'kind': 'patch_bank_scoring', 'bank_patches': size, 'width': width,
            'test_images': a.test_images, 'patches_per_image': int(np.prod(grid)),
            'ms_per_test_image': round(1000 * seconds / a.test_images, 3),
            'loadavg_before': [round(x, 2) for x in load],
            'loadavg_after': [round(x, 2) for x in os.getloadavg()]}), flush=True)


if __name__ == '__main__':
    main()
