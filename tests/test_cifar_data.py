"""The CIFAR configs from a fresh clone: CIFAR-10 is TFDS's `cifar10`, downloaded and prepared
on first use, unless `path=` gives the JPEG archive; nothing defaults to a path outside the
repository, and where the data cannot be had, one line says what to run.

The command-line tests run the README's headline command, `python -m jaxad.main
--config=configs/csi_cifar.py --workdir=...`, in a child with
* TFDS_DATA_DIR set to a fresh, empty folder, so nothing prepared is found;
* a network guard (a `sitecustomize` module first on PYTHONPATH) that refuses, and records,
  every connection and name lookup to an address other than loopback, and HTTP(S)_PROXY
  pointing at a closed loopback port, so that a download fails on this machine: no test
  sends anything off it;
* stand-in packages first on PYTHONPATH: ones that fail to import (as .ci/run hides torch)
  take tensorflow_datasets, TensorFlow or importlib_resources away; for the offline case an
  importable, empty `tensorflow` stands for an installed one (TensorFlow is not used before
  the download, which is what fails there).
Off CI, the tests that need tensorflow-datasets and importlib_resources (the `tfds` extra)
skip without them; on CI (.ci/run installs the extra) they run.
"""
import importlib.util
import os
import re
import socket
import subprocess
import sys

import pytest

from jaxad import config as jc
from jaxad.errors import ConfigError
from tests.helpers import skip_unless_on_ci

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADLINE = '--config=configs/csi_cifar.py'
ALTERNATIVE = ('; or give the CIFAR-10 JPEG archive instead: '
               '--config=configs/csi_cifar.py:path=/path/to/cifar10-jpg.tar.gz')
HAS_TFDS = importlib.util.find_spec('tensorflow_datasets') is not None
HAS_EXTRA = HAS_TFDS and importlib.util.find_spec('importlib_resources') is not None
needs_tfds = skip_unless_on_ci(not HAS_TFDS, "needs tensorflow-datasets: pip install -e '.[tfds]'")
needs_extra = skip_unless_on_ci(not HAS_EXTRA,
                                "needs the tfds extra (tensorflow-datasets, importlib_resources): "
                                "pip install -e '.[tfds]'")

# (config file, argument that makes its default valid, where its CIFAR-10 goes)
CIFAR_CONFIGS = [
    ('csi_cifar', '', 'data'), ('anomem_cifar', '', 'data'),
    ('anomem_cifar_fewshot', '', 'data'), ('mcl_cifar', '', 'data'),
    ('msc_cifar', 'weights=/w', 'data'), ('oecl_cifar', 'oe=other_classes', 'data'),
    ('self_oecl_cifar', '', 'data'), ('scaling_cifar', '', 'data'),
    ('oecl_fmnist', '', 'oe'),
]

_GUARD = '''\
"""Test network guard: no connection or name lookup leaves loopback (tests/test_cifar_data.py)."""
import ipaddress
import os
import socket

_LOG = os.environ['JAXAD_TEST_NET_LOG']


def _loopback(host):
    try:
        return ipaddress.ip_address(str(host).split('%')[0]).is_loopback
    except ValueError:
        return host == 'localhost'


def _log(line):
    with open(_LOG, 'a') as f:
        f.write(line + '\\n')


def _guarded(real):
    def connect(self, address):
        if isinstance(address, tuple) and not _loopback(address[0]):
            _log(f'refused {address[0]}:{address[1]}')
            raise ConnectionRefusedError(f'test network guard: {address[0]} is not loopback')
        if isinstance(address, tuple):
            _log(f'loopback {address[0]}:{address[1]}')
        return real(self, address)
    return connect


socket.socket.connect = _guarded(socket.socket.connect)
socket.socket.connect_ex = _guarded(socket.socket.connect_ex)
_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, *args, **kwargs):
    if host is not None and not _loopback(host):
        _log(f'refused lookup {host}')
        raise socket.gaierror(f'test network guard: no lookup of {host}')
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = getaddrinfo
'''


def _closed_loopback_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _stand_ins(root, missing=(), empty=()):
    """A PYTHONPATH folder: the network guard, packages that fail to import (`missing`) and
    importable empty ones (`empty`)."""
    root.mkdir()
    (root / 'sitecustomize.py').write_text(_GUARD)
    for name in missing:
        (root / name).mkdir()
        (root / name / '__init__.py').write_text(
            f'raise ModuleNotFoundError("No module named {name!r}", name={name!r})\n')
    for name in empty:
        (root / name).mkdir()
        (root / name / '__init__.py').write_text('"""Test stand-in: importable, empty."""\n')
    return str(root)


