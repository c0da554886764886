"""Bad input: one clear message, non-zero exit, before any training."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxad import train
from jaxad.errors import ConfigError, DataError
from tests.helpers import make_npz, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args):
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
    return subprocess.run([sys.executable, '-m', 'jaxad.main', *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def folder_config(root, **overrides):
    c = tiny_config('unused', **overrides)
    c.data.source = 'folder'
    c.data.path = str(root)
    return c


def write_folder(root, size=8, classes=('a', 'b'), n=4):
    for split in ('train', 'test'):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(d / f'{i}.png')


def assert_not_trained(workdir):
    assert not os.path.exists(os.path.join(workdir, 'checkpoints'))


def test_missing_data_path(tmp_path):
    with pytest.raises(DataError, match='does-not-exist'):
        train.train_and_evaluate(folder_config(tmp_path / 'does-not-exist'), str(tmp_path / 'w'))
    assert_not_trained(tmp_path / 'w')


@pytest.mark.parametrize('table', [False, True], ids=['single', 'table'])
@pytest.mark.parametrize('field, value, match', [
    ('model.name', 'resnet7', "unknown model 'resnet7'"),
    ('model.dtype', 'float8', "unknown model dtype 'float8'"),
    ('optim.name', 'sgdd', "unknown optim.name 'sgdd'"),
    ('optim.schedule', 'linear', "unknown optim.schedule 'linear'"),
])
def test_bad_model_or_optim_setting_fails_before_the_data(tmp_path, table, field, value, match):
    """A bad model or optimiser setting is reported before any data is read (here: a data
    path that does not exist would be the other error), for a single run and a table alike
    (jaxad.config.validate_config)."""
    config = folder_config(tmp_path / 'does-not-exist', **{field: value})
    if table:
        config.table.classes, config.data.normal_classes = '0,1', ()
    with pytest.raises(ConfigError, match=match):
        train.train_and_evaluate(config, str(tmp_path / 'w'))
    assert_not_trained(tmp_path / 'w')


def test_empty_normal_class(tmp_path):
    root = tmp_path / 'data'
    write_folder(root)
    for f in (root / 'train' / 'a').iterdir():
        f.unlink()
    with pytest.raises(DataError, match="'a'|class a|a\\b"):
        train.train_and_evaluate(folder_config(root), str(tmp_path / 'w'))
    assert_not_trained(tmp_path / 'w')


def test_normal_class_without_images(tmp_path):
    npz = make_npz(tmp_path / 'd.npz')
    with pytest.raises(DataError, match='7'):
        train.train_and_evaluate(tiny_config(npz, **{'data.normal_classes': (7,)}),
                                 str(tmp_path / 'w'))


def test_wrong_image_size(tmp_path):
    root = tmp_path / 'data'
    write_folder(root, size=12)
    with pytest.raises(DataError, match='12'):
        train.train_and_evaluate(folder_config(root), str(tmp_path / 'w'))
    assert_not_trained(tmp_path / 'w')


def test_corrupt_image(tmp_path):
    root = tmp_path / 'data'
    write_folder(root)
    (root / 'train' / 'b' / 'broken.png').write_bytes(b'not a png at all')
    with pytest.raises(DataError, match='broken.png'):
        train.train_and_evaluate(folder_config(root), str(tmp_path / 'w'))
    assert_not_trained(tmp_path / 'w')


def test_unknown_method(tmp_path):
    npz = make_npz(tmp_path / 'd.npz')
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        train.train_and_evaluate(tiny_config(npz, method='nope'), str(tmp_path / 'w'))


def test_cli_unknown_config_key_exits_nonzero(tmp_path):
    out = run_main('--config=configs/quickstart.py', f'--workdir={tmp_path}',
                   '--config.optim.learning_rate=0.3')
    assert out.returncode == 1
    assert "jaxad: error: unknown config field 'learning_rate'" in out.stderr
    assert 'Traceback' not in out.stderr
    assert not os.path.exists(tmp_path / 'checkpoints')


def test_cli_data_error_is_one_clear_line(tmp_path):
    out = run_main('--config=configs/csi_cifar.py:path=/nonexistent/cifar.tar.gz',
                   f'--workdir={tmp_path}')
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith('jaxad: error:')]
    assert len(errors) == 1 and '/nonexistent/cifar.tar.gz' in errors[0]
    assert 'Traceback' not in out.stderr


def test_cli_unknown_config_argument(tmp_path):
    out = run_main('--config=configs/quickstart.py:normal_klass=3', f'--workdir={tmp_path}')
    assert out.returncode == 1 and 'Traceback' not in out.stderr
    assert "jaxad: error: unknown config argument 'normal_klass'" in out.stderr
