"""Conformance: every registered method works everywhere the library reads a method.

For each name in `jaxad.methods.REGISTRY` (collected from the registry itself, so a newly
registered method is picked up by this file without edits to the parametrisation), on tiny
data, one process:

  1. train: `train.train_and_evaluate(config, workdir)` with total_steps=1: init, one
     optimizer step (none for a method that trains nothing, `Method.trains`), the scoring
     fit (bank pass or bank-free), the final checkpoint, the evaluation (results.json);
  2. contract: the method object is a `jaxad.methods.base.Method` of the registered class,
     with every member of `base.MEMBERS`, its required members overridden, its config section
     in the config and its scores holding `headline_score`, finite, one per test image;
  3. checkpoint round trip: `scoring.load_model(workdir)` restores exactly the variables and
     scoring state the run evaluated with (leaf by leaf, bit-equal);
  4. predict: `predict.predict(workdir, images.npz)` scores every test image, finite
     `pred_score` = the headline score; the evaluator's own compiled program on the restored
     model gives the same scores, and test image 0 (augmentation index 0 in both) scores what
     the run's evaluation gave it;
  5. export: `export.export_run` + `export.load(...).score(images)` equals predict's scores
     (image scores and anomaly maps), to float32 tolerance.

A method registered without an entry in TINY_CONFIGS fails with a message saying what to add.
`test_toy_method_walkthrough` registers tests/toy_method.py's one-file method with one line and
runs the same checks (README.md, "Adding a method").
"""
import json
import os
import time

import jax
import numpy as np
import pytest

from configs import recipes
from jaxad import config as jc
from jaxad import evaluate as eval_lib
from jaxad import export, fingerprint, predict, scoring, train
from jaxad.data import synthetic
from jaxad.methods import REGISTRY, Method, StepBudget, base, get_method
from tests.helpers import make_npz, set_fields
from tests.toy_method import Toy

# Float32 arithmetic of the same maths in differently compiled programs (batch, padding,
# fusion; the export folds the weights in as constants): 1e-5 relative to each value and,
# for values near zero after a cancellation, 1e-5 of the array's largest magnitude.
TOL = 1e-5
REQUIRED = ('init_variables', 'loss', 'features', 'fit_scoring', 'score')
WALL = {}  # method -> seconds of its conformance run (printed at the end of the module)


# ----------------------------------------------------------------------------- tiny data

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """One image set (the helpers' 3-class 8x8 .npz) and one pixel set (the synthetic
    MVTec-style `weave` category, 16 px, with masks) for the whole module."""
    root = tmp_path_factory.mktemp('conformance_data')
    npz = make_npz(root / 'tiny.npz')
    synthetic.write_mvtec(root / 'synth', 'weave', size=16, num_train=8, num_good_test=2,
                          num_per_defect=1)
    return {'npz': str(npz), 'synth': str(root / 'synth')}


# Shared by every tiny config: one step, one device (compiles fastest), no plots.
TINY = {
    'model.name': 'resnet10', 'model.width': 4, 'batch_size': 8, 'total_steps': 1,
    'num_devices': 1, 'log_every': 1, 'eval.batch_size': 16, 'eval.num_samples': 2,
    'eval.plots': False, 'checkpoint.every_steps': 100, 'checkpoint.use_async': False,
}


def on_images(c, data, **overrides):
    """Config `c` (a method recipe) shrunk to the 8x8 .npz, class 0 normal."""
    return set_fields(c, **{**TINY, **{
        'data.source': 'numpy', 'data.numpy_path': data['npz'], 'data.image_size': 8,
        'data.normal_classes': (0,)}, **overrides})


def on_pixels(c, data, **overrides):
    """Config `c` shrunk to the synthetic 16 px MVTec-style set (pixel masks)."""
    return set_fields(c, **{**TINY, **{
        'data.source': 'mvtec', 'data.path': data['synth'], 'data.category': 'weave',
        'data.image_size': 16, 'data.normal_classes': (0,), 'model.stem': 'cifar',
        'eval.batch_size': 8}, **overrides})


