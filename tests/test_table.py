"""The one-class table: stacked training == separate runs, resume, the CLI table."""
import json
import logging
import os
import re

import jax
import numpy as np
import pytest

from jaxad import config as jc
from jaxad import detectors, reuse, table, train, writers
from jaxad.errors import ConfigError
from tests.helpers import compile_log, make_npz, tiny_config

# Stacked convolutions lower to grouped convolutions, which sum in another
# order than the single-model ones. Float32 rounding, amplified by 4 steps at
# learning rates up to 1.0 (LARS, x10 warm-up), moves a few params by ~5e-5
# (of |p| ~ 0.1); a wrong key, batch or BN statistic moves them by > 1e-2.
RTOL, ATOL = 1e-3, 1e-4
# The stacked programs a table compiles (jit names as jax logs them; jaxad.stacking keeps
# the per-model function's name).
STACK_PROGRAMS = {'train_step', 'init', 'features', 'fit_scoring', 'score'}


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp('data') / 'tiny.npz')


def table_config(npz, classes='0,1,2', **overrides):
    c = tiny_config(npz, log_every=1, **overrides)
    c.table.classes = classes
    c.data.normal_classes = ()
    return c


def params_at(checkpoint_dir, state_like):
    ckpt = train.ckpt_lib.Checkpoints(checkpoint_dir, use_async=False)
    try:
        step = ckpt.latest_step()
        return step, jax.device_get(ckpt.restore(step, 'state', state_like).params)
    finally:
        ckpt.close()


@pytest.fixture(scope='module')
def separate_runs(npz, tmp_path_factory):
    """Single-class runs of classes 0, 1, 2 on one device: params, losses, results. Class 1's
    run keeps its training images on the device (data.on_device), the others send them from
    the host: the tables below equal both."""
    out = {}
    for c in range(3):
        workdir = tmp_path_factory.mktemp(f'single{c}')
        config = tiny_config(npz, log_every=1, num_devices=1)
        config.data.normal_classes = (c,)
        config.data.on_device = 'true' if c == 1 else 'false'
        results = train.train_and_evaluate(config, str(workdir))
        setup = train.Setup(config, str(workdir))
        state, step = setup.restore_latest()
        setup.checkpoints.close()
        losses = [json.loads(x)['loss'] for x in (workdir / 'metrics.jsonl').read_text().splitlines()]
        out[c] = dict(params=jax.device_get(state.params), step=step, losses=losses,
                      results=results)
    return out


def stacked_member(config, workdir, group, position):
    """Params of one member of a trained group, and its logged losses."""
    setup = table.TableSetup(config, str(workdir))
    try:
        g = next(g for g in setup.groups if g.name == group)
        state, step = g.restore_latest()
        params = jax.tree_util.tree_map(lambda x: np.asarray(x)[position],
                                        jax.device_get(state.params))
        name = g.members[position].name
    finally:
        setup.close()
    lines = (workdir / 'groups' / group / 'metrics.jsonl').read_text().splitlines()
    return step, params, [json.loads(x)[f'loss/{name}'] for x in lines]


def assert_member_equals_single(config, workdir, group, position, single):
    step, params, losses = stacked_member(config, workdir, group, position)
    assert step == single['step'] == 4
    np.testing.assert_allclose(losses, single['losses'], rtol=RTOL, atol=ATOL)
    for a, b in zip(jax.tree_util.tree_leaves(params),
                    jax.tree_util.tree_leaves(single['params'])):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('num_devices,stack_size,mode,on_device',
                         [(1, 0, 'unroll', 'false'), (8, 2, 'vmap', 'true')])
def test_stacked_table_equals_separate_runs(npz, separate_runs, tmp_path, num_devices,
                                            stack_size, mode, on_device, caplog):
    """K=3 unrolled on 1 device, batches from the host; vmapped stacks of 2 + 1 on 8 devices
    (mesh 2x4 and 1x8), each group's training images on the devices (data.on_device)."""
    config = table_config(npz, num_devices=num_devices)
    config.table.stack_size = stack_size
    config.table.stack_mode = mode
    config.data.on_device = on_device
    with caplog.at_level(logging.INFO):
        result = train.train_and_evaluate(config, str(tmp_path))
    # each group says how it was fed
    fed = re.findall(r'training images (on the devices|sent from the host)', caplog.text)
    want = 'on the devices' if on_device == 'true' else 'sent from the host'
    assert fed == [want] * (1 if stack_size == 0 else 2), caplog.text[-2000:]
    groups = ['classes_0_1_2'] if stack_size == 0 else ['classes_0_1', 'classes_2']
    assert sorted(os.listdir(tmp_path / 'groups')) == groups
    for c in range(3):
        group = groups[0] if c < 2 or stack_size == 0 else groups[1]
        position = c if group == groups[0] else 0
        assert_member_equals_single(config, tmp_path, group, position, separate_runs[c])
        got = result['classes'][c]
        assert got['name'] == str(c) and got['normal_classes'] == [c]
        np.testing.assert_allclose(got['image_AUROC'],
                                   separate_runs[c]['results']['image_AUROC'], atol=1e-6)
    # The models must have trained apart, or the comparison says nothing.
    p0, p1 = separate_runs[0]['params'], separate_runs[1]['params']
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(p0),
                                                      jax.tree_util.tree_leaves(p1)))
    mean = np.mean([separate_runs[c]['results']['image_AUROC'] for c in range(3)])
    np.testing.assert_allclose(result['mean']['image_AUROC'], mean, atol=1e-6)


