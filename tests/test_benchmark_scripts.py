"""benchmarks/step_analysis.py and benchmarks/input_throughput.py run and report their
fields (tiny sizes; not timing tests)."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import CHILD_XLA_FLAGS

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA:CPU's cheap compile mode (the conftest's): these tests check the reports, not speed.
_ENV = dict(os.environ, XLA_FLAGS=CHILD_XLA_FLAGS + ' --xla_llvm_disable_expensive_passes=true',
            JAX_PLATFORMS='cpu')


def _run(args, timeout=300):
    proc = subprocess.run([sys.executable] + args, capture_output=True, text=True, cwd=_ROOT,
                          env=_ENV, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]


_TINY = ['benchmarks/step_analysis.py', '--config=configs/quickstart.py',
         '--config.model.name=resnet10', '--config.model.width=4', '--config.data.image_size=8']


def test_step_analysis_reports_flops_and_memory():
    lines = _run(_TINY + ['--batch_sizes=4', '--conv_impls=xla', '--breakdown=false',
                          '--stack_k=0'])
    assert len(lines) == 1
    step = lines[0]
    assert step['kind'] == 'step' and step['device'] == 'cpu'
    assert step['jax'] and step['flax'] and step['grain']
    assert step['batch_size'] == 4 and step['views'] == 4 * 2 * 4
    assert step['conv_impl'] == 'xla' and step['model'] == 'resnet10' and step['width'] == 4
    assert step['xla_flops'] > 0
    # 3 x forward of resnet10 width 4 at 8x8 over 32 views, convs + dense (flops.py).
    assert step['analytic_step_dense'] == 3 * 32 * step['analytic_forward_per_view_dense']
    assert step['ratio_xla_over_analytic_dense'] == round(
        step['xla_flops'] / step['analytic_step_dense'], 4)
    # This tiny net is mostly elementwise work, yet XLA's count stays near the analytic one.
    assert 0.5 < step['ratio_xla_over_analytic_dense'] < 2
    assert step['total_bytes'] == (step['argument_bytes'] + step['output_bytes']
                                   - step['alias_bytes'] + step['temp_bytes']
                                   + step['generated_code_bytes'])
    assert step['alias_bytes'] > 0  # the state is donated
    assert step['argument_bytes'] > 4 * step['num_params']  # params + LARS momentum
    assert step['fits_h100_80GiB'] and step['fits_tpu_v5e_16GiB']


def test_step_analysis_stack_memory():
    lines = _run(_TINY + ['--batch_sizes=', '--stack_k=2', '--stack_batch_sizes=4'])
    assert len(lines) == 1
    stack = lines[0]
    assert stack['kind'] == 'stack' and stack['device'] == 'cpu'
    assert stack['k'] == 2 and stack['mode'] == 'vmap' and stack['batch_per_member'] == 4
    assert stack['k2']['total_bytes'] > stack['k1']['total_bytes'] > 0
    assert stack['k2']['argument_bytes'] == 2 * stack['k1']['argument_bytes']  # state x 2
    assert stack['per_member_bytes'] == stack['k2']['total_bytes'] - stack['k1']['total_bytes']
    assert stack['largest_k_tpu_v5e_16GiB'] > 1000  # a few MB per member


def test_input_throughput_on_synthetic_images():
    lines = _run(['benchmarks/input_throughput.py', '--source=synthetic', '--num_images=1000',
                  '--image_size=8', '--global_batch=32', '--batches=5', '--warmup=1',
                  '--cores=1', '--read_threads=1', '--stack=2'])
    load, run = lines
    assert load['kind'] == 'load' and load['images'] == 1000 and load['image_shape'] == [8, 8, 3]
    assert run['kind'] == 'input' and 'error' not in run, run
    assert run['cores'] == 1 and len(run['cpus']) == 1 and run['read_threads'] == 1
    assert run['global_batch'] == 32 and run['normal_images'] == 100  # class 0 of 10
    assert run['batch_keys'] == ['image'] and run['batch_dtype'] == 'uint8'
    assert run['stack'] == 2
    for key in ('pipeline_images_per_s', 'with_copy_images_per_s', 'gather_images_per_s',
                'copy_images_per_s', 'on_device_images_per_s',
                'stack_host_with_copy_images_per_s', 'stack_on_device_images_per_s'):
        assert run[key] > 0, (key, run)
    assert len(run['loadavg_before']) == 3 and run['device'] == 'cpu'


def test_e2e_floors_lists_every_floor_test_it_measures():
    """benchmarks/e2e_floors.py --list (no jax, no run): every registered test exists, with
    the builder the script calls, and the floors it checks are the tests' own."""
    import importlib
    sys.path.insert(0, os.path.join(_ROOT, 'benchmarks'))
    try:
        e2e = importlib.import_module('e2e_floors')
    finally:
        sys.path.pop(0)
    lines = _run(['benchmarks/e2e_floors.py', '--list'], timeout=60)
    assert [x['name'] for x in lines] == list(e2e.ORDER)
    assert sorted(e2e.REGISTRY) == sorted(e2e.ORDER)
    for line in lines:
        path, _, test = line['test'].partition('::')
        source = open(os.path.join(_ROOT, path)).read()
        assert f'def {test.split("[")[0]}(' in source, line['test']
        assert line['test_seed'] in line['seeds']
        assert {'trained', 'untrained'} <= set(line['modes'])
        for m in line['metrics']:
            assert m['op'] in ('>=', '>', '<') and m['modes']
    floors = {x['name']: [m['floor'] for m in x['metrics']] for x in lines}
    assert floors['csi'] == [0.85] and floors['recontrast'] == [0.85, 0.85, 0.5]
    assert floors['anomem_few'] == [0.75] and floors['mcl'] == [0.9, 0.8]
    assert (floors['oecl'], floors['self_oecl'], floors['msc']) == ([0.85], [0.9], [0.9, 1e-3])
    assert floors['quickstart_notebook'] == [0.0]  # no floor (tests/test_notebooks.py)