# method name -> data -> its tiny config: the method's recipe (configs/recipes.py) on tiny data.
TINY_CONFIGS = {
    'csi': lambda d: on_images(jc.base_config('csi'), d, **{'model.proj_dim': 8}),
    'msc': lambda d: on_images(recipes.msc_base(), d),
    'mcl': lambda d: on_images(recipes.mcl_base(), d, **{
        'model.proj_dim': 4, 'model.proj_hidden': 8, 'mcl.fit_fraction': 1.0,
        'mcl.cov_ridge': 1e-6}),
    # warm-up 0: the outlier term is in the one step's loss
    'oecl': lambda d: on_images(recipes.oecl_base(), d, **{
        'model.proj_dim': 8, 'oe.source': 'other_classes', 'oecl.warmup_epochs': 0}),
    'self_oecl': lambda d: on_images(recipes.oecl_base(), d, **{
        'method': 'self_oecl', 'model.proj_dim': 8, 'oe.source': 'normal',
        'oecl.warmup_epochs': 0}),
    'anomem': lambda d: on_images(recipes.anomem_base(), d, **{
        'model.proj_dim': 8, 'anomem.num_prototypes': 8}),
    'recontrast': lambda d: on_pixels(recipes.recontrast_base(), d),
    # a fixed encoder, no step: the ResNet one (random weights) with patch anomaly maps from
    # a coreset of half the normal patches; the pixel and ViT encoders: test_feature_knn.py
    'feature_knn': lambda d: on_pixels(jc.base_config('feature_knn'), d, **{
        'feature_knn.patch_maps': True, 'feature_knn.resnet_stage': 2,
        'feature_knn.coreset': 0.5}),
}


def tiny_config_for(name, data):
    if name not in TINY_CONFIGS:
        pytest.fail(
            f'method {name!r} is registered in jaxad.methods.REGISTRY but '
            f'tests/test_conformance.py has no tiny config for it. Add an entry to TINY_CONFIGS: '
            f"'{name}': lambda d: on_images(<your recipe, e.g. jc.base_config({name!r})>, d, "
            "**{<fields that shrink it further>}) (on_pixels for a method that needs pixel "
            'masks); it must train one step in a few seconds on CPU (see TINY).')
    return TINY_CONFIGS[name](data)


# ----------------------------------------------------------------------------- the checks

@pytest.fixture
def recorder(monkeypatch):
    """What the trainer's final evaluation was given and scored: the method object, the
    in-memory variables and scoring state (the ones it saved in the final checkpoint), the
    mesh, the test set, and the evaluation's scores."""
    record = {}
    real_evaluate, real_score_features = eval_lib.evaluate, eval_lib.score_features

    def evaluate(method, variables, scoring_state, test_set, normal_classes, **kwargs):
        record.update(method=method, variables=jax.device_get(variables),
                      scoring=jax.device_get(scoring_state), mesh=kwargs['mesh'],
                      test_set=test_set)
        return real_evaluate(method, variables, scoring_state, test_set, normal_classes,
                             **kwargs)

    def score_features(method, scoring_state, features, *args, **kwargs):
        scores = real_score_features(method, scoring_state, features, *args, **kwargs)
        record['scores'] = scores
        return scores

    monkeypatch.setattr(eval_lib, 'evaluate', evaluate)
    monkeypatch.setattr(eval_lib, 'score_features', score_features)
    return record


