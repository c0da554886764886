"""One tiny finished run shared by test_predict.py and test_export.py.

Made once per pytest session: under xdist the workers share the session's base
temp folder and a file lock, so the second worker reuses the first one's run.
Tests must treat the run as read-only (copy it before writing a threshold).

To stay within the suite's time budget the run takes no optimizer step: it goes
through `train.Setup` (holdout split) and `Setup.finish` (scoring bank, final
checkpoint, holdout calibration, evaluation) from the initial state, so its
checkpoint is step 0. Training itself is covered by test_train.py; what predict,
calibrate and export read is exactly what a trained run leaves.
"""
import fcntl
import os
import types

import numpy as np

from jaxad import fingerprint, train
from tests.helpers import make_npz, tiny_config

HOLDOUT_FRACTION = 0.25  # 4 of the 16 normal training images


def _shared_root(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


def trained_run(tmp_path_factory):
    root = _shared_root(tmp_path_factory) / 'jaxad-predict-run'
    root.mkdir(exist_ok=True)
    npz = root / 'tiny.npz'
    workdir = root / 'run'
    with open(root / 'lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (root / 'done').exists():
                make_npz(npz)
                workdir.mkdir()
                config = tiny_config(npz, **{'threshold.holdout_fraction': HOLDOUT_FRACTION})
                setup = train.Setup(config, str(workdir))
                fingerprint.write_run_record(config, str(workdir))
                try:
                    setup.finish(setup.initial_state())
                finally:
                    setup.checkpoints.close()
                (root / 'done').write_text('ok')
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    data = dict(np.load(npz))
    return types.SimpleNamespace(npz=npz, workdir=workdir, data=data,
                                 config=tiny_config(npz, **{
                                     'threshold.holdout_fraction': HOLDOUT_FRACTION}))