def test_compare_commits_window_rate(tmp_path):
    """benchmarks/compare_commits.py's figure: images over the window's log intervals (each
    line's steps_per_sec covers the steps since the previous line), by hand: steps 20-30 at
    2 steps/s (5 s) and 30-40 at 1 step/s (10 s) are 20 steps x 4 images in 15 s."""
    sys.path.insert(0, os.path.join(_ROOT, 'benchmarks'))
    try:
        import compare_commits
    finally:
        sys.path.pop(0)
    path = tmp_path / 'metrics.jsonl'
    path.write_text('\n'.join(json.dumps({'step': s, 'steps_per_sec': r})
                              for s, r in [(10, 9.0), (20, 5.0), (30, 2.0), (40, 1.0)]))
    assert compare_commits.window_rate(path, 20, 40, batch_size=4) == 80 / 15
    with pytest.raises(ValueError, match='not a logged step'):
        compare_commits.window_rate(path, 25, 40, batch_size=4)
    with pytest.raises(ValueError, match='last logged step 40'):
        compare_commits.window_rate(path, 20, 50, batch_size=4)


def test_step_ab_applies_each_side_its_setting():
    """Two BatchNorm variants of one tiny step: the sides differ in their XLA FLOP count
    (the unbiased layer takes the two-pass variance, flax's biased one a one-pass variance),
    which shows each side's setting reached the model it timed."""
    lines = _run(['benchmarks/step_ab.py', '--config=configs/quickstart.py',
                  '--config.model.name=resnet10', '--config.model.width=4',
                  '--config.data.image_size=8', '--batch_size=4', '--rounds=2',
                  '--steps_per_round=1', '--a=model.bn_running_var=unbiased',
                  '--b=model.bn_running_var=biased'])
    assert len(lines) == 1
    out = lines[0]
    assert out['a']['settings'] == ['model.bn_running_var=unbiased']
    assert out['b']['settings'] == ['model.bn_running_var=biased']
    assert out['a']['flops_per_step'] > out['b']['flops_per_step'] > 0
    assert len(out['b_over_a_step_time']) == 2 and out['median_b_over_a'] > 0


def test_step_ab_refuses_an_unknown_setting():
    """A mistyped key is an error naming it (as `--config.key=value` is on the command
    line), not a new field that the timed model never reads."""
    proc = subprocess.run([sys.executable, 'benchmarks/step_ab.py',
                           '--config=configs/quickstart.py', '--a=model.bn_runing_var=biased'],
                          capture_output=True, text=True, cwd=_ROOT, env=_ENV, timeout=300)
    assert proc.returncode != 0
    assert "unknown config field 'model.bn_runing_var'" in proc.stderr, proc.stderr[-2000:]


def test_feature_knn_throughput_reports_features_and_bank_scoring():
    lines = _run(['benchmarks/feature_knn_throughput.py', '--arch=vit_small', '--patch=8',
                  '--image_size=16', '--batch=2', '--batches=1', '--bank_sizes=10,40',
                  '--test_images=2'])
    features, *banks = lines
    assert features['kind'] == 'features' and features['patch_grid'] == [2, 2]
    assert features['width'] == 384 and features['images_per_s'] > 0
    assert [b['bank_patches'] for b in banks] == [10, 40]
    assert all(b['kind'] == 'patch_bank_scoring' and b['ms_per_test_image'] > 0 for b in banks)


