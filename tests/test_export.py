"""Export: the jax.export artifact, reloaded in a fresh process, scores as predict does."""
import json
import os
import subprocess
import sys
import textwrap

import importlib.util

import numpy as np

import pytest

from jaxad import export, predict
from jaxad.errors import ConfigError
from tests.helpers import CHILD_XLA_FLAGS, skip_unless_on_ci
from tests.predict_run import trained_run

# jax.export serialization needs flatbuffers (a jaxad install requirement); on CI a
# missing one fails the test instead of skipping it.
needs_flatbuffers = skip_unless_on_ci(importlib.util.find_spec('flatbuffers') is None,
                                      'jax.export serialization needs flatbuffers')


@needs_flatbuffers
def test_export_round_trip_in_a_fresh_process(tmp_path_factory, tmp_path):
    run = trained_run(tmp_path_factory)
    out = tmp_path / 'export'
    meta = export.export_run(run.workdir, out)
    assert (out / export.ARTIFACT).is_file()
    saved = json.loads((out / export.META).read_text())
    assert saved == json.loads(json.dumps(meta))
    assert saved['input']['shape'][1:] == [8, 8, 3] and saved['input']['dtype'] == 'uint8'
    assert saved['headline_score'] == 'csi'
    assert set(saved['score_names']) == {'csi', 'csi_sim', 'csi_shift', 'knn_cosine'}
    assert saved['threshold_rule'] == 'normal_quantile'
    threshold = json.loads((run.workdir / 'threshold.json').read_text())
    assert saved['threshold_value'] == threshold['value']
    # one artifact for every platform (export.platforms' default), made on this CPU
    assert saved['platforms'] == ['cpu', 'cuda', 'tpu']

    # 21 images: not a multiple of any batch, so padding is exercised on both sides.
    images = np.concatenate([run.data['test_images'], run.data['train_images'][:-3]])[:21]
    np.save(tmp_path / 'images.npy', images)
    live = predict.predict(run.workdir, _as_npz(tmp_path, images), output=tmp_path / 'pred')
    code = textwrap.dedent(f"""
        import numpy as np
        from jaxad import export
        artifact = export.load({str(out)!r})
        out = artifact.predict(np.load({str(tmp_path / 'images.npy')!r}))
        np.savez({str(tmp_path / 'fresh.npz')!r}, is_anomaly=out['is_anomaly'],
                 **{{k: out[k] for k in artifact.meta['score_names']}})
        print(out['threshold_rule'])
    """)
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ['normal_quantile']
    fresh = np.load(tmp_path / 'fresh.npz')
    for name in saved['score_names']:
        want = np.array([r[name] for r in live['images']])
        np.testing.assert_allclose(fresh[name], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fresh['is_anomaly'], [r['is_anomaly'] for r in live['images']])


def _as_npz(tmp_path, images):
    path = tmp_path / 'images.npz'
    np.savez(path, images=images)
    return path


@needs_flatbuffers
def test_export_platforms_flag(tmp_path_factory, tmp_path):
    """`--config.export.platforms` chooses the platforms in the artifact; a typo is one clear
    error naming the choices, and an artifact without cpu says so when loaded here."""
    run = trained_run(tmp_path_factory)
    config = run.config
    config.export.platforms = 'cuda,tpu'
    meta = export.export_run(run.workdir, tmp_path / 'accel', config=config)
    assert meta['platforms'] == ['cuda', 'tpu']
    artifact = export.load(tmp_path / 'accel')
    with pytest.raises(Exception, match='cpu'):
        artifact.score(run.data['test_images'][:2])
    config.export.platforms = 'cpu,gpu'
    with pytest.raises(ConfigError, match=r"export.platforms='cpu,gpu': choose one or more "
                                          r'of cpu,cuda,tpu'):
        export.export_run(run.workdir, tmp_path / 'bad', config=config)


# What loading an artifact and scoring files must not need: jaxad's other requirements.
NOT_NEEDED = ('orbax', 'flax', 'optax', 'grain', 'tensorflow_datasets', 'ml_collections',
              'absl')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@needs_flatbuffers
def test_loading_and_scoring_files_needs_only_jax_numpy_pillow(tmp_path_factory, tmp_path):
    """The module docstring's promise: `load(OUT)` and `score_files` run with jax, NumPy and
    Pillow. A child process where importing orbax, flax, optax, grain, tensorflow_datasets,
    ml_collections or absl fails (stand-in packages first on PYTHONPATH) loads a real
    artifact and scores image files (resized, one unreadable), with this process's scores."""
    from PIL import Image
    run = trained_run(tmp_path_factory)
    out = tmp_path / 'export'
    export.export_run(run.workdir, out)
    files = tmp_path / 'files'
    files.mkdir()
    images = np.concatenate([run.data['test_images'][:3], run.data['train_images'][:2]])
    for i, image in enumerate(images):  # 12x12: score_files resizes them to the run's 8x8
        Image.fromarray(image).resize((12, 12)).save(files / f'{i}.png')
    (files / 'broken.png').write_bytes(b'not a png')  # skipped, with the reason
    names, want, skipped = export.load(out).score_files(files)
    assert len(names) == len(images) and [s['path'] for s in skipped] == [
        str(files / 'broken.png')]

    blocked = tmp_path / 'blocked'
    for name in NOT_NEEDED:
        (blocked / name).mkdir(parents=True)
        (blocked / name / '__init__.py').write_text(
            f'raise ImportError("{name} is not installed here", name={name!r})\n')
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from jaxad import export
        names, scores, skipped = export.load({str(out)!r}).score_files({str(files)!r})
        np.savez({str(tmp_path / 'child.npz')!r}, names=names, **scores)
        print(len(skipped), sorted({{m.split('.')[0] for m in sys.modules}}
                                   & set({NOT_NEEDED!r})))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(('XLA_', 'JAX_'))}
    env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=CHILD_XLA_FLAGS, PYTHONPATH=os.pathsep.join(
        p for p in (str(blocked), REPO, env.get('PYTHONPATH')) if p))
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ['1', '[]']
    child = np.load(tmp_path / 'child.npz')
    assert list(child['names']) == names
    assert sorted(set(child.files) - {'names'}) == sorted(want)
    for name in want:  # another process's compile: equal up to float32 rounding
        np.testing.assert_allclose(child[name], want[name], rtol=1e-5, atol=1e-5)
