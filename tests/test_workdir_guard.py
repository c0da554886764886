"""A workdir is bound to the training config that made its checkpoints (jaxad.fingerprint).

The bug this guards against (issue 15.1): training class 3 into a workdir that held a
finished class-0 run logged "run already finished; evaluating only" and scored the
class-0 model against class 3.
"""
import json
import os
import subprocess
import sys

import pytest

from jaxad import fingerprint, predict, train
from jaxad.errors import ConfigError
from tests.helpers import make_npz, tiny_config


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp('data') / 'tiny.npz')


@pytest.fixture(scope='module')
def finished(npz, tmp_path_factory):
    """A finished class-0 run (4 steps) and its results."""
    workdir = tmp_path_factory.mktemp('runs') / 'class0'
    results = train.train_and_evaluate(tiny_config(npz), str(workdir))
    return workdir, results


def snapshot(workdir):
    """Every file of the workdir with its modification time and size."""
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.relpath(os.path.join(root, f), workdir)] = (st.st_mtime_ns, st.st_size)
    return out


def test_another_class_is_refused_before_any_work_and_nothing_changes(npz, finished):
    workdir, _ = finished
    before = snapshot(workdir)
    other = tiny_config(npz, **{'data.normal_classes': (1,)})
    with pytest.raises(ConfigError) as e:
        train.train_and_evaluate(other, str(workdir))
    assert 'data.normal_classes: (0,) -> (1,)' in str(e.value)
    assert 'new --workdir' in str(e.value)
    with pytest.raises(ConfigError, match=r'data.normal_classes: \(0,\) -> \(1,\)'):
        train.evaluate_checkpoint(other, str(workdir))
    # Every differing training field is named, one per line; scoring fields are not.
    many = tiny_config(npz, seed=3, batch_size=4, **{'model.width': 8, 'eval.num_samples': 3})
    with pytest.raises(ConfigError) as e:
        train.train_and_evaluate(many, str(workdir))
    lines = str(e.value).splitlines()
    assert {'  batch_size: 8 -> 4', '  model.width: 4 -> 8', '  seed: 0 -> 3'} <= set(lines)
    assert not any('eval.num_samples' in line for line in lines)
    assert snapshot(workdir) == before


def test_workdir_written_before_fingerprints_is_judged_by_its_config_json(npz, finished,
                                                                          tmp_path):
    import shutil
    legacy = tmp_path / 'legacy'
    shutil.copytree(finished[0], legacy)
    os.remove(legacy / fingerprint.FINGERPRINT_FILE)
    os.remove(legacy / fingerprint.SCORING_FILE)
    with pytest.raises(ConfigError, match='optim.lr: 0.1 -> 0.2'):
        train.evaluate_checkpoint(tiny_config(npz, **{'optim.lr': 0.2}), str(legacy))
    os.remove(legacy / 'config.json')
    with pytest.raises(ConfigError, match='neither fingerprint.json nor config.json'):
        train.evaluate_checkpoint(tiny_config(npz), str(legacy))


def test_neutral_fields_reuse_the_run_unchanged(npz, finished):
    workdir, results = finished
    again = train.train_and_evaluate(
        tiny_config(npz, log_every=1, num_devices=1, **{'checkpoint.every_steps': 1,
                                                        'eval.batch_size': 8}), str(workdir))
    assert again['image_AUROC'] == results['image_AUROC']
    assert again['scores'] == results['scores']
    assert 'scoring_state' not in again


def test_a_scoring_field_rescores_as_a_fresh_run_with_it_would(npz, finished, tmp_path):
    """eval.num_samples 2 -> 3 on the finished run refits the bank and equals a run trained
    with 3 from the start; results.json states the settings; config.json is kept."""
    workdir, results = finished
    config_before = (workdir / 'config.json').read_text()
    three = tiny_config(npz, **{'eval.num_samples': 3})
    rescored = train.train_and_evaluate(three, str(workdir))
    fresh = train.train_and_evaluate(three, str(tmp_path / 'fresh3'))
    assert rescored['scoring_state'] == 'refitted'
    assert rescored['scoring_changes'] == ['eval.num_samples: 2 -> 3']
    assert rescored['scores'] == fresh['scores']
    assert rescored['scores'] != results['scores']
    saved = json.loads((workdir / 'results.json').read_text())
    assert saved['eval_settings']['eval.num_samples'] == 3
    assert saved['training_fingerprint'] == fresh['training_fingerprint']
    assert (workdir / 'config.json').read_text() == config_before
    # Back to the run's own settings: its saved scoring state is used again.
    back = train.evaluate_checkpoint(tiny_config(npz), str(workdir))
    assert back['scores'] == results['scores'] and 'scoring_state' not in back


