"""Every program a run compiles lowers for a GPU (cuda) and a TPU, on this CPU-only machine.

`jax.jit(...).trace(...).lower(lowering_platforms=...)` builds the StableHLO a GPU or TPU would
compile, with the same jit wrappers (shardings, donation) the trainer and the evaluator use
(`jaxad.programs`). A CPU-only path (a host callback, a CPU custom call, a branch on the
tracing machine's backend) fails here instead of on the user's accelerator.

* `model.conv_impl='auto'` resolves per lowering platform: the CPU lowering has the matmul
  weight gradient (`jaxad.models.conv`), the cuda and tpu lowerings have exactly XLA's
  convolutions, op for op what `conv_impl='xla'` gives.
* The paper-size CSI step (configs/csi_cifar.py, ResNet-18 width 64, 32 images) alone and as a
  K = 10 stack under vmap.
* For every registered method (the conformance test's tiny configs): the train step, the
  evaluator's feature pass, fit_scoring and the scorer.
"""
import re

import jax
import pytest

from configs import csi_cifar
from jaxad import programs
from jaxad.methods import REGISTRY, get_method
from tests.helpers import set_fields
from tests.test_conformance import TINY_CONFIGS

ACCELERATORS = ('cuda', 'tpu')
# lowering needs only the configs, not the files they name
NO_DATA = {'npz': '/nonexistent/tiny.npz', 'synth': '/nonexistent/synth'}


def op_counts(lowered):
    """{'convolution': n, 'dot_general': n, 'custom_call': n} of a lowered module's text."""
    text = lowered.as_text()
    return {op: len(re.findall(rf'stablehlo\.{op}\b', text))
            for op in ('convolution', 'dot_general', 'custom_call')}


def _tiny_csi(conv_impl):
    c = csi_cifar.get_config()
    return set_fields(c, **{'model.name': 'resnet10', 'model.width': 4, 'batch_size': 2,
                            'model.conv_impl': conv_impl})


def test_conv_impl_auto_follows_the_lowering_platform():
    """'auto' is XLA's convolution for cuda/tpu and the matmul weight gradient for cpu, decided
    by where the program is lowered, not by this (CPU) machine that traces it."""
    step = {impl: programs.train_step(_tiny_csi(impl), (32, 32, 3))
            for impl in ('auto', 'xla', 'matmul_dw')}
    xla_cpu, matmul_cpu = (op_counts(step[i].lower(('cpu',))) for i in ('xla', 'matmul_dw'))
    assert matmul_cpu['dot_general'] > xla_cpu['dot_general']  # the two impls are told apart
    assert op_counts(step['auto'].lower(('cpu',))) == matmul_cpu
    for platform in ACCELERATORS:
        auto = op_counts(step['auto'].lower((platform,)))
        assert auto == op_counts(step['xla'].lower((platform,))), platform
        assert auto['dot_general'] == xla_cpu['dot_general'], platform


def test_paper_csi_step_lowers():
    """configs/csi_cifar.py at 32 images per step, alone and as a K = 10 vmapped stack."""
    c = csi_cifar.get_config()
    c.batch_size = 32
    single = programs.train_step(c, (32, 32, 3))
    stack = programs.train_step(c, (32, 32, 3), stack=10)
    for platform in ACCELERATORS:
        one = op_counts(single.lower((platform,)))
        lowered = stack.lower((platform,))
        assert one['convolution'] > 0, platform
        assert op_counts(lowered)['convolution'] == one['convolution'], platform
        # the stack's parameters carry the model axis: (10, 3, 3, 3, 64) for the stem kernel
        assert 'tensor<10x3x3x3x64xf32>' in lowered.as_text(), platform


@pytest.mark.parametrize('name', sorted(REGISTRY))
def test_every_method_lowers(name):
    """Train step (alone and stacked), feature pass, fit_scoring and scorer of each method."""
    config = TINY_CONFIGS[name](NO_DATA)
    image_shape = (config.data.image_size,) * 2 + (config.data.channels,)
    method = get_method(config, programs.DEFAULT_BUDGET)
    for program in (programs.train_step(config, image_shape),
                    programs.train_step(config, image_shape, stack=2),
                    programs.feature_program(method, image_shape, config.eval.batch_size),
                    programs.fit_scoring_program(method, image_shape, num_bank=24),
                    programs.score_program(method, image_shape, num_bank=24, num_test=16)):
        for platform in ACCELERATORS:
            text = program.lower((platform,)).as_text()
            assert 'func.func public @main' in text, (name, program.name, platform)
            # no host callback survives into an accelerator program
            assert 'callback' not in text, (name, program.name, platform)
