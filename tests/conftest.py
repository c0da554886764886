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

# Tracing makes millions of short-lived Python objects; CPython's default collects its
# youngest generation every 700, thousands of times per test module, and the older ones
# (which hold every cached program) after them. Every 100,000: the suite's tracing took
# 207 s instead of 258 s, lowering 158 s instead of 193 s (benchmarks/suite_time.py --cost;
# jaxad.main does the same for the CLI runs the tests start).
import gc  # noqa: E402

gc.set_threshold(100_000, 50, 1000)

jax.config.update("jax_threefry_partitionable", True)


# Tests build many identical tiny programs from fresh closures (each run a new
# Setup); a persistent compilation cache shared by the xdist workers of one
# pytest run turns the repeats into cache hits.
import tempfile  # noqa: E402

_run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), f"jaxad-test-xla-cache-{_run_id}"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


# ------------------------------------------------------------------------ scheduling
# pytest.ini runs xdist with --dist loadgroup --no-loadscope-reorder: tests marked with one
# xdist_group run on one worker, every other test is scheduled on its own, in the order of
# the list that the hook below makes.

import pytest  # noqa: E402

# Module-scoped fixtures that cost a run (or several) to make. A module-scoped fixture is
# made once per xdist worker that runs one of its tests, so the tests that use one of these
# are kept on one worker (one xdist group per fixture): it is made once per pytest run.
SHARED_FIXTURES = {
    'test_accelerator_report.py': 'smoke',
    'test_checkpoint_recovery.py': 'reference',
    'test_gcs.py': 'local_run',
    'test_init.py': 'torch_params',
    'test_kill.py': 'reference',
    'test_preemption.py': 'reference',
    'test_table.py': 'separate_runs',
    'test_workdir_guard.py': 'finished',
}

# The slowest tests (node-id prefixes), slowest first, from `--durations` on a 2-core CPU:
# they start first, so the run ends on short tests instead of one worker finishing a long
# test while the other idles. An xdist group starts where its first test stands. The order
# only affects how long the run takes, never what a test checks.
SLOWEST_FIRST = (
    'test_table.py::test_stacked_table_equals_separate_runs',
    'test_preemption.py::test_table_stops_in_its_group_and_resumes_there',
    'test_recontrast_train.py::test_end_to_end_on_the_synthetic_set_localises_defects',
    'test_multihost.py::test_two_processes_match_one_process_two_devices_through_a_preemption',
    'test_gcs.py::test_run_on_gcs_equals_local_then_eval_predict_calibrate_export',
    'test_kill.py::test_kill_9_between_checkpoints_then_rerun_equals_uninterrupted',
    'test_table.py::test_interrupted_table_equals_uninterrupted_and_eval_mode',
    'test_accelerator_report.py::test_every_section_ran',
    'test_gcs.py::test_two_processes_on_gcs_sigterm_to_one_both_save_the_same_step',
    'test_preemption.py::test_sigterm_checkpoints_the_step_in_flight',
    'test_notebooks.py::test_scaling_study_runs_on_cpu',
    'test_gcs.py::test_kill_9_on_gcs_resumes_exactly',
    'test_gcs.py::test_a_one_class_table_on_gcs_equals_the_local_table',
    'test_lowering.py::test_every_method_lowers[recontrast]',
    'test_conformance.py::test_registered_method_conforms[recontrast]',
    'test_conformance.py::test_registered_method_conforms[self_oecl]',
    'test_table.py::test_digits_all_writes_ten_row_table',
    'test_notebooks.py::test_quickstart_runs_on_cpu_with_a_gcs_workdir',
    'test_checkpoint_recovery.py::test_table_group_survives_damaged_state_and_scoring',
    'test_precision.py::test_bf16_loss_within_tolerance_of_float32',
    'test_gcs.py::test_sigterm_on_gcs_saves_the_step_in_flight',
    'test_msc.py::test_starts_from_another_run_and_resumes_with_the_same_centre',
    'test_preemption.py::test_benchmark_script_reports_the_stop',
    'test_msc.py::test_table_members_get_their_own_centres',
    'test_train.py::test_resume_equals_uninterrupted',
    'test_oecl.py::test_train_and_evaluate_end_to_end',
    'test_mcl.py::test_end_to_end_one_class_and_labelled',
    'test_lowering.py::test_every_method_lowers[csi]',
    'test_train.py::test_end_to_end_writes_results_and_eval_mode_reuses_checkpoint',
    'test_weak_scaling.py::test_sweep_over_one_and_two_emulated_devices',
    'test_anomem.py::test_one_class_table_with_anomaly_maps',
    'test_anomem.py::test_few_anomaly_end_to_end',
    'test_workdir_guard.py::test_table_groups_are_bound_to_their_config',
    'test_train.py::test_restore_builds_no_initial_state',
    'test_preemption.py::test_table_notice_between_groups_starts_no_further_group',
    'test_conformance.py::test_registered_method_conforms[csi]',
    'test_conformance.py::test_registered_method_conforms[oecl]',
    'test_benchmark_scripts.py::test_step_analysis_stack_memory',
    'test_lowering.py',
    'test_conformance.py',
)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        module = os.path.basename(str(item.path))
        fixture = SHARED_FIXTURES.get(module)
        if fixture and fixture in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group(f'{module}::{fixture}'))

    def rank(item):
        nodeid = item.nodeid.split('tests/', 1)[-1]
        return next((i for i, prefix in enumerate(SLOWEST_FIRST) if nodeid.startswith(prefix)),
                    len(SLOWEST_FIRST))
    items.sort(key=rank)  # stable: the rest keep their order


def pytest_configure(config):
    """Under `-n N --dist loadgroup` (pytest.ini), pytest-xdist names each grouped test's group
    by appending '@group' to the test's node id (`Item._nodeid`), and schedules each group on
    one worker. pytest 9.2 keeps node ids elsewhere (`Item._id`), so with pytest-xdist 3.8 no
    test is grouped and every group's expensive fixture (SHARED_FIXTURES) is built once per
    worker: minutes slower, silently. setup.py's test extras keep pytest below 9.2; a pytest
    outside them stops here, saying what to install."""
    if getattr(config.option, 'dist', 'no') != 'loadgroup' or not getattr(
            config.option, 'numprocesses', None):
        return
    from _pytest import nodes
    if '_nodeid' not in getattr(nodes.Node, '__slots__', ()):
        from importlib import metadata
        raise pytest.UsageError(
            f'pytest {pytest.__version__} with pytest-xdist {metadata.version("pytest-xdist")} '
            'does not group tests under --dist loadgroup (each shared fixture would be built '
            "on every worker); install the test extras' range: pip install -e '.[test]'")