def run_headline(tmp_path, missing=(), empty=()):
    """(completed child, TFDS data dir, network log lines) of the headline command."""
    data_dir, log = tmp_path / 'tfds', tmp_path / 'net.log'
    data_dir.mkdir()
    log.touch()
    proxy = f'http://127.0.0.1:{_closed_loopback_port()}'
    path = [_stand_ins(tmp_path / 'stand_ins', missing, empty), ROOT,
            os.environ.get('PYTHONPATH', '')]
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='', TFDS_DATA_DIR=str(data_dir),
               JAXAD_TEST_NET_LOG=str(log), PYTHONPATH=os.pathsep.join(p for p in path if p),
               HTTP_PROXY=proxy, HTTPS_PROXY=proxy, http_proxy=proxy, https_proxy=proxy,
               ALL_PROXY='', all_proxy='', NO_PROXY='', no_proxy='')
    out = subprocess.run([sys.executable, '-m', 'jaxad.main', HEADLINE,
                          f'--workdir={tmp_path / "w"}'], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    return out, str(data_dir), log.read_text().splitlines()


def error_line(out):
    """The run's one error line; it stopped with exit status 1 and no traceback."""
    assert out.returncode == 1, out.stderr[-3000:]
    assert 'Traceback' not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith('jaxad: error:')]
    assert len(errors) == 1, out.stderr[-3000:]
    return errors[0]


def test_cifar_configs_default_to_tfds_cifar10_and_read_path_when_given():
    for name, arg, section in CIFAR_CONFIGS:
        module = jc.config_module(os.path.join(ROOT, 'configs', 'x.py'), name)
        c = module.get_config(arg or None)
        data = c[section] if section == 'data' else c.oe
        assert (data.source, data.tfds_name, data.tfds_download) == ('tfds', 'cifar10', True), name
        assert data.tfds_alternative == (
            f'give the CIFAR-10 JPEG archive instead: --config=configs/{name}.py:'
            f'{"oe_path" if section == "oe" else "path"}=/path/to/cifar10-jpg.tar.gz'), name
        key = 'oe_path' if section == 'oe' else 'path'
        c = module.get_config(','.join(a for a in (arg, f'{key}=/data/c10.tar.gz') if a))
        data = c[section] if section == 'data' else c.oe
        assert (data.source, data.path) == ('folder', '/data/c10.tar.gz'), name
        assert not data.tfds_download, name
    csi_cifar = jc.config_module(os.path.join(ROOT, 'configs', 'x.py'), 'csi_cifar')
    c = csi_cifar.get_config('dataset=cifar100,tfds_data_dir=/d')
    assert (c.data.tfds_name, c.data.label_key, c.data.tfds_data_dir) == (
        'cifar100', 'coarse_label', '/d')
    assert c.data.tfds_download and not c.data.tfds_alternative
    with pytest.raises(ConfigError, match='dataset=cifar10_jpg needs path=/path/to/'):
        csi_cifar.get_config('dataset=cifar10_jpg')
    with pytest.raises(ConfigError, match='path=/x is the CIFAR-10 JPEG'):
        csi_cifar.get_config('dataset=cifar10,path=/x')


def test_no_default_points_outside_the_repository():
    # The configs and jaxad name no folder beside the checkout (../shared/data/...): data
    # outside the repository is only ever read from a path the user gives.
    # '../x' in a string, or a '..' argument (os.path.join(here, '..', ...)); not '.../x'
    outside = re.compile(r"(?<!\.)\.\./|[(,]\s*'\.\.'|\bshared/data|'shared', 'data'")
    for top in ('configs', 'jaxad'):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith('.py'):
                    text = open(os.path.join(folder, f)).read()
                    assert not outside.search(text), (f, outside.search(text).group())


def test_headline_without_tfds_extra_says_what_to_install(tmp_path):
    out, _, net = run_headline(tmp_path, missing=['tensorflow_datasets'])
    assert error_line(out) == (
        "jaxad: error: TFDS data set 'cifar10' needs tensorflow-datasets, which is not "
        "installed: run pip install -e '.[tfds]' tensorflow in the jaxad checkout (TensorFlow "
        'only to prepare it on first use; later runs read it without)' + ALTERNATIVE)
    assert net == []
    assert not (tmp_path / 'w' / 'checkpoints').exists()


@needs_tfds
def test_headline_without_importlib_resources_or_tensorflow(tmp_path):
    # tensorflow-datasets installed by hand, not through the extra: neither is there.
    out, data_dir, net = run_headline(tmp_path, missing=['importlib_resources', 'tensorflow'])
    assert error_line(out) == (
        f"jaxad: error: TFDS data set 'cifar10' is not prepared in {data_dir}, and downloading "
        'and preparing it needs importlib_resources (tensorflow-datasets imports it without '
        'requiring it) and TensorFlow (tensorflow-datasets extracts, reads and PNG-encodes the '
        "images with it): run pip install -e '.[tfds]' tensorflow in the jaxad checkout, then "
        'rerun (the first run downloads and prepares it, later runs read it without '
        'TensorFlow)' + ALTERNATIVE)
    assert net == [] and os.listdir(data_dir) == []  # checked before any download


