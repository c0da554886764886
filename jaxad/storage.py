"""Where a run's files live: local paths and object-storage URLs behind one interface.

Every file jaxad writes or reads in a workdir (checkpoints aside: Orbax takes the same
strings) goes through these functions, so `--workdir=gs://bucket/prefix` works wherever a
local folder does. Paths are plain strings throughout:

* a **local path** is handled with `os` and `open`, exactly as before this module existed
  (JSON records are written to a temporary file and renamed, so a reader never sees half);
* a **URL** (`gs://`, `s3://`, ... anything with `://`) goes to fsspec, the file-system
  layer that `etils.epath` (Orbax's path type) uses for those schemes: `gcsfs` for `gs://`,
  installed by `pip install -e '.[gcs]'`. An object is written whole by one upload, so a
  reader sees the old object or the new one, never half of one.

Object stores have no append, no rename and no real directories; the few places that need
them say how they do without (`move` copies then deletes; `MetricWriter` rewrites
metrics.jsonl; TensorBoard event files are written locally and uploaded).

Inputs (`data.path`, `--input`, ...) that are URLs are copied once to a local cache
(`local_input`, keyed by the listing's names, sizes and generations, so a changed object is
fetched again) and read from there by the unchanged local readers: jaxad decodes a whole data
set into memory anyway, so reading it remotely file by file would gain nothing.

A store that cannot be used (no such bucket, a server that does not answer, no credentials)
is reported by `check_url` in one line naming the URL, within `JAXAD_STORAGE_TIMEOUT`
seconds (default 60), before anything is written.
"""
import builtins
import hashlib
import json
import logging as py_logging
import os
import shutil
import tempfile
import threading

from jaxad.errors import JaxadError

TIMEOUT_ENV = 'JAXAD_STORAGE_TIMEOUT'
CACHE_ENV = 'JAXAD_CACHE_DIR'


class StorageError(JaxadError):
    """An object store (or its URL) that cannot be used: missing bucket, no answer, no
    credentials, a failed upload."""


def is_url(path):
    return '://' in os.fspath(path)


def normalize(path):
    """`path` as jaxad keeps it: a URL without a trailing '/', a local path as given."""
    path = os.fspath(path)
    return path.rstrip('/') if is_url(path) else path


def join(base, *parts):
    base = os.fspath(base)
    if not is_url(base):
        return os.path.join(base, *parts)
    return '/'.join([base.rstrip('/')] + [p.strip('/') for p in parts if p])


def basename(path):
    return os.fspath(path).rstrip('/').rsplit('/', 1)[-1]


def absolute(path):
    """A local path made absolute; a URL as it is."""
    return normalize(path) if is_url(path) else os.path.abspath(path)


# ------------------------------------------------------------------ fsspec side

class _QuietGcsfs(py_logging.Filter):
    """gcsfs warns on every new file system that it cannot tell a bucket's type without
    the control-plane API (zonal buckets); nothing jaxad does depends on it."""

    def filter(self, record):
        return 'Could not determine bucket type' not in record.getMessage()


def _fs(url):
    """(fsspec file system, path inside it) of `url`: for the schemes etils.epath serves with
    fsspec, epath's own instance, so that jaxad and Orbax share one listing cache (a folder
    jaxad moves away is gone for Orbax too)."""
    try:
        import fsspec
        from etils.epath import backend
    except ImportError as e:  # pragma: no cover - both come with orbax
        raise StorageError(f'{url}: fsspec is not installed') from e
    py_logging.getLogger('gcsfs').addFilter(_QuietGcsfs())
    py_logging.getLogger('fsspec.caching').setLevel(py_logging.WARNING)  # a line per read
    scheme = url.split('://', 1)[0]
    try:
        if scheme in ('gs', 's3', 'az', 'hf'):
            fs = backend.fsspec_backend.fs(url)
        else:
            fs, _ = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        extra = " (pip install -e '.[gcs]' installs gcsfs)" if scheme == 'gs' else ''
        raise StorageError(f'{url}: no file system for {scheme}:// ({e}){extra}') from e
    return fs, fs._strip_protocol(url)  # pylint: disable=protected-access


def _timeout():
    try:
        return float(os.environ.get(TIMEOUT_ENV, 60))
    except ValueError as e:
        raise StorageError(f'{TIMEOUT_ENV} must be a number of seconds') from e