def flat(tree):
    """{path string: host array} of a pytree (dicts and lists/tuples alike)."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def assert_trees_equal(restored, saved, what):
    restored, saved = flat(restored), flat(saved)
    assert sorted(restored) == sorted(saved), f'{what}: restored leaves differ from the saved'
    for key, value in saved.items():
        assert restored[key].dtype == value.dtype and restored[key].shape == value.shape, \
            f'{what}{key}: {restored[key].dtype}{restored[key].shape} restored, ' \
            f'{value.dtype}{value.shape} saved'
        np.testing.assert_array_equal(restored[key], value, err_msg=f'{what}{key}')


def check_contract(method, name, config):
    """The written contract of jaxad/methods/base.py, on one method object."""
    cls = REGISTRY[name]
    assert isinstance(method, Method) and type(method) is cls, (type(method), cls)
    missing = [m for m in base.MEMBERS if not hasattr(method, m)]
    assert not missing, f'{name}: members of Method missing: {missing}'
    not_overridden = [m for m in REQUIRED if getattr(cls, m) is getattr(Method, m)]
    assert not not_overridden, f'{name}: required members not implemented: {not_overridden}'
    if method.uses_consts:
        assert cls.fit_consts is not Method.fit_consts, f'{name}: uses_consts without fit_consts'
    assert method.model is not None, f'{name}: __init__ must set `model`'
    assert isinstance(method.headline_score, str) and method.headline_score, \
        f'{name}: __init__ must set `headline_score`'
    assert set(method.inputs) <= {'label', 'outlier'}, method.inputs
    # The config section: a class attribute, its defaults in every config, its fields read.
    section = cls.config_section
    assert section and section in config, f'{name}: config_section {section!r} not in config'
    defaults = cls.default_config()
    assert set(defaults.keys()) <= set(config[section].keys())
    assert set(defaults.keys()) <= set(jc.base_config(name)[section].keys())
    for field in cls.scoring_fields:  # dotted fields of the config
        node = config
        for part in field.split('.'):
            assert part in node, f'{name}: scoring_fields names {field!r}, not in the config'
            node = node[part]


def assert_close(actual, desired, what):
    desired = np.asarray(desired)
    scale = max(1.0, float(np.max(np.abs(desired)))) if desired.size else 1.0
    np.testing.assert_allclose(actual, desired, rtol=TOL, atol=TOL * scale, err_msg=what)


def check_scores(scores, method, n, what):
    image, maps = eval_lib.split_maps(scores)
    assert method.headline_score in image, \
        f'{what}: headline_score {method.headline_score!r} not among {sorted(scores)}'
    for key, value in image.items():
        assert np.shape(value) == (n,), f'{what}: {key} has shape {np.shape(value)}'
        assert np.all(np.isfinite(value)), f'{what}: {key} not finite'
    for key, value in maps.items():
        assert np.ndim(value) == 3 and len(value) == n, f'{what}: map {key} {np.shape(value)}'
        assert np.all(np.isfinite(value)), f'{what}: map {key} not finite'
    return image, maps


def run_conformance(name, config, record, tmp_path):
    t0 = time.time()
    workdir = str(tmp_path / 'run')

    # 1. init -> one step -> scoring fit -> score -> final checkpoint -> results.json.
    results = train.train_and_evaluate(config, workdir)
    assert record, 'the trainer did not call jaxad.evaluate.evaluate (conformance recorder)'
    method = record['method']
    test_images = np.stack([np.asarray(x, np.uint8) for x in record['test_set'].images])
    n = len(test_images)
    assert results['headline_score'] == method.headline_score
    assert np.isfinite(results['image_AUROC'])
    with open(os.path.join(workdir, 'results.json')) as f:
        assert json.load(f)['headline_score'] == method.headline_score

    # 2. the contract, on the trained method and on a scoring-only one.
    check_contract(method, name, config)
    steps = 1 if method.trains else 0  # a method that trains nothing takes no step
    assert method.budget == StepBudget(method.budget.steps_per_epoch, steps)
    assert get_method(config).budget is None
    eval_image, eval_maps = check_scores(record['scores'], method, n, f'{name} evaluation')

    # 3. checkpoint round trip: the restored model is the one that was evaluated.
    model = scoring.load_model(workdir)
    check_contract(model.method, name, model.config)
    assert model.step == steps and model.score_name == method.headline_score
    assert_trees_equal(model.variables, record['variables'], f'{name} variables')
    assert_trees_equal(model.scoring, record['scoring'], f'{name} scoring state')

    # 4. predict on the test images, from the workdir alone.
    images_npz = tmp_path / 'images.npz'
    np.savez(images_npz, images=test_images)
    out = predict.predict(workdir, images_npz, output=tmp_path / 'predictions')
    assert out['num_images'] == n and out['num_skipped'] == 0
    assert out['score_name'] == method.headline_score and out['step'] == steps
    assert (tmp_path / 'predictions' / 'predictions.csv').is_file()
    live = {k: np.array([r[k] for r in out['images']]) for k in eval_image}
    np.testing.assert_array_equal(live[method.headline_score],
                                  [r['pred_score'] for r in out['images']])
    assert np.all(np.isfinite(live[method.headline_score]))
    live_maps = {}
    if eval_maps:
        saved = np.load(tmp_path / 'predictions' / 'anomaly_maps.npz')
        live_maps = {k: saved[k] for k in eval_maps}
    # The evaluator's compiled program on the restored model, every image at augmentation
    # index 0 under the evaluation key (what predict draws): predict's scores.
    feature_fn = eval_lib.make_feature_fn(method, record['mesh'])
    b = config.eval.batch_size
    padded = np.concatenate([test_images, np.repeat(test_images[:1], -n % b, axis=0)])
    key = eval_lib.eval_test_key(config.seed)
    parts = [feature_fn(model.variables, padded[s:s + b], np.zeros(b, np.int32), key)
             for s in range(0, len(padded), b)]
    feats = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs)[:n], *jax.device_get(parts))
    at_zero = eval_lib.score_features(method, model.scoring, feats)
    for k in eval_image:
        assert_close(live[k], at_zero[k], f'{name} {k}: predict vs the evaluator program')
        # Test image 0 has augmentation index 0 in the evaluation too.
        assert_close(live[k][:1], eval_image[k][:1], f'{name} {k}: predict vs evaluation')
    for k in eval_maps:
        assert_close(live_maps[k], at_zero[k], f'{name} {k}: predict vs the evaluator program')
        assert_close(live_maps[k][:1], eval_maps[k][:1], f'{name} {k}: predict vs evaluation')

    # 5. export: the self-contained artifact scores as predict does.
    meta = export.export_run(workdir, tmp_path / 'export')
    assert meta['method'] == name and meta['headline_score'] == method.headline_score
    assert set(meta['score_names']) == set(eval_image) | set(eval_maps)
    exported = export.load(tmp_path / 'export').score(test_images)
    for k in eval_image:
        assert_close(exported[k], live[k], f'{name} {k}: export vs predict')
    for k in eval_maps:
        assert_close(exported[k], live_maps[k], f'{name} {k}: export vs predict')
    WALL[name] = round(time.time() - t0, 1)


@pytest.mark.parametrize('name', sorted(REGISTRY))
def test_registered_method_conforms(name, data, recorder, tmp_path):
    run_conformance(name, tiny_config_for(name, data), recorder, tmp_path)


def test_toy_method_walkthrough(data, recorder, tmp_path, monkeypatch):
    """README's "Adding a method", end to end: a method written in one file
    (tests/toy_method.py) and registered with one line passes the same checks."""
    monkeypatch.setitem(REGISTRY, 'toy', Toy)  # jaxad/methods/__init__.py: 'toy': Toy,
    config = jc.base_config('toy')  # now holds config.toy, Toy.default_config()
    assert config.toy.temperature == 0.5
    config = on_images(config, data, **{'model.proj_dim': 8})
    run_conformance('toy', config, recorder, tmp_path)


def test_a_method_without_a_tiny_config_is_told_what_to_add(data):
    """The guard a newly registered method meets first."""
    with pytest.raises(pytest.fail.Exception, match='no tiny config for it. Add an entry'):
        tiny_config_for('not_a_method', data)


def test_a_method_registered_at_run_time_is_neutral_for_the_others(monkeypatch):
    monkeypatch.setitem(REGISTRY, 'toy', Toy)
    fields = fingerprint.training_fields(jc.base_config('csi'))
    assert not [f for f in fields if f.startswith('toy.')]


def teardown_module():
    if WALL:
        print('\nconformance wall time (s): ' + ', '.join(f'{k} {v}' for k, v in WALL.items()))


def test_a_method_missing_a_required_member_cannot_be_built():
    """The contract's required members are abstract: a subclass without them fails at
    construction (Python's TypeError naming each), not at its first use in training."""
    class Partial(Method):
        def init_variables(self, key, image_shape):
            return {}

    with pytest.raises(TypeError, match='features, fit_scoring, loss, score'):
        Partial(jc.csi_base())
