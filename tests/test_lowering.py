"""Every program a run compiles lowers for a GPU (cuda) and a TPU, on this CPU-only machine.

`jax.jit(...).trace(...).lower(lowering_platforms=...)` builds the StableHLO a GPU or TPU would
compile, with the same jit wrappers (shardings, donation) the trainer and the evaluator use
(`jaxad.programs`). A CPU-only path (a host callback, a CPU custom call, a branch on the
tracing machine's backend) fails here instead of on the user's accelerator: every
`stablehlo.custom_call` of a cuda or tpu lowering must call a target in that platform's
allow-list (`ACCELERATOR_TARGETS`), and no host callback may be in the text.

* `model.conv_impl='auto'` resolves per lowering platform: the CPU lowering has the matmul
  weight gradient (`jaxad.models.conv`), the cuda and tpu lowerings have exactly XLA's
  convolutions, op for op what `conv_impl='xla'` gives.
* The paper-size CSI step (configs/csi_cifar.py, ResNet-18 width 64, 32 images) alone and as a
  K = 10 stack under vmap.
* For every registered method (the conformance test's tiny configs): the train step, the
  evaluator's feature pass, fit_scoring and the scorer.
"""
import re

import pytest

from configs import csi_cifar
from jaxad import programs
from jaxad.methods import REGISTRY, get_method
from tests.helpers import set_fields
from tests.test_conformance import TINY_CONFIGS

ACCELERATORS = ('cuda', 'tpu')
# The custom-call targets an accelerator lowering may call. The only ones the programs below
# lower to today are the batched symmetric eigendecomposition of MCL's fit_scoring
# (jnp.linalg.eigh: cuSOLVER on cuda, XLA's Eigh expander on tpu; on cpu it is LAPACK's
# lapack_ssyevd_ffi, which a GPU or TPU cannot run). The SPMD partitioner's markers are
# handled by XLA itself on every platform. Anything else (a lapack_* or other CPU kernel, a
# host callback) fails the tests; a new accelerator kernel is added here knowingly.
_PARTITIONER_TARGETS = {'Sharding', 'SPMDFullToShardShape', 'SPMDShardToFullShape'}
ACCELERATOR_TARGETS = {'cuda': {'cusolver_syevd_ffi'} | _PARTITIONER_TARGETS,
                       'tpu': {'Eigh'} | _PARTITIONER_TARGETS}
# lowering needs only the configs, not the files they name
NO_DATA = {'npz': '/nonexistent/tiny.npz', 'synth': '/nonexistent/synth'}


def op_counts(lowered):
    """{'convolution': n, 'dot_general': n, 'custom_call': n} of a lowered module's text."""
    text = lowered.as_text()
    return {op: len(re.findall(rf'stablehlo\.{op}\b', text))
            for op in ('convolution', 'dot_general', 'custom_call')}


def custom_call_targets(text):
    """The call_target_name of every stablehlo.custom_call in a lowered module's text (the
    pretty form `stablehlo.custom_call @name(...)` and the generic form's attribute)."""
    targets = re.findall(r'stablehlo\.custom_call\s+@([\w.$-]+)', text)
    targets += re.findall(r'"stablehlo\.custom_call"\(.*?call_target_name\s*=\s*"([^"]+)"',
                          text)
    # every custom call was read: none hides in a form the patterns above do not know
    assert len(targets) == len(re.findall(r'stablehlo\.custom_call\b', text)), text
    return targets


def assert_runs_on(text, platform, where):
    """No custom call outside `platform`'s allow-list and no host callback in `text`."""
    bad = sorted(set(custom_call_targets(text)) - ACCELERATOR_TARGETS[platform])
    assert not bad, f'{where}: custom calls {bad} are not known to run on {platform}'
    assert 'callback' not in text, where


def test_custom_call_targets_are_read_and_cpu_kernels_rejected():
    """The check itself: MCL's fit_scoring calls LAPACK in its cpu lowering, which the cuda
    and tpu allow-lists reject, and each accelerator's own eigh kernel, which they accept."""
    config = TINY_CONFIGS['mcl'](NO_DATA)
    image_shape = (config.data.image_size,) * 2 + (config.data.channels,)
    method = get_method(config, programs.DEFAULT_BUDGET)
    program = programs.fit_scoring_program(method, image_shape, num_bank=24)
    cpu = program.lower(('cpu',)).as_text()
    assert custom_call_targets(cpu) == ['lapack_ssyevd_ffi']
    for platform in ACCELERATORS:
        with pytest.raises(AssertionError, match=r"custom calls \['lapack_ssyevd_ffi'\]"):
            assert_runs_on(cpu, platform, 'mcl fit_scoring (cpu lowering)')
    assert custom_call_targets(program.lower(('cuda',)).as_text()) == ['cusolver_syevd_ffi']
    assert custom_call_targets(program.lower(('tpu',)).as_text()) == ['Eigh']
    generic = ('%0 = "stablehlo.custom_call"(%arg0) {call_target_name = "lapack_sgesdd_ffi"} : '
               '(tensor<4x4xf32>) -> tensor<4x4xf32>')
    assert custom_call_targets(generic) == ['lapack_sgesdd_ffi']


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
        lowered = step['auto'].lower((platform,))
        assert_runs_on(lowered.as_text(), platform, f'tiny csi step, {platform}')
        auto = op_counts(lowered)
        assert auto == op_counts(step['xla'].lower((platform,))), platform
        assert auto['dot_general'] == xla_cpu['dot_general'], platform


