"""Runs in one process with equal settings share their programs (`jaxad.reuse`), and only then.

* A second run with the settings of the first compiles no train step and no evaluator
  program (jax's compile log), and its results.json equals the first's; a run after
  `reuse.clear()`, which builds and compiles everything afresh, gives the same results: the
  shared programs compute what unshared ones do.
* Any difference in the settings builds new objects: another learning rate gets its own
  optimizer and method and compiles its own step; a file the config names, rewritten at the
  same path, gives a new method (its size and modification time are in the key).
"""
import json
import os

import pytest

from jaxad import reuse, train
from tests.helpers import compile_log, make_npz, tiny_config

EVAL_PROGRAMS = ('features', 'fit_scoring', 'score')


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp('data') / 'tiny.npz')


def scores(workdir):
    saved = json.loads((workdir / 'results.json').read_text())
    return {k: saved[k] for k in ('image_AUROC', 'scores', 'step')}


def test_equal_settings_share_every_program_and_give_the_same_results(npz, tmp_path):
    config = lambda **kw: tiny_config(npz, num_devices=1, **kw)  # noqa: E731
    reuse.clear()
    with compile_log() as first:
        train.train_and_evaluate(config(), str(tmp_path / 'first'))
    assert first.count('step_on_mesh') == 1
    with compile_log() as second:
        train.train_and_evaluate(config(), str(tmp_path / 'second'))
    assert second.count('step_on_mesh') == 0, second.programs
    for name in EVAL_PROGRAMS:
        assert second.count(name) == 0, (name, second.programs)
    assert scores(tmp_path / 'second') == scores(tmp_path / 'first')

    reuse.clear()
    with compile_log() as fresh:
        train.train_and_evaluate(config(), str(tmp_path / 'fresh'))
    assert fresh.count('step_on_mesh') == 1
    assert scores(tmp_path / 'fresh') == scores(tmp_path / 'first')

    # another learning rate: its own optimizer, method and step
    with compile_log() as other:
        train.train_and_evaluate(config(**{'optim.lr': 0.5}), str(tmp_path / 'other'))
    assert other.count('step_on_mesh') == 1
    assert scores(tmp_path / 'other') != scores(tmp_path / 'first')


def test_the_key_is_every_setting_and_the_named_files(tmp_path):
    data = make_npz(tmp_path / 'a.npz')
    c = tiny_config(data)
    assert reuse.method(c) is reuse.method(tiny_config(data))
    assert reuse.method(c) is not reuse.method(tiny_config(data, seed=1))
    opt = lambda cfg: reuse.optimizer(cfg.optim, 10, 40, cfg.batch_size)  # noqa: E731
    assert opt(c) is opt(tiny_config(data))
    assert opt(c) is not opt(tiny_config(data, **{'optim.lr': 0.5}))
    # the same path, another file: a new method
    before = reuse.method(c)
    make_npz(data, n_per_class=20)
    os.utime(data, ns=(os.stat(data).st_atime_ns, os.stat(data).st_mtime_ns + 1))
    assert reuse.method(c) is not before
    # sections named in `ignore` are left out of the key (scoring ignores the threshold)
    t = tiny_config(data, **{'threshold.holdout_fraction': 0.25})
    assert reuse.method(t, ignore=('threshold',)) is reuse.method(c, ignore=('threshold',))