def _bounded(what, fn, timeout=None):
    """fn() in a daemon thread, a StorageError after `timeout` seconds: clients of object
    stores retry unreachable servers for minutes, and a run must not hang on them."""
    timeout = _timeout() if timeout is None else timeout
    box = {}

    def target():
        try:
            box['value'] = fn()
        except BaseException as e:  # pylint: disable=broad-except
            box['error'] = e
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise StorageError(f'{what}: no answer within {timeout:g} s (is the server reachable? '
                           f'{TIMEOUT_ENV} sets the limit)')
    if 'error' in box:
        raise box['error']
    return box.get('value')


def _reason(error):
    text = ' '.join(str(error).split()) or type(error).__name__
    return f'{type(error).__name__}: {text[:300]}'


def check_url(url, write=True):
    """StorageError in one line unless `url`'s bucket exists and answers (and, with
    `write`, takes a small object), within the storage timeout. A local path passes."""
    url = normalize(url)
    if not is_url(url):
        return
    fs, path = _fs(url)
    _check_credentials(url)
    bucket = path.split('/', 1)[0]
    scheme = url.split('://', 1)[0]

    def probe():
        if not fs.exists(bucket):
            raise StorageError(f'{url}: bucket {scheme}://{bucket} does not exist (or these '
                               'credentials may not see it); create it or fix the URL')
        if write:
            name = f'{path}/.jaxad_write_test.{os.getpid()}.{threading.get_ident()}'
            fs.pipe_file(name, b'ok')
            fs.rm_file(name)
    try:
        _bounded(f'{url}: the object store', probe)
    except StorageError:
        raise
    except Exception as e:  # pylint: disable=broad-except
        raise StorageError(f'{url}: cannot use the object store ({_reason(e)})') from e


def _check_credentials(url):
    """gs://: Google credentials must be found (Application Default Credentials, or
    GOOGLE_AUTH_TOKEN_FOR_TESTING as TensorStore reads it), else one line on how to get
    them. gcsfs alone would fall back to anonymous access and fail later, per file."""
    if not url.startswith('gs://') or os.environ.get('GOOGLE_AUTH_TOKEN_FOR_TESTING'):
        return
    try:
        import google.auth
        google.auth.default()
    except ImportError:
        return  # gcsfs brings google-auth; without it gcsfs reports its own error
    except Exception as e:  # pylint: disable=broad-except  (DefaultCredentialsError, ...)
        raise StorageError(
            f'{url}: no Google Cloud credentials ({_reason(e)}); run `gcloud auth '
            'application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a '
            'service-account key file (on a TPU VM or GCE the VM\'s account is used)') from e


# ------------------------------------------------------------------ files

def exists(path):
    if not is_url(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    return fs.exists(p)


def isdir(path):
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = _fs(path)
    return fs.isdir(p)


def isfile(path):
    if not is_url(path):
        return os.path.isfile(path)
    fs, p = _fs(path)
    return fs.isfile(p)


def listdir(path):
    """Names (not paths) in folder `path`, sorted."""
    if not is_url(path):
        return sorted(os.listdir(path))
    fs, p = _fs(path)
    fs.invalidate_cache(p)
    return sorted(basename(e) for e in fs.ls(p, detail=False) if basename(e))


def makedirs(path):
    """A local folder and its parents; nothing on an object store (no folders there)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def open(path, mode='r', **kwargs):  # pylint: disable=redefined-builtin
    """`open` for a local path; fsspec's file for a URL (no append mode: objects are whole)."""
    if not is_url(path):
        return builtins.open(path, mode, **kwargs)
    if 'a' in mode or '+' in mode:
        raise StorageError(f'{path}: object stores cannot {mode!r} a file')
    fs, p = _fs(path)
    return fs.open(p, mode, **kwargs)


def read_bytes(path):
    with open(path, 'rb') as f:
        return f.read()


def read_text(path):
    with open(path, 'r', encoding='utf-8') as f:
        return f.read()


def write_bytes(path, data):
    """Writes `data` whole: locally through a temporary file and a rename, on an object store
    by one upload (either way a reader sees the old content or the new)."""
    path = os.fspath(path)
    if is_url(path):
        fs, p = _fs(path)
        try:
            fs.pipe_file(p, bytes(data))
        except Exception as e:  # pylint: disable=broad-except
            raise StorageError(f'writing {path} failed ({_reason(e)})') from e
        return
    tmp = f'{path}.tmp.{os.getpid()}'
    with builtins.open(tmp, 'wb') as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path, text):
    write_bytes(path, text.encode('utf-8'))


