"""benchmarks/accelerator_report.py: --smoke runs every section and writes both files.

Not a timing test: the smoke sizes measure nothing. It checks that each section's child runs
on the CPU and that its numbers land in report.json and report.md, and that a failed section
is reported without losing the others.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import CHILD_XLA_FLAGS, ON_CI

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PATH = os.path.join(_ROOT, 'benchmarks', 'accelerator_report.py')
SECTIONS = ('torch', 'device', 'train_float32', 'train_bfloat16', 'eval', 'stacked', 'run')
HAS_TORCH = importlib.util.find_spec('torch') is not None


def _report(out, *args):
    # One CPU device (not conftest's 8) and XLA:CPU's cheap compile mode.
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=CHILD_XLA_FLAGS + ' --xla_llvm_disable_expensive_passes=true')
    return subprocess.run([sys.executable, _PATH, f'--out={out}', *args], capture_output=True,
                          text=True, cwd=_ROOT, env=env, timeout=900)


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp('report')
    proc = _report(out, '--smoke')
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / 'report.json') as f:
        report = json.load(f)
    return report, (out / 'report.md').read_text(), proc.stderr


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_section_ran(smoke):
    report, _, stderr = smoke
    sections = report['sections']
    assert tuple(sections) == SECTIONS and report['failures'] == []
    assert report['meta']['smoke'] is True
    for name in SECTIONS:
        assert f'{name}: start' in stderr  # progress lines
        if name == 'torch' and not HAS_TORCH and not ON_CI:
            assert sections[name] == {'status': 'skipped', 'reason': 'skipped: torch not '
                                      'installed', 'wall_s': sections[name]['wall_s']}
        else:
            assert sections[name]['status'] == 'ok', (name, sections[name])
    device = sections['device']
    assert device['backend'] == 'cpu' and device['num_devices'] == 1
    assert device['versions']['jax'] and device['versions']['flax']


def test_train_step_table(smoke):
    report, _, _ = smoke
    rows = report['train_step']['rows']
    jaxad = {r['precision']: r for r in rows if r['impl'] == 'jaxad'}
    assert set(jaxad) == {'float32', 'bfloat16'}
    for r in jaxad.values():
        for key in ('images_per_s', 'step_ms', 'compile_s', 'flops_per_step', 'tflops_per_s'):
            assert _positive(r[key]), (key, r)
        # The CPU has no entry in timing.PEAK_TFLOPS and no memory stats.
        assert r['mfu'] is None and r['peak_memory_bytes'] is None
    torch_rows = [r for r in rows if r['impl'] == 'torch']
    if HAS_TORCH or ON_CI:
        # On the CPU: one float32 row, the same step (views, parameters) as jaxad's.
        assert [r['precision'] for r in torch_rows] == ['float32'], torch_rows
        assert _positive(torch_rows[0]['images_per_s'])
        assert _positive(report['train_step']['jaxad_over_torch']['float32'])
    else:
        assert torch_rows == []


def test_eval_stacked_memory(smoke):
    report, _, _ = smoke
    e = report['sections']['eval']['result']
    assert (e['num_test'], e['num_bank'], e['rotations'], e['tta_samples']) == (16, 8, 4, 2)
    for key in ('bank_s', 'test_s', 'test_and_score_s', 'per_test_image_ms'):
        assert _positive(e[key]), (key, e)
    stacked = report['sections']['stacked']
    assert stacked['k1']['k'] == 1 and stacked['k']['k'] == 2 and stacked['k']['mode'] == 'vmap'
    assert _positive(stacked['k']['images_per_s']) and _positive(stacked['k_over_1'])
    memory = report['peak_memory']
    assert len(memory) >= 4 and all(v is None for v in memory.values())  # CPU: no stats


def test_run_loss_curve(smoke):
    report, _, _ = smoke
    run = report['sections']['run']
    curve = run['loss_curve']
    assert len(curve) >= 2 and len(curve) == run['total_steps'] // run['log_every']
    assert [c['step'] for c in curve] == sorted(c['step'] for c in curve)
    assert all(math.isfinite(c['loss']) for c in curve)
    assert 0.0 <= run['results']['image_AUROC'] <= 1.0


def test_markdown_has_the_tables(smoke):
    _, md, _ = smoke
    assert 'Smoke run (--smoke)' in md
    for heading in ('## Device', '## Train step', '## Eval latency', '## Stacked',
                    '## Peak device memory', '## Short run', '## Failures'):
        assert heading in md
    for header in ('| impl | precision | device | images/s | step ms |',
                   '| bank + fit s | test features s |', '| K | mode |', '| what | peak |',
                   '| step | loss | lr | images/s |'):
        assert header in md
    assert '| jaxad | float32 |' in md and '| jaxad | bfloat16 |' in md


def test_failed_sections_are_reported(tmp_path):
    # A child that fails (an unknown model) and a run without data: both are error lines,
    # the report is still written, and the exit status says so.
    proc = _report(tmp_path, '--smoke', '--sections=eval,run', '--config=configs/csi_cifar.py',
                   '--config.model.name=no_such_model', f'--data={tmp_path}/missing.tar.gz')
    assert proc.returncode == 1, proc.stderr[-2000:]
    failed = [line for line in proc.stderr.splitlines() if 'FAILED' in line]
    assert len(failed) == 2 and 'FAILED eval: exit status' in failed[0], failed
    assert 'FAILED run: no data for the run' in failed[1] and '--data=PATH' in failed[1]
    report = json.loads((tmp_path / 'report.json').read_text())
    assert report['sections']['train_float32'] == {'status': 'skipped',
                                                   'reason': 'not in --sections'}
    assert [f.split(':')[0] for f in report['failures']] == ['eval', 'run']
    assert '## Failures' in (tmp_path / 'report.md').read_text()
