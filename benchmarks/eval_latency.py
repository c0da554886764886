"""The evaluator's cost: bank features + fit, test features, CSI scoring; prints one JSON line.

python benchmarks/eval_latency.py                      # quickstart model, 256 test x 128 bank
python benchmarks/eval_latency.py --config=configs/csi_cifar.py \\
    --num_test=10000 --num_bank=5000 --num_samples=10  # the GPU target setting

A CSI model of the config with random weights (the cost does not depend on them) and
synthetic uint8 images of the config's size. Each image is seen under K rotations
(config csi.num_shifts) x T test-time augmentations (--num_samples, default the config's
eval.num_samples), so a pass over N images is N x K x T forward passes. Timed with the
library's own functions in jaxad/evaluate.py, the way training ends and `--mode=eval` runs:

  bank_s:  evaluate.fit_scoring (bank features of --num_bank images + the scoring state)
  test_s:  evaluate.extract_features on --num_test images (host pipeline included)
  score_s: evaluate.score_features (max cosine against the bank, in blocks of test rows)

Every part runs once untimed first (compilation, including the last padded batch and the
last score block), then the median of --repeats timed runs is reported. Prints the parts,
total_s (all three), test_and_score_s (what scoring a test set costs once the bank is fit,
as at the end of training), the latency per test image, the peak device memory
(`peak_bytes_in_use`, a high-water mark of the process; null where the backend keeps no
stats, e.g. the CPU), device and versions.
Never part of the test pass/fail.
"""
import contextlib
import io
import json
import platform
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxad import evaluate, sharding
from jaxad.data import sources
from jaxad.methods import get_method

import timing  # benchmarks/timing.py (the script's own directory is on sys.path)

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/quickstart.py', 'Config file.')
_NUM_TEST = flags.DEFINE_integer('num_test', 256, 'Test images to score.')
_NUM_BANK = flags.DEFINE_integer('num_bank', 128, 'Normal training images in the feature bank.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 0, 'Test-time augmentations T '
                                    '(0: config eval.num_samples).')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Eval batch size (0: config eval.batch_size).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs of each part (median reported).')


def timed(fn, repeats):
    """(result, median seconds) of `repeats` calls of fn after one untimed call.

    The evaluator's progress lines (stderr) are swallowed.
    """
    with contextlib.redirect_stderr(io.StringIO()):
        out = jax.block_until_ready(fn())
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def measure(config, num_test, num_bank, repeats):
    method = get_method(config)
    mesh = sharding.make_mesh(config.num_devices)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    variables = jax.device_put(method.init_variables(jax.random.key(0), shape),
                               sharding.replicated(mesh))
    rng = np.random.default_rng(0)
    bank_set = sources.from_numpy(
        rng.integers(0, 256, (num_bank,) + shape, dtype=np.uint8),
        np.zeros(num_bank, np.int64), ['normal'], name='synthetic bank')
    test_set = sources.from_numpy(
        rng.integers(0, 256, (num_test,) + shape, dtype=np.uint8),
        np.zeros(num_test, np.int64), ['normal'], name='synthetic test')

    scoring, bank_s = timed(lambda: evaluate.fit_scoring(
        method, variables, bank_set, np.arange(num_bank), config=config, mesh=mesh), repeats)
    feats, test_s = timed(lambda: evaluate.extract_features(
        method, variables, test_set, np.arange(num_test), batch_size=config.eval.batch_size,
        mesh=mesh, key=evaluate.eval_test_key(config.seed)), repeats)
    # As the evaluator runs it: score_features jits method.score afresh on each call, so if
    # that jit is not cached score_s includes its trace and compile.
    scores, score_s = timed(lambda: evaluate.score_features(method, scoring, feats), repeats)
    assert all(len(s) == num_test and np.isfinite(s).all() for s in scores.values())

    k, t = method.num_shifts, method.num_samples
    total = bank_s + test_s + score_s
    return {'config': config.method, 'num_test': num_test, 'num_bank': num_bank,
            'rotations': k, 'tta_samples': t,
            'forward_passes': (num_test + num_bank) * k * t,
            'image_size': config.data.image_size, 'width': config.model.width,
            'dtype': config.model.dtype, 'eval_batch_size': config.eval.batch_size,
            'bank_s': round(bank_s, 4), 'test_s': round(test_s, 4),
            'score_s': round(score_s, 4), 'total_s': round(total, 4),
            'test_and_score_s': round(test_s + score_s, 4),
            'per_test_image_ms': round((test_s + score_s) / num_test * 1e3, 4),
            'repeats': repeats,
            'peak_memory_bytes': timing.peak_memory_bytes(list(mesh.devices.flat)),
            'device': jax.devices()[0].device_kind,
            'num_devices': mesh.devices.size, 'jax': jax.__version__,
            'host': platform.processor() or platform.machine()}


def main(argv):
    del argv
    config = _CONFIG.value
    if _NUM_SAMPLES.value:
        config.eval.num_samples = _NUM_SAMPLES.value
    if _BATCH.value:
        config.eval.batch_size = _BATCH.value
    result = measure(config, _NUM_TEST.value, _NUM_BANK.value, _REPEATS.value)
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
    app.run(main)