def write_json(path, value, **kwargs):
    write_text(path, json.dumps(value, **kwargs))


def remove(path):
    if not is_url(path):
        os.remove(path)
        return
    fs, p = _fs(path)
    fs.rm_file(p)


def rmtree(path):
    if not is_url(path):
        shutil.rmtree(path)
        return
    fs, p = _fs(path)
    fs.rm(p, recursive=True)


def move(src, dst):
    """Moves file or folder `src` to `dst` (a path that does not exist yet). An object store
    has no rename: the objects are copied, then the originals deleted."""
    if not is_url(src) and not is_url(dst):
        os.makedirs(os.path.dirname(dst) or '.', exist_ok=True)
        os.rename(src, dst)
        return
    fs, s = _fs(src)
    _, d = _fs(dst)
    fs.invalidate_cache()
    if fs.isdir(s):
        fs.copy(s.rstrip('/') + '/', d.rstrip('/') + '/', recursive=True)
        fs.rm(s, recursive=True)
    else:
        fs.mv(s, d)
    fs.invalidate_cache()


def upload(local_path, url):
    """Copies local file `local_path` to `url` (whole)."""
    with builtins.open(local_path, 'rb') as f:
        write_bytes(url, f.read())


# ------------------------------------------------------------------ inputs

def cache_dir():
    return os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser('~'), '.cache', 'jaxad', 'inputs')


def local_input(path, what='input'):
    """A local path holding what `path` holds: `path` itself when local, else a cached copy
    of the remote file, folder or glob (fetched again when the remote listing changed)."""
    if not path or not is_url(path):
        return path
    url = normalize(path)
    check_url(url, write=False)
    fs, p = _fs(url)

    def listing():
        fs.invalidate_cache()
        if any(c in p for c in '*?['):
            names = fs.glob(p, detail=True)
            base = p[:min(p.index(c) for c in '*?[' if c in p)].rsplit('/', 1)[0]
        elif fs.isdir(p):
            names = fs.find(p, detail=True)
            base = p
        elif fs.isfile(p):
            names = {p: fs.info(p)}
            base = p.rsplit('/', 1)[0]
        else:
            raise StorageError(f'{what} {url} does not exist')
        files = {k: v for k, v in names.items() if v.get('type', 'file') != 'directory'}
        return base, files
    base, files = _bounded(f'listing {url}', listing)
    if not files:
        raise StorageError(f'{what} {url} holds no files')
    signature = hashlib.sha256(json.dumps(
        sorted((k, v.get('size'), str(v.get('generation') or v.get('etag') or v.get('mtime')))
               for k, v in files.items())).encode()).hexdigest()[:16]
    root = os.path.join(cache_dir(), hashlib.sha256(url.encode()).hexdigest()[:16])
    target = os.path.join(root, signature)
    local = os.path.join(target, 'data')
    if not os.path.exists(os.path.join(target, 'complete')):
        from absl import logging
        logging.info('copying %s (%d files) to the local cache %s', url, len(files), target)
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix='.fetch-', dir=root)
        for name in files:
            dest = os.path.join(tmp, 'data', os.path.relpath(name, base))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            _bounded(f'fetching {fs.unstrip_protocol(name)}',
                     lambda n=name, d=dest: fs.get_file(n, d))
        builtins.open(os.path.join(tmp, 'complete'), 'w').close()
        try:
            os.rename(tmp, target)
        except OSError:  # another process on this host fetched the same listing first
            shutil.rmtree(tmp, ignore_errors=True)
        for old in os.listdir(root):  # copies of an older listing of the same URL
            if old != signature and not old.startswith('.fetch-'):
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    rel = p[len(base):].lstrip('/')
    return os.path.join(local, rel) if rel else local


def sync_folder(local_dir, url_dir):
    """Uploads every file under `local_dir` to the same relative path under `url_dir`."""
    for root, _, names in os.walk(local_dir):
        for name in names:
            src = os.path.join(root, name)
            upload(src, join(url_dir, *os.path.relpath(src, local_dir).split(os.sep)))
