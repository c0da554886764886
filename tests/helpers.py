"""Tiny synthetic data, configs and skip rules shared by the tests."""
import collections
import contextlib
import logging
import os
import re
import tempfile

import numpy as np
import pytest

from jaxad import config as jc

# XLA flags for test subprocesses that set their own: the conftest's cheap compile modes
# (unoptimised backend, and the faster kernel codegen where this jaxlib has the flag).
CHILD_XLA_FLAGS = ('--xla_backend_optimization_level=0 '
                   + os.environ.get('JAXAD_TEST_FAST_COMPILE', '')).strip()

# One persistent compilation cache for the whole pytest run: the xdist workers (conftest.py)
# and every test subprocess. The tests' CLI runs compile the same tiny programs again and
# again (the cache key holds the XLA flags and devices, so differently set-up processes
# never share an entry); a run-wide cache compiles each once per run, not once per module.
XLA_CACHE_DIR = os.path.join(
    tempfile.gettempdir(),
    f"jaxad-test-xla-cache-{os.environ.get('PYTEST_XDIST_TESTRUNUID', str(os.getpid()))}")
# Environment variables that point a test subprocess at that cache.
CHILD_CACHE_ENV = {'JAX_COMPILATION_CACHE_DIR': XLA_CACHE_DIR,
                   'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}


def make_npz(path, n_per_class=16, num_classes=3, size=8, seed=0):
    """Classes differ in mean brightness and a stripe, so CSI can separate them."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (('train', n_per_class), ('test', n_per_class // 2)):
        images, labels = [], []
        for c in range(num_classes):
            x = rng.integers(0, 60, size=(n, size, size, 3)) + 60 * c
            x[:, :, c % size] = 255
            images.append(x.astype(np.uint8))
            labels.append(np.full(n, c))
        out[f'{split}_images'] = np.concatenate(images)
        out[f'{split}_labels'] = np.concatenate(labels)
    np.savez(path, **out)
    return path


def set_fields(c, **overrides):
    """`c` with dotted fields set: set_fields(c, **{'model.width': 8})."""
    for key, value in overrides.items():
        *parents, leaf = key.split('.')
        target = c
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def tiny_config(npz_path, **overrides):
    c = jc.csi_base()
    c.data.source = 'numpy'
    c.data.numpy_path = str(npz_path)
    c.data.image_size = 8
    c.data.normal_classes = (0,)
    c.model.name = 'resnet10'  # one block per stage: half ResNet-18's compile time
    c.model.width = 4
    c.model.proj_dim = 8
    c.batch_size = 8
    c.total_steps = 4
    c.log_every = 2
    c.optim.warmup_epochs = 1
    c.optim.epochs = 4
    c.eval.batch_size = 16
    c.eval.num_samples = 2
    c.checkpoint.every_steps = 2
    c.checkpoint.use_async = False
    return set_fields(c, **overrides)


# The CIFAR-10 JPEG archive of this project's machines and CI, beside the checkout. Only tests
# read it, always passing it explicitly (no config or jaxad default points outside the
# repository); tests that need it skip off CI when it is not there.
CIFAR_TAR = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', 'shared',
                                         'data', 'cifar10-jpg.tar.gz'))

# On CI (CI=true) optional reference data and torch are installed by .ci/run,
# so a missing one is a failure there, not a skip.
ON_CI = bool(os.environ.get('CI'))


def skip_unless_on_ci(condition, reason):
    """`skipif(condition)` off CI; on CI the test runs (and fails if the input is missing)."""
    return pytest.mark.skipif(condition and not ON_CI, reason=reason)


def import_torch():
    """torch, or a skip off CI when it is not installed."""
    if ON_CI:
        import torch
        return torch
    return pytest.importorskip('torch')


def make_rotated_npz(path, rotations=(0, -1, -2), n_per_class=16, size=8, tint=(0.3, 1.0),
                     seed=0):
    """End-to-end data on which training, not the random init, separates the classes.

    Class c is one pattern turned by np.rot90(k=rotations[c]): uniform noise in [0, 100)
    with a saturated top row, the whole image times a random tint in [tint[0], tint[1]] per
    image and channel (tint=None: no tint). The classes share their brightness and colour
    statistics, so a randomly initialised network scores them nearer chance (unlike
    make_npz, whose classes differ in brightness and which an untrained network already
    separates); a network that learns orientation separates them. Same layout as
    make_npz: n_per_class training and n_per_class // 2 test images per class.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (('train', n_per_class), ('test', n_per_class // 2)):
        images, labels = [], []
        for c, k in enumerate(rotations):
            x = rng.integers(0, 100, size=(n, size, size, 3)).astype(np.float64)
            x[:, 0] = 255
            if tint is not None:
                x = x * rng.uniform(tint[0], tint[1], size=(n, 1, 1, 3))
            images.append(np.round(np.rot90(x, k=k, axes=(1, 2))).astype(np.uint8))
            labels.append(np.full(n, c))
        out[f'{split}_images'] = np.concatenate(images)
        out[f'{split}_labels'] = np.concatenate(labels)
    np.savez(path, **out)
    return path


class Preempted(Exception):
    """Stands in for a job killed mid-run (after its step-2 checkpoint)."""


def preempt_after_step(monkeypatch, step):
    """Makes the next training run raise Preempted right after logging `step` (log_every=1
    to hit it); returns a function that undoes it."""
    from jaxad import writers
    real_write = writers.MetricWriter.write

    def write_then_stop(self, at, metrics):
        real_write(self, at, metrics)
        if at == step:
            raise Preempted(f'simulated preemption after step {step}')
    monkeypatch.setattr(writers.MetricWriter, 'write', write_then_stop)
    return lambda: monkeypatch.setattr(writers.MetricWriter, 'write', real_write)


class CompileLog(logging.Handler):
    """Every XLA compilation while active: `programs` is a Counter of (program name, its
    argument shapes, dtypes and shardings) as jax's compile log states them."""

    def __init__(self):
        super().__init__()
        self.programs = collections.Counter()

    def emit(self, record):
        match = re.match(r'Compiling jit\((.+?)\) with global shapes and types (.*)',
                         record.getMessage(), re.S)
        if match:
            self.programs[match.groups()] += 1

    def count(self, name):
        """Compilations of program `name` (any shapes)."""
        return sum(n for (program, _), n in self.programs.items() if program == name)

    def repeated(self, names):
        """Programs among `names` compiled more than once for the same arguments (each a
        wasted compile). Eager primitives are left out: one name stands for programs with
        other static parameters (jnp.ones(3) and jnp.ones(4) both compile broadcast_in_dim
        of a scalar)."""
        return {name: n for (name, _), n in self.programs.items() if n > 1 and name in names}


@contextlib.contextmanager
def compile_log():
    """`with compile_log() as log:` records the XLA compilations of the block (jax's
    `jax_log_compiles` messages)."""
    import jax
    log = CompileLog()
    logger = logging.getLogger('jax')
    previous = jax.config.jax_log_compiles
    jax.config.update('jax_log_compiles', True)
    logger.addHandler(log)
    try:
        yield log
    finally:
        logger.removeHandler(log)
        jax.config.update('jax_log_compiles', previous)
