"""Train-step time of one config under two settings, alternating in one process.

    python benchmarks/step_ab.py --config=configs/csi_fmnist.py:normal_class=5,width=16 \
        --a=model.bn_running_var=unbiased --b=model.bn_running_var=biased \
        [--batch_size=32] [--rounds=10] [--steps_per_round=10]

Both settings' train steps are built and compiled first (synthetic uint8 images of the
config's size; the step's cost does not depend on pixel values), warmed up, then timed in
rounds of `--steps_per_round` steps, A then B in even rounds and B then A in odd ones, so
both see the same drift of a shared machine. Prints one JSON object: each side's median
seconds per step and XLA FLOP count, and B/A per round with its median. Finer-grained than
compare_commits.py (no data pipeline, no logging), for a cost inside the step.
"""
import json
import os
import statistics
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

import timing  # benchmarks/timing.py (the script's own directory is on sys.path)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch import sweep  # noqa: E402  (the checkout's typed --config.k=v overrides)

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/csi_fmnist.py', 'Config file.')
_A = flags.DEFINE_multi_string('a', [], 'Setting of side A, key=value (repeatable).')
_B = flags.DEFINE_multi_string('b', [], 'Setting of side B, key=value (repeatable).')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Global batch size (images per step).')
_ROUNDS = flags.DEFINE_integer('rounds', 10, 'Timed rounds (each side once per round).')
_PER_ROUND = flags.DEFINE_integer('steps_per_round', 10, 'Steps per side and round.')


def with_settings(config, settings):
    """A copy of `config` with each 'dotted.key=value' typed as `--config.key=value` types
    it; an unknown field is an error (a mistyped key would otherwise time nothing new)."""
    return sweep.apply_overrides(config, dict(s.split('=', 1) for s in settings))


def run_steps(side, n):
    """Seconds per step over `n` steps of `side` (a dict holding compiled, state, batch, rng);
    the state moves on, as in training."""
    t0 = time.perf_counter()
    state = side['state']
    for _ in range(n):
        state, metrics = side['compiled'](state, side['batch'], side['rng'])
    jax.block_until_ready((state, metrics))
    side['state'] = state
    return (time.perf_counter() - t0) / n


def main(argv):
    del argv
    sides = {}
    for name, settings in (('a', _A.value), ('b', _B.value)):
        built = timing.compiled_train_step(with_settings(_CONFIG.value, settings),
                                           _BATCH.value)
        sides[name] = dict(compiled=built.compiled, state=built.state, batch=built.batch,
                           rng=built.rng, flops=timing.compiled_flops(built.compiled),
                           settings=settings, times=[])
        run_steps(sides[name], 3)  # warm-up
    for r in range(_ROUNDS.value):
        for name in ('a', 'b') if r % 2 == 0 else ('b', 'a'):
            sides[name]['times'].append(run_steps(sides[name], _PER_ROUND.value))
    ratios = [b / a for a, b in zip(sides['a']['times'], sides['b']['times'])]
    print(json.dumps({
        'config': _CONFIG.value.method, 'batch_size': _BATCH.value,
        'rounds': _ROUNDS.value, 'steps_per_round': _PER_ROUND.value,
        **{name: {'settings': s['settings'], 'flops_per_step': s['flops'],
                  'median_step_s': round(statistics.median(s['times']), 4)}
           for name, s in sides.items()},
        'b_over_a_step_time': [round(x, 3) for x in ratios],
        'median_b_over_a': round(statistics.median(ratios), 3),
        'device': jax.devices()[0].device_kind, 'jax': jax.__version__}), flush=True)


if __name__ == '__main__':
    app.run(main)
