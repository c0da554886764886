"""Test set-up: 8 emulated CPU devices, set before jax is imported anywhere."""
import os
import subprocess
import sys

# XLA:CPU's older (non-"fusion emitter") kernel codegen compiles the tests' programs about
# 2x faster: a tiny train step 4.6 -> 2.0 s, the same loss to the printed digit. A jaxlib
# that no longer knows the flag would abort on it, so a child process tries it once; the
# result travels to xdist workers and test subprocesses in JAXAD_TEST_FAST_COMPILE.
_FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false"
if "JAXAD_TEST_FAST_COMPILE" not in os.environ:
    _probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
        env=dict(os.environ, XLA_FLAGS=_FAST_COMPILE, JAX_PLATFORMS="cpu"))
    os.environ["JAXAD_TEST_FAST_COMPILE"] = _FAST_COMPILE if _probe.returncode == 0 else ""

# The unoptimised XLA:CPU backend compiles the many tiny test programs about 3x faster;
# the tests check values, not speed (benchmarks/ measure speed with the default flags).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 " + os.environ["JAXAD_TEST_FAST_COMPILE"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_threefry_partitionable", True)


# Tests build many identical tiny programs from fresh closures (each run a new
# Setup); a persistent compilation cache shared by the xdist workers of one
# pytest run turns the repeats into cache hits.
import tempfile  # noqa: E402

_run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), f"jaxad-test-xla-cache-{_run_id}"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