class Preempted(Exception):
    """Stands in for a job killed mid-run."""


def test_interrupted_table_equals_uninterrupted_and_eval_mode(npz, tmp_path, monkeypatch):
    """Classes 0, 1, 2 in groups of 2 + 1; the second group is preempted after step 2 and
    resumed. Each stacked step compiles once in the process (the later invocations have the
    same settings and run the first's jitted steps, `jaxad.reuse`) and no program twice for
    the same arguments (jax's compile log; tests/test_hot_loop.py for single runs)."""
    config = lambda: table_config(npz, num_devices=1)  # noqa: E731
    reuse.clear()  # nothing shared from the tests before: counts independent of their order
    with compile_log() as log:
        full = train.train_and_evaluate(_with_stack(config(), 2), str(tmp_path / 'full'))
    assert log.count('train_step') == 2  # K = 2 and K = 1: one compile per shape
    assert log.repeated(STACK_PROGRAMS) == {}

    resumed = tmp_path / 'resumed'
    real_write = writers.MetricWriter.write

    def crash_in_second_group(self, step, metrics):
        real_write(self, step, metrics)
        if 'classes_2' in self.path and step == 3:
            raise Preempted('simulated preemption')
    monkeypatch.setattr(writers.MetricWriter, 'write', crash_in_second_group)
    with pytest.raises(Preempted):
        train.train_and_evaluate(_with_stack(config(), 2), str(resumed))
    assert sorted(os.listdir(resumed / 'groups' / 'classes_2' / 'checkpoints')) == ['2']
    first_group_log = (resumed / 'groups' / 'classes_0_1' / 'metrics.jsonl').read_text()
    monkeypatch.setattr(writers.MetricWriter, 'write', real_write)
    with compile_log() as log:
        again = train.train_and_evaluate(_with_stack(config(), 2), str(resumed))
    assert log.count('train_step') == 0  # the K = 1 step of the first invocation
    assert log.repeated(STACK_PROGRAMS) == {}
    # The finished group was not retrained; the table is the uninterrupted one.
    assert (resumed / 'groups' / 'classes_0_1' / 'metrics.jsonl').read_text() == first_group_log
    assert [r['image_AUROC'] for r in again['classes']] == \
        [r['image_AUROC'] for r in full['classes']]
    assert again['mean'] == full['mean']

    os.remove(resumed / 'results.json')
    with compile_log() as log:
        rebuilt = train.evaluate_checkpoint(_with_stack(config(), 2), str(resumed))
    assert log.count('train_step') == 0
    assert log.repeated(STACK_PROGRAMS) == {}
    assert [r['image_AUROC'] for r in rebuilt['classes']] == \
        [r['image_AUROC'] for r in full['classes']]
    assert (resumed / 'results.md').exists()


def _with_stack(config, stack_size):
    config.table.stack_size = stack_size
    return config


