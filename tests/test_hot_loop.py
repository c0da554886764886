"""The training loop on an accelerator's terms: each program compiles once, and between log
points the host never copies from the device.

* Compile once: jax's compile log (`tests.helpers.compile_log`) over a run that is preempted
  after its step-2 checkpoint, resumed to the end with its evaluation, and evaluated again with
  --mode=eval, all in one process. The train step compiles exactly once: the resumed run has
  the same settings, so it runs the first invocation's jitted step (`jaxad.reuse`), and a
  weak-type flip of the restored step counter would compile it again. The evaluator's
  programs compile once, and no program twice for the same arguments (a new jit wrapper per
  call would). The table's stacked programs are checked the same way in tests/test_table.py.
* No host round trip: `loop.Run.train` dispatches every step under
  `jax.transfer_guard_device_to_host('disallow_explicit')`, which raises on a GPU or TPU. On
  this CPU the guard never fires (arrays live in host memory), so the test counts reads of
  device values made under it: none in a run whose log points are 3 steps apart, and one per
  step when a float() of a device value is slipped into the loop.
"""
import contextlib
import json
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxad import reuse, train
from tests.helpers import Preempted, compile_log, make_npz, preempt_after_step, tiny_config

# The programs a run compiles on purpose (jit names as jax logs them).
PROGRAMS = {'step_on_mesh', 'init', 'features', 'fit_scoring', 'score'}


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp('data') / 'tiny.npz')


def test_each_program_compiles_once_across_preemption_resume_and_eval(npz, tmp_path,
                                                                      monkeypatch):
    config = lambda: tiny_config(npz, log_every=1, num_devices=1)  # noqa: E731
    workdir = str(tmp_path / 'run')
    reuse.clear()  # nothing shared from the tests before: counts independent of their order

    undo = preempt_after_step(monkeypatch, 2)
    with compile_log() as first, pytest.raises(Preempted):
        train.train_and_evaluate(config(), workdir)
    undo()
    assert first.count('step_on_mesh') == 1
    assert first.repeated(PROGRAMS) == {}

    with compile_log() as resumed:
        train.train_and_evaluate(config(), workdir)
    assert resumed.count('step_on_mesh') == 0  # the first invocation's (jaxad.reuse)
    # the bank and the test pass share one feature program (same padded batch shape)
    for name in ('features', 'fit_scoring', 'score'):
        assert resumed.count(name) == 1, (name, resumed.programs)
    assert resumed.repeated(PROGRAMS) == {}

    with compile_log() as evaluated:
        train.evaluate_checkpoint(config(), workdir)
    assert evaluated.count('step_on_mesh') == 0
    assert evaluated.count('features') <= 1 and evaluated.count('score') <= 1
    assert evaluated.repeated(PROGRAMS) == {}


@contextlib.contextmanager
def reads_under_the_loop_guard(monkeypatch):
    """Records every read of a device array's value made while `loop.Run.train` holds its
    transfer guard (list of short stack summaries).

    On a GPU or TPU the guard itself raises on such a copy. On the CPU arrays live in host
    memory and the guard never fires, so the test counts instead: reads through
    `ArrayImpl._value`, `__array__` and `item` (float(), int(), bool(), .item(), .tolist(),
    jax.device_get, np.asarray where it does not take the CPU's zero-copy buffer path).
    """
    array_type = type(jnp.zeros(()))
    real_value, real_array, real_item = (array_type._value, array_type.__array__,
                                         array_type.item)
    real_guard = jax.transfer_guard_device_to_host
    hot, reads = [], []

    def note():
        if hot:
            reads.append(''.join(traceback.format_stack(limit=6)[:-2]))

    @contextlib.contextmanager
    def guard(level):
        hot.append(level)
        try:
            with real_guard(level):
                yield
        finally:
            hot.pop()

    def value(self):
        note()
        return real_value.fget(self)

    def as_array(self, *args, **kwargs):
        note()
        return real_array(self, *args, **kwargs)

    def item(self, *args):
        note()
        return real_item(self, *args)
    monkeypatch.setattr(jax, 'transfer_guard_device_to_host', guard)
    monkeypatch.setattr(array_type, '_value', property(value))
    monkeypatch.setattr(array_type, '__array__', as_array)
    monkeypatch.setattr(array_type, 'item', item)
    yield reads


def test_no_device_to_host_copy_between_log_points(npz, tmp_path, monkeypatch):
    """Log points at steps 3 and 6: no step reads the device inside the guard, and the
    deferred read of step 3's metrics (after step 4 is dispatched) logs the numbers a
    log_every=1 run logs for step 3."""
    with reads_under_the_loop_guard(monkeypatch) as reads:
        train.train_and_evaluate(tiny_config(npz, total_steps=6, log_every=3, num_devices=1,
                                             **{'checkpoint.every_steps': 100}),
                                 str(tmp_path / 'every3'))
    assert reads == []
    train.train_and_evaluate(tiny_config(npz, total_steps=6, log_every=1, num_devices=1,
                                         **{'checkpoint.every_steps': 100}),
                             str(tmp_path / 'every1'))
    every3 = [json.loads(x) for x in (tmp_path / 'every3' / 'metrics.jsonl').read_text().splitlines()]
    every1 = [json.loads(x) for x in (tmp_path / 'every1' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in every3] == [3, 6]
    for r in every3:
        same = every1[r['step'] - 1]
        for key in ('loss', 'lr', 'grad_norm'):
            np.testing.assert_allclose(r[key], same[key], rtol=1e-6, err_msg=key)


def test_a_host_read_in_the_hot_loop_is_caught(npz, tmp_path, monkeypatch):
    """The check bites: a float() of a device value slipped into the loop (here in the batch
    iterator, which runs inside the guarded dispatch) is recorded."""
    real_batches = train.Setup.batches

    def batches_that_read_the_device(self, start_step):
        for batch in real_batches(self, start_step):
            float(jnp.sum(jnp.ones(3)))  # what a stray float(metrics['loss']) does
            yield batch
    monkeypatch.setattr(train.Setup, 'batches', batches_that_read_the_device)
    with reads_under_the_loop_guard(monkeypatch) as reads:
        train.train_and_evaluate(tiny_config(npz, num_devices=1), str(tmp_path / 'run'))
    assert len(reads) == 4  # one per step
    assert 'batches_that_read_the_device' in reads[0]
