"""Predict, thresholds and calibrate from a finished run's checkpoint alone (issue 6)."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxad import inputs as inputs_lib
from jaxad import predict, scoring, thresholds
from jaxad.config import load_run_config
from jaxad.errors import ConfigError, DataError, TrainingError
from tests.predict_run import HOLDOUT_FRACTION, trained_run


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    run = trained_run(tmp_path_factory)
    run.model = scoring.load_model(run.workdir)  # config.json + checkpoint, no training data
    return run


def normal_train_split(run):
    labels = run.data['train_labels']
    return thresholds.holdout_split(np.flatnonzero(labels == 0), HOLDOUT_FRACTION, 0)


def test_load_run_config_rebuilds_the_config(run):
    config = load_run_config(run.workdir)
    assert config.data.image_size == 8 and config.model.width == 4
    assert config.threshold.holdout_fraction == HOLDOUT_FRACTION
    assert tuple(config.data.normal_classes) == (0,)
    assert config.threshold.value is None
    config.threshold.value = 0.5  # a typed placeholder, as in csi_base
    with pytest.raises(ConfigError, match='holds no training run'):
        load_run_config(run.workdir / 'nowhere')


def test_holdout_is_out_of_the_bank_and_calibrates_the_quantile(run):
    train_idx, hold_idx = normal_train_split(run)
    assert (len(train_idx), len(hold_idx)) == (12, 4)
    assert not set(train_idx) & set(hold_idx)
    # The bank holds the 12 training images only: (K, M, D).
    assert run.model.scoring['axis'].shape[:2] == (4, 12)
    record = json.loads((run.workdir / 'threshold.json').read_text())
    assert record['rule'] == 'normal_quantile' and record['score'] == 'csi'
    assert (record['num_normal'], record['quantile'], record['step']) == (4, 0.95, 0)
    # Rescored from the restored checkpoint (independently of Run.finish).
    scores = scoring.score_array(run.model, run.data['train_images'][hold_idx])['csi']
    np.testing.assert_allclose(record['value'], np.quantile(scores, 0.95), rtol=1e-5, atol=1e-6)
    results = json.loads((run.workdir / 'results.json').read_text())
    assert results['threshold']['rule'] == 'normal_quantile'


def test_scores_do_not_depend_on_batch_position(run):
    images = run.data['test_images']  # 24 images: batches of 16, the last padded
    a = scoring.score_array(run.model, images)
    b = scoring.score_array(run.model, np.roll(images, 7, axis=0))
    for name in a:
        np.testing.assert_allclose(np.roll(b[name], -7), a[name], rtol=1e-6, atol=1e-6)
    assert np.std(a['csi']) > 0  # the images are not all scored alike


def _write_folder(root):
    rng = np.random.default_rng(1)
    (root / 'sub').mkdir(parents=True)
    exact = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    big = rng.integers(0, 256, (20, 12, 3), dtype=np.uint8)  # H=20, W=12: resized
    grey = rng.integers(0, 256, (5, 5), dtype=np.uint8)  # L: converted to RGB, resized
    Image.fromarray(exact).save(root / 'a.png')
    Image.fromarray(big).save(root / 'sub' / 'b.png')
    Image.fromarray(grey).save(root / 'c.png')
    (root / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    (root / 'notes.txt').write_text('not an image')
    # What predict must feed the model, built here with Pillow directly.
    expected = [exact,
                np.asarray(Image.fromarray(big).resize((8, 8), Image.Resampling.BILINEAR)),
                np.asarray(Image.fromarray(grey).convert('RGB').resize(
                    (8, 8), Image.Resampling.BILINEAR))]
    return [str(root / 'a.png'), str(root / 'sub' / 'b.png'), str(root / 'c.png')], expected


def test_predict_folder_skips_corrupt_file_and_scores_the_rest(run, tmp_path):
    paths, expected = _write_folder(tmp_path / 'images')
    out = tmp_path / 'out'
    result = predict.predict(run.workdir, tmp_path / 'images', output=out)
    assert [s['path'] for s in result['skipped']] == [str(tmp_path / 'images' / 'corrupt.png')]
    assert result['skipped'][0]['reason']
    assert result['num_ignored_non_images'] == 1
    assert sorted(r['path'] for r in result['images']) == sorted(paths)
    saved = json.loads((out / 'predictions.json').read_text())
    assert saved['threshold_rule'] == 'normal_quantile' and saved['num_skipped'] == 1
    with open(out / 'predictions.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert {'path', 'pred_score', 'is_anomaly', 'threshold_rule', 'csi', 'knn_cosine'} <= set(rows[0])
    value = saved['threshold']['value']
    by_path = {r['path']: r for r in saved['images']}
    # The score function on the arrays Pillow gives directly.
    direct = scoring.score_array(run.model, np.stack(expected))
    for i, path in enumerate(paths):
        r = by_path[path]
        assert r['threshold_rule'] == 'normal_quantile'
        assert r['is_anomaly'] == (r['pred_score'] >= value)
        for name in direct:
            np.testing.assert_allclose(r[name], direct[name][i], rtol=1e-5, atol=1e-6)


def test_fixed_threshold_and_no_threshold(run, tmp_path):
    images = run.data['test_images'][:5]
    npz = tmp_path / 'new.npz'
    np.savez(npz, images=images, names=np.array([f'img{i}' for i in range(5)]))
    config = load_run_config(run.workdir)
    scores = scoring.score_array(run.model, images)['csi']
    config.threshold.value = float(np.median(scores))
    fixed = predict.predict(run.workdir, npz, output=tmp_path / 'fixed', config=config)
    assert fixed['threshold_rule'] == 'fixed'
    assert [r['path'] for r in fixed['images']] == [f'img{i}' for i in range(5)]
    assert [r['is_anomaly'] for r in fixed['images']] == list(scores >= np.median(scores))

    bare = tmp_path / 'bare'  # the same run without threshold.json
    shutil.copytree(run.workdir, bare)
    os.remove(bare / 'threshold.json')
    none = predict.predict(bare, npz, output=tmp_path / 'none')
    assert none['threshold_rule'] == 'none' and none['threshold'] is None
    assert all(r['is_anomaly'] is None for r in none['images'])
    assert '--mode=calibrate' in none['threshold_note']
    with open(tmp_path / 'none' / 'predictions.csv') as f:
        assert {r['is_anomaly'] for r in csv.DictReader(f)} == {''}


def test_calibrate_from_user_images(run, tmp_path):
    copy = tmp_path / 'run'
    shutil.copytree(run.workdir, copy)
    labels = run.data['test_labels']
    normal, anomalous = run.data['test_images'][labels == 0], run.data['test_images'][labels != 0]
    np.savez(tmp_path / 'normal.npz', images=normal)
    np.savez(tmp_path / 'anomalous.npz', images=anomalous)
    s_norm = scoring.score_array(run.model, normal)['csi'].astype(np.float64)
    s_anom = scoring.score_array(run.model, anomalous)['csi'].astype(np.float64)

    record = predict.calibrate(copy, tmp_path / 'normal.npz')
    assert record['rule'] == 'normal_quantile' and record['num_normal'] == len(normal)
    np.testing.assert_allclose(record['value'], np.quantile(s_norm, 0.95), rtol=1e-6)
    assert json.loads((copy / 'threshold.json').read_text()) == record

    record = predict.calibrate(copy, tmp_path / 'normal.npz', tmp_path / 'anomalous.npz')
    assert record['rule'] == 'f1_max' and record['num_anomalies'] == len(anomalous)
    want, _ = _f1_max_reference(np.r_[s_norm, s_anom],
                                np.r_[np.zeros(len(s_norm)), np.ones(len(s_anom))])
    np.testing.assert_allclose(record['value'], want, rtol=1e-6)
    out = predict.predict(copy, tmp_path / 'anomalous.npz', output=tmp_path / 'p')
    assert out['threshold_rule'] == 'f1_max'


def _f1_max_reference(scores, labels):
    """Brute force with scikit-learn: every distinct score as a threshold (>=)."""
    from sklearn.metrics import f1_score
    best = (-1.0, None)
    for t in np.unique(scores):  # ascending: '>=' keeps the highest t among equal F1
        f1 = f1_score(labels, scores >= t)
        if f1 >= best[0]:
            best = (f1, t)
    return best[1], best[0]


def test_threshold_rules_against_references():
    from sklearn.metrics import precision_recall_curve
    rng = np.random.default_rng(0)
    for n_anom in (1, 7, 30):
        scores = np.r_[rng.normal(0, 1, 50), rng.normal(1.5, 1, n_anom)].round(2)  # ties too
        labels = np.r_[np.zeros(50), np.ones(n_anom)]
        t, f1 = thresholds.f1_max(scores, labels)
        t_ref, f1_ref = _f1_max_reference(scores, labels)
        assert t == t_ref
        np.testing.assert_allclose(f1, f1_ref, rtol=1e-12)
        p, r, _ = precision_recall_curve(labels, scores)
        with np.errstate(invalid='ignore'):
            np.testing.assert_allclose(f1, np.nanmax(2 * p * r / (p + r)), rtol=1e-12)
    normal = rng.normal(size=101)
    for q in (0.95, 0.99):
        assert thresholds.normal_quantile(normal, q) == np.quantile(normal, q)
    record = thresholds.calibrate(normal, 0.99, score_name='csi')
    assert record['rule'] == 'normal_quantile' and record['num_anomalies'] == 0
    # No anomalies: f1_max refuses instead of flagging everything.
    with pytest.raises(DataError, match='normal_quantile'):
        thresholds.f1_max(normal, np.zeros(101))
    with pytest.raises(ConfigError):
        thresholds.check_quantile(1.5)
    assert thresholds.fixed(0.3, score_name='csi')['rule'] == 'fixed'
    train, hold = thresholds.holdout_split(np.arange(100, 140), 0.1, 3)
    assert len(hold) == 4 and sorted(np.r_[train, hold]) == list(range(100, 140))
    assert np.array_equal(hold, thresholds.holdout_split(np.arange(100, 140), 0.1, 3)[1])


def test_clear_errors(run, tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError, match='has no images'):
        predict.predict(run.workdir, tmp_path / 'empty')
    with pytest.raises(DataError, match='does not exist'):
        inputs_lib.list_inputs(tmp_path / 'missing')
    with pytest.raises(DataError, match='no image files'):
        inputs_lib.list_inputs(str(tmp_path / '*.png'))
    untrained = tmp_path / 'untrained'
    untrained.mkdir()
    shutil.copy(run.workdir / 'config.json', untrained)
    with pytest.raises(TrainingError, match='no checkpoint'):
        scoring.load_model(untrained)
    # The command line: one line on stderr, exit status 1, before any model loads.
    proc = subprocess.run(
        [sys.executable, '-m', 'jaxad.main', '--mode=predict', f'--workdir={run.workdir}',
         f'--input={tmp_path / "missing"}'],
        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=120)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith('jaxad: error')]
    assert errors == [f'jaxad: error: input {tmp_path / "missing"} does not exist (expected a '
                      'folder, a glob, a list file, an image or a .npz)']


def test_pixel_maps_are_written_as_pngs_next_to_the_scores(tmp_path):
    """A pixel method's maps: one PNG per image (min-max scaled), its path in the CSV/JSON."""
    import csv
    import types
    from PIL import Image
    from jaxad import predict
    rng = np.random.default_rng(0)
    maps = rng.uniform(size=(3, 5, 6)).astype(np.float32)
    scores = {'max': maps.max((1, 2)), 'anomaly_map': maps}
    model = types.SimpleNamespace(score_name='max', workdir=str(tmp_path), step=7)
    inputs = types.SimpleNamespace(what='3 files', ignored=0)
    names = ['a/x.png', 'b/y.jpg', 'z.png']
    result = predict.write_predictions(str(tmp_path / 'out'), names, scores, [], model, None,
                                       inputs)
    with open(tmp_path / 'out' / 'predictions.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['path'] for r in rows] == names
    for i, row in enumerate(rows):
        assert row['anomaly_map'] == result['images'][i]['anomaly_map']
        png = np.asarray(Image.open(row['anomaly_map']))
        m = maps[i]
        np.testing.assert_array_equal(
            png, np.uint8(np.round(255 * (m - m.min()) / (m.max() - m.min()))))
    with np.load(result['anomaly_maps_file']) as f:  # the unscaled maps, in input order
        np.testing.assert_array_equal(f['anomaly_map'], maps)
        assert list(f['names']) == names