@needs_extra
def test_headline_without_tensorflow_says_so_before_downloading(tmp_path):
    out, data_dir, net = run_headline(tmp_path, missing=['tensorflow'])
    assert error_line(out) == (
        f"jaxad: error: TFDS data set 'cifar10' is not prepared in {data_dir}, and downloading "
        'and preparing it needs TensorFlow (tensorflow-datasets extracts, reads and '
        'PNG-encodes the images with it): run pip install tensorflow, then rerun (the first '
        'run downloads and prepares it, later runs read it without TensorFlow)' + ALTERNATIVE)
    assert net == [] and os.listdir(data_dir) == []


@needs_extra
def test_headline_offline_says_what_to_do(tmp_path):
    out, data_dir, net = run_headline(tmp_path, empty=['tensorflow'])
    line = error_line(out)
    prefix = (f"jaxad: error: could not download TFDS data set 'cifar10' into {data_dir} "
              '(ProxyError: ')
    assert line.startswith(prefix), line
    assert line.endswith(
        '): without internet access, prepare it where there is internet and TensorFlow (e.g. '
        'Colab: `tfds build cifar10 --file_format=array_record --data_dir=DIR`), copy DIR here '
        'and set tfds_data_dir=DIR' + ALTERNATIVE), line
    # TFDS tried the download, through the loopback proxy only, a bounded number of times
    assert net and all(n.startswith('loopback 127.0.0.1:') for n in net), net
    assert len(net) <= 3, net
    assert not (tmp_path / 'w' / 'checkpoints').exists()
    assert not os.path.exists(os.path.join(data_dir, 'cifar10', '3.0.2', 'dataset_info.json'))


_PREPARE = '''
import os, sys
import importlib
import numpy as np
from jaxad.data import sources
tfds = importlib.import_module('tensorflow_datasets')  # the child's, not collection's

fake, data_dir = sys.argv[1:]
batches = os.path.join(fake, 'cifar-10-batches-bin')
os.makedirs(batches)
def write(name, labels):  # CIFAR-10's binary layout: a label byte, then 3x32x32 bytes
    images = np.zeros((len(labels), 3, 32, 32), np.uint8)
    images[:, 0] = 20 * np.array(labels)[:, None, None]
    with open(os.path.join(batches, name), 'wb') as f:
        f.write(b''.join(bytes([l]) + im.tobytes() for l, im in zip(labels, images)))
for k in range(1, 6):
    write(f'data_batch_{k}.bin', [(k + i) % 10 for i in range(4)])
write('test_batch.bin', list(range(10)))
with open(os.path.join(batches, 'batches.meta.txt'), 'w') as f:
    f.write('airplane\\nautomobile\\nbird\\ncat\\ndeer\\ndog\\nfrog\\nhorse\\nship\\ntruck\\n')
urls = []
def download_and_extract(self, url, *args, **kwargs):  # the archive, already extracted
    urls.append(url)
    return fake
tfds.download.DownloadManager.download_and_extract = download_and_extract
train = sources.load_tfds('cifar10', 'train', data_dir, download=True)
test = sources.load_tfds('cifar10', 'test', data_dir, download=True)
print('urls', urls)
print('sizes', len(train), len(test), train.class_names[0], train.class_names[9])
print('labels_match', all(int(train.images[i][0, 0, 0]) == 20 * train.labels[i]
                          for i in range(len(train))))
print('files', sorted(os.listdir(os.path.join(data_dir, 'cifar10', '3.0.2'))))
'''


@pytest.mark.skipif(not (HAS_EXTRA and importlib.util.find_spec('tensorflow')),
                    reason='preparing cifar10 needs TensorFlow, which neither a '
                           "newcomer's '.[test]' nor .ci/run installs (it runs where it is)")
def test_with_tensorflow_cifar10_is_prepared_on_first_use(tmp_path):
    # Where TensorFlow is installed: TFDS's real cifar10 builder prepares ArrayRecord files
    # through jaxad (the download replaced by a tiny local CIFAR-10 binary), read back with
    # their labels; the second split finds them prepared. A child process: TensorFlow stays
    # out of the test process.
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='', PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get('PYTHONPATH', '')) if p))
    out = subprocess.run([sys.executable, '-c', _PREPARE, str(tmp_path / 'fake'),
                          str(tmp_path / 'tfds')], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(' ', 1) for line in out.stdout.splitlines())
    assert lines['urls'] == "['https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz']"
    assert lines['sizes'] == '20 10 airplane truck' and lines['labels_match'] == 'True'
    assert lines['files'] == str(['cifar10-test.array_record-00000-of-00001',
                                  'cifar10-train.array_record-00000-of-00001',
                                  'dataset_info.json', 'features.json', 'label.labels.txt'])