def test_suite_time_reports_wall_cpu_and_modules():
    """benchmarks/suite_time.py on a small test file (27 tests) and one jax test: its pass line,
    per-module and per-test times (from --durations), the CPU seconds of pytest's processes,
    with --calibrate the fixed workload's CPU seconds before and after, and with --cost each
    test's CPU and jax work (suite_cost_plugin.py): the jax test's eagerly run ops are small
    XLA compiles, the NumPy-only file compiles nothing."""
    jax_test = 'tests/test_losses.py::test_ntxent_without_eps_is_simclr'
    report, = _run(['benchmarks/suite_time.py', '--workers=1', '--top=3', '--cost',
                    '--programs', '--calibrate',
                    f'--pytest_args=tests/test_metrics.py {jax_test}'])
    assert report['returncode'] == 0 and report['summary'].startswith('28 passed'), report
    assert sorted(report['modules']) == ['tests/test_losses.py', 'tests/test_metrics.py']
    assert 0 < report['summed_test_s'] <= report['wall_s']
    assert len(report['slowest']) == 3
    assert report['cpu_s'] >= report['cpu_user_s'] > 0
    # the fixed workload ran before and after the tests: a CPU time each
    assert sorted(report['calibration_cpu_s']) == ['after', 'before']
    assert all(t > 0 for t in report['calibration_cpu_s'].values())
    cost = report['cost']
    assert cost['tests'] == 28 and 0 < cost['totals']['cpu_s'] <= report['cpu_s']
    losses = cost['modules']['tests/test_losses.py']
    metrics = cost['modules']['tests/test_metrics.py']
    assert losses['compiles'] >= losses['small_compiles'] > 0 and losses['compile_s'] > 0
    assert losses['trace_s'] > 0 and losses['lower_s'] > 0
    assert metrics['compiles'] == 0 and metrics['compile_s'] == 0
    assert cost['totals']['compiles'] == losses['compiles']
    # eager ops only: nothing of SMALL_S or more was compiled, so no program was fingerprinted
    assert losses['programs'] == 0 and losses['cache_hits'] <= losses['compiles']
    assert report['programs']['compiles'] == 0
    assert report['programs']['distinct'] == {'count': 0, 'compile_s': 0}


def test_suite_cost_counts_programs_up_to_scalar_constants(tmp_path):
    """suite_cost_plugin's fingerprints and suite_time's summary of them, on module texts
    and records written by hand: two programs that differ in one scalar constant (a learning
    rate) are two programs, and one when scalars are blanked; source locations are ignored;
    a cache hit is not a compile from scratch."""
    sys.path.insert(0, os.path.join(_ROOT, 'benchmarks'))
    try:
        import suite_cost_plugin
        import suite_time
    finally:
        sys.path.pop(0)
    body = ('func.func public @main(%arg0: tensor<4xf32> loc("a.py":1:0)) -> tensor<4xf32> {{\n'
            '  %cst = stablehlo.constant dense<{lr}> : tensor<f32> loc("{where}":2:0)\n'
            '  %0 = stablehlo.constant dense<[1.0, 2.0, 3.0, 4.0]> : tensor<4xf32>\n')
    lr1, lr1_elsewhere, lr2 = (suite_cost_plugin._fingerprints(body.format(lr=lr, where=w))
                               for lr, w in [('1.0e-01', 'x.py'), ('1.0e-01', 'y.py'),
                                             ('5.0e-01', 'x.py')])
    assert lr1 == lr1_elsewhere  # locations
    assert lr1[0] != lr2[0] and lr1[1] == lr2[1]  # exact / scalars blanked
    vector = suite_cost_plugin._fingerprints(body.format(lr='1.0e-01', where='x.py')
                                             .replace('3.0', '9.0'))
    assert vector[1] != lr1[1]  # a constant array is not a scalar
    rows = [dict(name='step', hit=False, s=2.0, exact=lr1[0], scalars=lr1[1]),
            dict(name='step', hit=False, s=3.0, exact=lr2[0], scalars=lr2[1]),
            dict(name='step', hit=True, s=0.5, exact=lr2[0], scalars=lr2[1])]
    (tmp_path / 'programs-1.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    assert suite_time.summarize_programs(str(tmp_path)) == {
        'compiles': 3, 'compile_s': 5.5, 'cache_hits': 1, 'cache_hit_s': 0.5,
        'distinct': {'count': 2, 'compile_s': 5.0},
        'distinct_ignoring_scalars': {'count': 1, 'compile_s': 3.0}}
