"""Damaged checkpoints are survived, config changes are told apart, failed saves are errors.

One undamaged run (6 steps, checkpoints at 2, 4 and 6) is the reference; each test
damages a copy of its workdir the way a crash, a full disk or a careless `rm` would,
and checks the rerun: a warning, the damaged step moved to `checkpoints_damaged/`,
and results exactly equal to the reference (resume is exact).
"""
import errno
import glob
import json
import logging
import os
import shutil
import warnings

import pytest

from jaxad import checkpoint as ckpt_lib
from jaxad import predict, train
from jaxad.errors import TrainingError
from tests.helpers import make_npz, tiny_config

STEPS = 6


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp('data') / 'tiny.npz')


def config_of(npz, **overrides):
    return tiny_config(npz, total_steps=STEPS, **overrides)


@pytest.fixture(scope='module')
def reference(npz, tmp_path_factory):
    """(workdir, results) of an uninterrupted, undamaged run."""
    workdir = tmp_path_factory.mktemp('reference') / 'run'
    results = train.train_and_evaluate(config_of(npz), str(workdir))
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4', '6']
    return workdir, results


def copy_run(reference, tmp_path, name='run'):
    workdir = tmp_path / name
    shutil.copytree(reference[0], workdir)
    os.remove(workdir / 'results.json')
    return workdir


# ------------------------------------------------------------------ damage