def test_step_with_training_images_on_the_device_lowers():
    """data.on_device: the step gathers its batch from device-resident images (a table of
    5000 CIFAR-size images, one class's training set) for cuda and tpu; the batch the host
    sends is int32 positions, and the gather is in the program."""
    c = _tiny_csi('auto')
    c.batch_size = 8
    program = programs.train_step(c, (32, 32, 3), table_rows=5000)
    for platform in ACCELERATORS:
        text = program.lower((platform,)).as_text()
        assert_runs_on(text, platform, f'tiny csi step on device, {platform}')
        assert 'tensor<5000x32x32x3xui8>' in text and 'tensor<8xi32>' in text, platform
        assert re.search(r'stablehlo\.(dynamic_)?gather', text), platform


def test_vit_feature_knn_with_patch_maps_lowers():
    """feature_knn's ViT encoder (DINOv2's ViT-S/14 shapes, random weights, 224 px: class
    token and 16 x 16 patch tokens) and its patch-bank scorer with a coreset, for cuda and
    tpu: the feature pass, fit_scoring (the greedy coreset's loop) and the scorer."""
    from configs import knn_features
    config = knn_features.get_config('encoder=dinov2_vits14,weights=random,patch_maps=True,'
                                     'coreset=0.5')
    config.eval.batch_size = 2
    method = get_method(config, programs.DEFAULT_BUDGET)
    image_shape = (32, 32, 3)  # CIFAR images, resized to 224 inside the feature pass
    for program in (programs.feature_program(method, image_shape, 2),
                    programs.fit_scoring_program(method, image_shape, num_bank=4),
                    programs.score_program(method, image_shape, num_bank=4, num_test=2)):
        for platform in ACCELERATORS:
            text = program.lower((platform,)).as_text()
            assert_runs_on(text, platform, f'feature_knn vit {program.name}')
    features = programs.feature_program(method, image_shape, 2).lower(('tpu',)).as_text()
    assert 'tensor<2x16x16x384xf32>' in features  # the patch tokens


def test_paper_csi_step_lowers():
    """configs/csi_cifar.py at 32 images per step, alone and as a K = 10 vmapped stack."""
    c = csi_cifar.get_config()
    c.batch_size = 32
    single = programs.train_step(c, (32, 32, 3))
    stack = programs.train_step(c, (32, 32, 3), stack=10)
    for platform in ACCELERATORS:
        alone = single.lower((platform,))
        one = op_counts(alone)
        lowered = stack.lower((platform,))
        assert_runs_on(alone.as_text(), platform, f'csi step, {platform}')
        assert_runs_on(lowered.as_text(), platform, f'csi stack of 10, {platform}')
        assert one['convolution'] > 0, platform
        assert op_counts(lowered)['convolution'] == one['convolution'], platform
        # the stack's parameters carry the model axis: (10, 3, 3, 3, 64) for the stem kernel
        assert 'tensor<10x3x3x3x64xf32>' in lowered.as_text(), platform


@pytest.mark.parametrize('name', sorted(REGISTRY))
def test_every_method_lowers(name):
    """Train step (alone and stacked; where the method trains), feature pass, fit_scoring and
    scorer of each method."""
    config = TINY_CONFIGS[name](NO_DATA)
    image_shape = (config.data.image_size,) * 2 + (config.data.channels,)
    method = get_method(config, programs.DEFAULT_BUDGET)
    # a method that trains nothing (feature_knn) has no train step to lower
    steps = ((programs.train_step(config, image_shape),
              programs.train_step(config, image_shape, stack=2)) if method.trains else ())
    for program in steps + (
            programs.feature_program(method, image_shape, config.eval.batch_size),
            programs.fit_scoring_program(method, image_shape, num_bank=24),
            programs.score_program(method, image_shape, num_bank=24, num_test=16)):
        for platform in ACCELERATORS:
            text = program.lower((platform,)).as_text()
            assert 'func.func public @main' in text, (name, program.name, platform)
            assert_runs_on(text, platform, f'{name} {program.name}')
