"""Runs in one process with equal methods share their programs (`jaxad.reuse`), and only then.

* A second run with the settings of the first compiles no train step and no evaluator
  program (jax's compile log), and its results.json equals the first's; a run after
  `reuse.clear()`, which builds and compiles everything afresh, gives the same results: the
  shared programs compute what unshared ones do. A run with another seed compiles no step
  either and gives what a fresh run with that seed gives.
* A method is shared by its state (class, attributes, arrays by content): the seed, the normal
  class and the cadences, which a CSI method does not hold, share it; its loss settings and
  step budget do not; ViT weights it holds are compared by content (the same bytes written
  again share, other weights at the same path do not). A method without a state key (a
  lambda among its attributes) is shared only with an equal config whose named files are
  unchanged. Optimizers are shared by their settings and budget.
"""
import json
import os

import numpy as np
import pytest

from jaxad import config as jc
from jaxad import reuse, train
from jaxad.methods import StepBudget, get_method
from tests.helpers import compile_log, make_npz, tiny_config
from tests.test_vit import _bigvision_params

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

    # another learning rate: its own optimizer and step
    with compile_log() as other:
        train.train_and_evaluate(config(**{'optim.lr': 0.5}), str(tmp_path / 'other'))
    assert other.count('step_on_mesh') == 1
    assert scores(tmp_path / 'other') != scores(tmp_path / 'first')

    # another seed: the same method, optimizer and programs; what a fresh run gives
    with compile_log() as seeded:
        train.train_and_evaluate(config(seed=1), str(tmp_path / 'seed1'))
    assert seeded.count('step_on_mesh') == 0, seeded.programs
    reuse.clear()
    train.train_and_evaluate(config(seed=1), str(tmp_path / 'seed1_fresh'))
    assert scores(tmp_path / 'seed1') == scores(tmp_path / 'seed1_fresh')


def test_methods_are_shared_by_state_and_optimizers_by_settings(tmp_path):
    data = make_npz(tmp_path / 'a.npz')
    c = tiny_config(data)
    first = reuse.method(c)
    assert reuse.method(tiny_config(data)) is first
    # what a CSI method does not hold: the seed, the normal class, the cadences
    assert reuse.method(tiny_config(data, seed=1, log_every=3, **{
        'data.normal_classes': (1,), 'checkpoint.every_steps': 1})) is first
    # what it holds: its loss settings, its step budget
    assert reuse.method(tiny_config(data, **{'csi.temperature': 0.7})) is not first
    assert reuse.method(c, StepBudget(2, 4)) is not reuse.method(c, StepBudget(2, 5))
    opt = lambda cfg: reuse.optimizer(cfg.optim, 10, 40, cfg.batch_size)  # noqa: E731
    assert opt(c) is opt(tiny_config(data, seed=1))
    assert opt(c) is not opt(tiny_config(data, **{'optim.lr': 0.5}))


def test_weights_a_method_holds_are_compared_by_content(tmp_path):
    """feature_knn's ViT holds its weights (a big_vision .npz): the same bytes rewritten give
    the same method, other weights at the same path a new one."""
    rng = np.random.default_rng(0)
    weights = _bigvision_params(rng)
    path = tmp_path / 'vit.npz'
    np.savez(path, **weights)
    c = jc.base_config('feature_knn')
    c.data.image_size = 12
    c.feature_knn.encoder, c.feature_knn.weights = 'vit', str(path)
    first = reuse.method(c)
    touch_later(path, lambda: np.savez(path, **weights))
    assert reuse.method(c) is first
    touch_later(path, lambda: np.savez(path, **_bigvision_params(rng)))
    assert reuse.method(c) is not first


def test_a_method_without_a_state_key_is_shared_by_settings(tmp_path, monkeypatch):
    """A method holding a lambda has no state key: it is shared only with an equal config
    whose named files are unchanged."""
    def with_a_lambda(config, budget=None):
        method = get_method(config, budget)
        method.transform = lambda x: x
        return method
    monkeypatch.setattr(reuse, 'get_method', with_a_lambda)
    data = make_npz(tmp_path / 'a.npz')
    first = reuse.method(tiny_config(data))
    with pytest.raises(reuse._Opaque):  # pylint: disable=protected-access
        reuse.state_key(first)
    assert reuse.method(tiny_config(data)) is first
    assert reuse.method(tiny_config(data, seed=1)) is not first
    touch_later(data, lambda: make_npz(data, n_per_class=20))  # the same path, another file
    assert reuse.method(tiny_config(data)) is not first


def touch_later(path, write):
    """`write()` the file at `path` again, its modification time moved past the old one (a
    coarse file-system clock could otherwise keep it)."""
    before = os.stat(path).st_mtime_ns
    write()
    os.utime(path, ns=(before + 10**9, before + 10**9))