def truncate_array(item_dir):
    """Halves every array data file of the item, as a crash mid-write or a full disk would.
    (Every file, not only the largest: which OCDBT data file holds the arrays a restore reads
    varies between runs, and halving one file alone was seen to leave the step readable.)"""
    files = [f for f in glob.glob(os.path.join(item_dir, '**', 'd', '*'), recursive=True)
             if os.path.isfile(f)]
    assert files, f'no OCDBT data files under {item_dir}'
    for path in files:
        with open(path, 'r+b') as f:
            f.truncate(os.path.getsize(path) // 2)


def delete_metadata(item_dir):
    os.remove(os.path.join(item_dir, '_METADATA'))


def corrupt_metadata(item_dir):
    with open(os.path.join(item_dir, '_METADATA'), 'w') as f:
        f.write('{"tree_metadata": ')


def delete_item(item_dir):
    shutil.rmtree(item_dir)


DAMAGE = dict(truncate_array=truncate_array, delete_metadata=delete_metadata,
              corrupt_metadata=corrupt_metadata, delete_item=delete_item)


def damage(workdir, step, item='state', how='truncate_array'):
    DAMAGE[how](str(workdir / 'checkpoints' / str(step) / item))


def assert_same_results(results, reference):
    ref = reference[1]
    assert results['step'] == ref['step'] == STEPS
    for key in ('image_AUROC', 'image_AUPR', 'FPR@95TPR', 'scores', 'per_class_image_AUROC'):
        assert results[key] == ref[key], key


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------ (a) resume past damage


@pytest.mark.parametrize('how', ['truncate_array', 'delete_metadata', 'corrupt_metadata',
                                 'delete_item'])
def test_damaged_newest_step_is_set_aside_and_the_run_finishes_exactly(
        npz, reference, tmp_path, caplog, how):
    workdir = copy_run(reference, tmp_path)
    damage(workdir, STEPS, 'state', how)
    with caplog.at_level(logging.WARNING):
        results = train.train_and_evaluate(config_of(npz), str(workdir))
    moved = workdir / 'checkpoints_damaged' / str(STEPS)
    assert moved.is_dir()
    warned = [w for w in warnings_of(caplog) if f'moved it to {moved}' in w]
    assert warned and f'step {STEPS} is damaged' in warned[0] and 'step 4' in warned[0]
    assert_same_results(results, reference)
    saved = json.loads((workdir / 'results.json').read_text())
    assert saved['image_AUROC'] == reference[1]['image_AUROC']
    # The step was trained again, whole: a later predict reads it.
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4', '6']
    assert predict.load_model(workdir).step == STEPS


def test_damaged_scoring_state_is_refitted_from_the_readable_train_state(
        npz, reference, tmp_path, caplog):
    workdir = copy_run(reference, tmp_path)
    damage(workdir, STEPS, 'scoring', 'truncate_array')
    with caplog.at_level(logging.WARNING):
        results = train.train_and_evaluate(config_of(npz), str(workdir))
    assert (workdir / 'checkpoints_damaged' / str(STEPS) / 'scoring').is_dir()
    assert any('recomputing the scoring state' in w for w in warnings_of(caplog))
    assert_same_results(results, reference)
    assert predict.load_model(workdir).step == STEPS  # saved again, whole


# ------------------------------------------------------------------ (b) nothing readable


def test_no_readable_step_is_one_error_naming_the_directory(npz, reference, tmp_path):
    workdir = copy_run(reference, tmp_path)
    for step, how in ((2, 'truncate_array'), (4, 'delete_metadata'), (6, 'delete_item')):
        damage(workdir, step, 'state', how)
    directory = workdir / 'checkpoints'
    with pytest.raises(TrainingError) as raised:
        train.train_and_evaluate(config_of(npz), str(workdir))
    message = str(raised.value)
    assert message.startswith(f'no readable checkpoint in {directory}: tried steps 6, 4, 2')
    assert 'Nothing was moved' in message and '\n' not in message
    assert 'tensorstore_spec' not in message and len(message) < 2000
    # Nothing is moved when nothing can be resumed: the user decides.
    assert not (workdir / 'checkpoints_damaged').exists()
    assert sorted(os.listdir(directory)) == ['2', '4', '6']


# ------------------------------------------------------------------ (c) config mismatch


def test_config_mismatch_is_not_damage_and_moves_nothing(npz, reference, tmp_path):
    """A good checkpoint that another config wrote: the error says so and names an array;
    the checkpoint stays. (Setup directly: the workdir fingerprint check of
    train_and_evaluate would refuse the changed config before any restore.)"""
    workdir = copy_run(reference, tmp_path)
    setup = train.Setup(config_of(npz, **{'model.width': 8}), str(workdir))
    try:
        with pytest.raises(TrainingError) as raised:
            setup.restore_latest()
    finally:
        setup.checkpoints.close()
    message = str(raised.value)
    assert 'does not match this config' in message and 'step 6' in message
    assert 'e.g. batch_stats/encoder/bn1/mean is (4,) in the checkpoint but (8,)' in message
    assert not isinstance(raised.value, ckpt_lib.CheckpointDamaged)
    assert 'left in place' in message and '\n' not in message
    assert not (workdir / 'checkpoints_damaged').exists()
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4', '6']


def test_config_mismatch_of_the_tree_names_a_missing_array(npz, reference, tmp_path):
    workdir = copy_run(reference, tmp_path)
    setup = train.Setup(config_of(npz, **{'model.name': 'resnet18'}), str(workdir))
    try:
        with pytest.raises(TrainingError, match=r'does not match this config .*of this config '
                           r'are not in the checkpoint, e\.g\. batch_stats/encoder/layer1_1'):
            setup.restore_latest()
    finally:
        setup.checkpoints.close()
    assert not (workdir / 'checkpoints_damaged').exists()


# ------------------------------------------------------------------ (d) eval and predict


def test_predict_reports_a_damaged_final_checkpoint_and_leaves_it(reference, tmp_path):
    workdir = copy_run(reference, tmp_path)
    damage(workdir, STEPS, 'state', 'truncate_array')
    with pytest.raises(TrainingError) as raised:
        predict.load_model(workdir)
    message = str(raised.value)
    assert message.startswith(f'checkpoint {workdir / "checkpoints"} step 6 is damaged (state: ')
    assert 'no other step has a readable scoring state' in message
    assert 'Rerun the same --mode=train command' in message and '\n' not in message
    # predict does not write to the run: the step stays for --mode=train to repair.
    assert not (workdir / 'checkpoints_damaged').exists()


def test_predict_falls_back_to_the_newest_readable_step_with_scoring(
        reference, tmp_path, caplog):
    workdir = copy_run(reference, tmp_path)
    # A run extended past its first finish: two steps with a scoring state, the newest damaged.
    shutil.copytree(workdir / 'checkpoints' / '6', workdir / 'checkpoints' / '8')
    damage(workdir, 8, 'scoring', 'corrupt_metadata')
    with caplog.at_level(logging.WARNING):
        model = predict.load_model(workdir)
    assert model.step == 6
    assert any('step 8 is damaged' in w and 'using step 6' in w for w in warnings_of(caplog))


def test_eval_mode_uses_the_newest_readable_step_then_train_repairs_the_run(
        npz, reference, tmp_path, caplog):
    workdir = copy_run(reference, tmp_path)
    damage(workdir, STEPS, 'state', 'delete_metadata')
    with caplog.at_level(logging.WARNING):
        results = train.evaluate_checkpoint(config_of(npz), str(workdir))
    assert results['step'] == 4  # says which step it scored
    assert (workdir / 'checkpoints_damaged' / '6').is_dir()
    assert any('using step 4' in w for w in warnings_of(caplog))
    # The same --mode=train command finishes the run exactly.
    assert_same_results(train.train_and_evaluate(config_of(npz), str(workdir)), reference)


def test_eval_mode_with_a_damaged_scoring_state_scores_exactly(
        npz, reference, tmp_path):
    workdir = copy_run(reference, tmp_path)
    damage(workdir, STEPS, 'scoring', 'delete_item')
    assert_same_results(train.evaluate_checkpoint(config_of(npz), str(workdir)), reference)
    assert (workdir / 'checkpoints_damaged' / '6').is_dir()
    assert predict.load_model(workdir).step == STEPS


# ------------------------------------------------------------------ (e) failed saves


@pytest.fixture
def full_disk_at(monkeypatch):
    """Makes Orbax's commit (the rename of the finished temporary directory) of step
    `step` fail as a full disk would."""
    from orbax.checkpoint._src.path import atomicity
    real = atomicity.AtomicRenameTemporaryPath.finalize

    def install(step):
        async def finalize(self, *args, **kwargs):
            if os.path.basename(str(self._final_path)) == str(step):
                raise OSError(errno.ENOSPC, 'No space left on device')
            return await real(self, *args, **kwargs)
        monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', finalize)
    return install


@pytest.mark.parametrize('use_async', [False, True])
def test_failed_save_is_an_error_naming_path_and_step(npz, reference, tmp_path,
                                                       full_disk_at, monkeypatch, use_async):
    workdir = copy_run(reference, tmp_path)
    for step in ('4', '6'):  # as if interrupted after step 2
        shutil.rmtree(workdir / 'checkpoints' / step)
    directory = workdir / 'checkpoints'
    config = config_of(npz, **{'checkpoint.use_async': use_async})
    full_disk_at(4)
    with pytest.raises(TrainingError) as raised:
        train.train_and_evaluate(config, str(workdir))
    message = str(raised.value)
    assert message == (f'saving checkpoint step 4 to {directory} failed (OSError: [Errno 28] '
                       'No space left on device); the latest complete checkpoint is still '
                       'step 2')
    checkpoints = ckpt_lib.Checkpoints(directory, use_async=False)
    assert checkpoints.latest_step() == 2
    checkpoints.close()
    if use_async:  # the rerun resumes from step 2 and finishes exactly
        monkeypatch.undo()
        assert_same_results(train.train_and_evaluate(config, str(workdir)), reference)


def test_unwritable_checkpoint_directory_fails_before_any_compute(npz, tmp_path):
    workdir = tmp_path / 'run'
    workdir.mkdir()
    (workdir / 'checkpoints').write_text('a file where the checkpoint directory must go')
    with pytest.raises(TrainingError, match=f'checkpoint directory {workdir / "checkpoints"} '
                       'is a file, not a directory'):
        train.Setup(config_of(npz), str(workdir))
    below_a_file = workdir / 'checkpoints' / 'run'
    with pytest.raises(TrainingError, match=f'checkpoint directory {below_a_file / "checkpoints"} '
                       r'is not writable \(NotADirectoryError: Not a directory\)'):
        train.Setup(config_of(npz), str(below_a_file))


# ------------------------------------------------------------------ one-class tables


def test_table_group_survives_damaged_state_and_scoring(npz, tmp_path):
    """A table group's damaged final state: set aside, the group resumes and finishes
    exactly; its damaged scoring state (eval mode): refitted exactly."""
    def table_config():
        c = tiny_config(npz, total_steps=4)
        c.table.classes, c.data.normal_classes = '0,1', ()
        c.table.stack_mode = 'vmap'  # recovery is under test: one model's compile (unroll: 2x)
        return c
    reference = tmp_path / 'reference'
    expected = train.train_and_evaluate(table_config(), str(reference))

    def damaged_copy(name, item):
        workdir = tmp_path / name
        shutil.copytree(reference, workdir)
        for results in glob.glob(str(workdir / '**' / 'results.json'), recursive=True):
            os.remove(results)
        (group,) = glob.glob(str(workdir / 'groups' / '*' / 'checkpoints'))
        truncate_array(os.path.join(group, '4', item))
        return workdir, group

    def same(table):
        for got, want in zip(table['classes'], expected['classes'], strict=True):
            assert (got['image_AUROC'], got['scores']) == (want['image_AUROC'], want['scores'])

    workdir, group = damaged_copy('state', 'state')
    same(train.train_and_evaluate(table_config(), str(workdir)))
    assert os.listdir(group + '_damaged') == ['4'] and sorted(os.listdir(group)) == ['2', '4']

    workdir, group = damaged_copy('scoring', 'scoring')
    same(train.evaluate_checkpoint(table_config(), str(workdir)))
    assert os.listdir(group + '_damaged') == ['4'] and sorted(os.listdir(group)) == ['2', '4']


def test_small_replicated_arrays_are_saved_whole_and_read_back(tmp_path):
    """Arrays replicated over the emulated devices whose per-replica slice would be under
    MIN_REPLICA_SLICE_BYTES are written whole by one replica: the save compiles no slice
    program (Orbax's replica-parallel save cuts one per replica and array shape; with its
    default this save compiled 8 per array), and every array reads back exactly."""
    import jax
    import numpy as np
    devices = jax.devices()
    assert len(devices) == 8, 'tests/conftest.py emulates 8 CPU devices'
    mesh = jax.sharding.Mesh(np.array(devices), ('data',))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # Distinct shapes, each divisible by 8 (so Orbax could cut it), none cut before.
    state = {f'w{i}': jax.device_put(np.arange(8 * (i + 3), dtype=np.float32) / 7, replicated)
             for i in range(4)}
    compiled = []

    class Compiles(logging.Handler):
        def emit(self, record):
            compiled.append(record.getMessage())

    handler = Compiles()
    logging.getLogger('jax').addHandler(handler)
    checkpoints = ckpt_lib.Checkpoints(str(tmp_path / 'ckpt'), use_async=False)
    try:
        with jax.log_compiles(True):
            checkpoints.save(1, state)
        restored = checkpoints.restore(1, 'state', like=state)
    finally:
        logging.getLogger('jax').removeHandler(handler)
        checkpoints.close()
    assert not [m for m in compiled if 'slice' in m], compiled
    for name, value in state.items():
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(value))


def test_collecting_abandoned_reads_prints_no_never_awaited_warning():
    """After a failed read, `quiet_abandoned_reads` collects what Orbax abandoned. A read
    coroutine that never started warns 'coroutine ... was never awaited' when it is collected
    (CPython's warning, printed on the command line's stderr beside the one line that reports
    the damage); a full run's test_config_mismatch_of_the_tree_names_a_missing_array logged it
    once. A never-started coroutine held in a reference cycle, as the abandoned reads are,
    must be collected there without that warning, and other warnings still pass."""
    async def _read_array_index_and_device_put():  # Orbax's read, by name
        pass

    class Pending:  # a cycle: only the collector frees it
        pass
    pending = Pending()
    pending.self, pending.read = pending, _read_array_index_and_device_put()
    del pending
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ckpt_lib.quiet_abandoned_reads(collect=True)
        warnings.warn('still shown', UserWarning)
    assert [str(w.message) for w in caught] == ['still shown']