def test_digits_all_writes_ten_row_table(tmp_path):
    from configs import quickstart
    config = quickstart.get_config('normal_class=all,epochs=1')
    config.eval.num_samples = 1
    config.model.width = 4  # the table machinery is under test here, not the model
    config.model.name = 'resnet10'
    config.data.image_size = 8  # 10 models score the 900-image test split 4 times each
    config.table.stack_mode = 'vmap'  # compiles once for all 10 (unroll: 10x compile time)
    config.num_devices = 1
    config.log_every = 1
    result = train.train_and_evaluate(config, str(tmp_path))
    assert len(result['classes']) == 10
    assert [r['name'] for r in result['classes']] == [str(d) for d in range(10)]
    assert os.listdir(tmp_path / 'groups') == ['classes_' + '_'.join(map(str, range(10)))]
    md = (tmp_path / 'results.md').read_text().splitlines()
    rows = [line for line in md if line.startswith('| ') and not line.startswith('| normal')]
    assert len(rows) == 11 and rows[-1].startswith('| **mean**')
    saved = json.loads((tmp_path / 'results.json').read_text())
    np.testing.assert_allclose(saved['mean']['image_AUROC'],
                               np.mean([r['image_AUROC'] for r in saved['classes']]))
    assert all(0 <= r['image_AUROC'] <= 1 for r in saved['classes'])
    # Every row carries the raw-pixel 1-NN baseline of its split, from its definition
    # (scipy's distances, sklearn's AUROC), and results.md says where the detector is below.
    from scipy.spatial.distance import cdist
    from sklearn.metrics import roc_auc_score
    from jaxad.data import sources
    train_set = sources.load_split(config.data, 'train')
    test_set = sources.load_split(config.data, 'test')
    # exact distances of the raw uint8 values (integers in float64: digits' many ties kept)
    test = test_set.images.reshape(len(test_set), -1).astype(float)
    assert 'raw-pixel 1-NN AUROC %' in md[2]
    for r, line in zip(saved['classes'], rows):
        c = int(r['name'])
        bank = train_set.images[train_set.labels == c].reshape(-1, test.shape[1]).astype(float)
        want = roc_auc_score(test_set.labels != c, cdist(test, bank, 'sqeuclidean').min(1))
        base = r['baseline']['raw_pixel_1nn']['image_AUROC']
        assert base == pytest.approx(want, abs=1e-12), c
        assert ('(above the detector)' in line) == (r['image_AUROC'] < base), line
    np.testing.assert_allclose(
        saved['mean']['baseline']['raw_pixel_1nn']['image_AUROC'],
        np.mean([r['baseline']['raw_pixel_1nn']['image_AUROC'] for r in saved['classes']]))
    assert any(line.startswith('Raw-pixel 1-NN: ') for line in md)


def test_parse_arg_joins_comma_lists_and_sets_table():
    from configs import csi_cifar
    c = csi_cifar.get_config('normal_class=0,3,5,epochs=7')
    assert c.table.classes == '0,3,5' and c.data.normal_classes == () and c.optim.epochs == 7
    c = csi_cifar.get_config('normal_class=3+4')
    assert c.table.classes == '' and c.data.normal_classes == (3, 4)
    with pytest.raises(ConfigError, match='normal_class'):
        csi_cifar.get_config('normal_class=0,x')


def test_parse_members_and_groups():
    names = [str(i) for i in range(4)]
    assert detectors.parse_members('all', names) == [(0,), (1,), (2,), (3,)]
    assert detectors.parse_members('2,0+1', names) == [(2,), (0, 1)]
    with pytest.raises(ConfigError, match='not one of the 4 classes'):
        detectors.parse_members('0,4', names)
    with pytest.raises(ConfigError, match='twice'):
        detectors.parse_members('1,1', names)
    members = [detectors.Detector((c,), str(c), np.arange(3), spe, spe * 2)
               for c, spe in enumerate([2, 2, 3, 2])]
    groups = table.make_groups(members, stack_size=2)
    assert [[m.name for m in g] for g in groups] == [['0', '1'], ['3'], ['2']]
    assert len(table.make_groups(members, stack_size=0)) == 2


def test_paper_numbers_match_cifar10_names():
    from jaxad.methods import csi
    paper = csi.paper_one_class(csi.CIFAR10_CLASSES)
    assert paper['per_class']['airplane'] == 89.9 and paper['mean'] == 94.3
    assert np.isclose(np.mean(list(paper['per_class'].values())), 94.28)
    assert csi.paper_one_class([str(i) for i in range(10)]) is None


def test_stacked_eval_batches_pad_each_model(npz):
    from jaxad.data import pipeline, sources
    data = jc.csi_base().data
    data.source, data.numpy_path, data.image_size = 'numpy', str(npz), 8
    image_set = sources.load_split(data, 'train')
    lists = [np.array([0, 1, 2, 3, 4]), np.array([7, 8])]
    batches = list(pipeline.stacked_eval_batches(image_set, lists, batch_size=4))
    assert len(batches) == 2
    index = np.concatenate([b['index'] for b in batches], axis=1)
    mask = np.concatenate([b['mask'] for b in batches], axis=1)
    assert index.shape == (2, 8) and batches[0]['image'].shape == (2, 4, 8, 8, 3)
    np.testing.assert_array_equal(index[0][mask[0]], lists[0])
    np.testing.assert_array_equal(index[1][mask[1]], lists[1])
    np.testing.assert_array_equal(batches[1]['image'][0, 0], image_set.images[4])