def test_predict_refuses_settings_its_saved_scoring_state_was_not_made_with(npz, finished):
    workdir, _ = finished
    model = predict.load_model(workdir)  # the run's own config.json: fine
    assert model.step == 4
    with pytest.raises(ConfigError, match='eval.num_samples: 2 -> 3'):
        predict.load_model(workdir, tiny_config(npz, **{'eval.num_samples': 3}))
    with pytest.raises(ConfigError, match='model.width: 4 -> 8'):
        predict.load_model(workdir, tiny_config(npz, **{'model.width': 8}))


def test_a_workdir_without_checkpoints_is_free(npz, tmp_path):
    """A run that failed before its first checkpoint may be rerun with another config."""
    workdir = tmp_path / 'failed'
    with pytest.raises(Exception):
        train.train_and_evaluate(tiny_config(npz, **{'data.normal_classes': (7,)}),
                                 str(workdir))
    assert not fingerprint.has_checkpoints(str(workdir))
    fingerprint.check_workdir(tiny_config(npz), str(workdir))  # no error


def test_cli_exits_non_zero_with_the_differing_field(npz, finished, tmp_path):
    workdir, _ = finished
    config_file = tmp_path / 'cfg.py'
    config_file.write_text(
        'from tests.helpers import tiny_config\n'
        f'def get_config():\n    return tiny_config({str(npz)!r}, **{{"data.normal_classes": (2,)}})\n')
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    out = subprocess.run([sys.executable, '-m', 'jaxad.main', f'--config={config_file}',
                          f'--workdir={workdir}', '--mode=eval'], capture_output=True,
                         text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 1, out.stderr[-2000:]
    assert 'jaxad: error: workdir' in out.stderr
    assert 'data.normal_classes: (0,) -> (2,)' in out.stderr
    assert 'Traceback' not in out.stderr


def table_config(npz, classes, **overrides):
    c = tiny_config(npz, **overrides)
    c.table.classes = classes
    c.data.normal_classes = ()
    c.table.stack_mode = 'vmap'  # the workdir's binding is under test: one compile (unroll: 2x)
    return c


def test_table_groups_are_bound_to_their_config_and_rescored_on_scoring_changes(npz, tmp_path):
    workdir = tmp_path / 'table'
    first = train.train_and_evaluate(table_config(npz, '0,1'), str(workdir))
    assert first['eval_settings']['eval.num_samples'] == 2
    with pytest.raises(ConfigError, match="table.classes: '0,1' -> '0,2'"):
        train.train_and_evaluate(table_config(npz, '0,2'), str(workdir))
    with pytest.raises(ConfigError, match='seed: 0 -> 1'):
        train.evaluate_checkpoint(table_config(npz, '0,1', seed=1), str(workdir))
    # The saved group results are reused only for the settings they were scored with.
    again = train.train_and_evaluate(table_config(npz, '0,1'), str(workdir))
    assert again['classes'] == first['classes']
    three = train.train_and_evaluate(table_config(npz, '0,1', **{'eval.num_samples': 3}),
                                     str(workdir))
    assert three['eval_settings']['eval.num_samples'] == 3
    assert all(r['scoring_state'] == 'refitted' and r['eval_settings']['eval.num_samples'] == 3
               for r in three['classes'])
    assert [r['scores'] for r in three['classes']] != [r['scores'] for r in first['classes']]
    # ... and a single run is not a table: refused, not scored from a group.
    with pytest.raises(ConfigError, match="table.classes: '0,1' -> ''"):
        train.evaluate_checkpoint(tiny_config(npz), str(workdir))


@pytest.mark.parametrize('field,value', [('threshold.holdout_fraction', 0.25),
                                         ('threshold.value', 1.0)])
def test_table_refuses_threshold_settings_it_would_ignore(npz, tmp_path, field, value):
    with pytest.raises(ConfigError, match=field.replace('.', r'\.')):
        train.train_and_evaluate(table_config(npz, '0,1', **{field: value}),
                                 str(tmp_path / 'thr'))
