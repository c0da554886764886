"""Command line: python -m jaxad.main --config=configs/X.py[:k=v,...] --workdir=DIR.

Kept short on purpose: the work is in `jaxad.train`, which notebooks call too.
"""
import logging as py_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxad.errors import JaxadError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'calibrate', 'export'],
                          'train: train (resuming if possible) then evaluate; '
                          'eval: evaluate the latest checkpoint; '
                          'predict: score --input images; '
                          'calibrate: threshold from --input normal (and --anomalies) images; '
                          'export: write a jax.export scoring artifact.')
flags.mark_flags_as_required(['workdir'])
_INPUT = flags.DEFINE_string('input', None, 'predict/calibrate: a folder, glob, list file, '
                             'image or .npz of images (calibrate: normal images).')
_ANOMALIES = flags.DEFINE_string('anomalies', None, 'calibrate: labelled anomalous images '
                                 '(same forms as --input); the threshold rule becomes f1_max.')
_OUTPUT = flags.DEFINE_string('output', None, 'predict: output folder (default '
                              'WORKDIR/predictions); export: artifact folder (default '
                              'WORKDIR/export).')
# Multi-process runs (jaxad.distributed); unset flags fall back to JAXAD_* env vars.
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for a multi-process run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'env', ['env', 'auto', 'off'],
    'env: multi-process when the flags above or JAXAD_* env vars say so; auto: also '
    "JAX's cluster auto-detection (SLURM, TPU pods); off: single process.")


class _QuietOrbax(py_logging.Filter):
    """Orbax logs every save at INFO; keep its warnings, drop the chatter."""

    def filter(self, record):
        return record.levelno >= py_logging.WARNING or 'orbax' not in record.pathname


def _fail(message):
    print(f'jaxad: error: {message}', file=sys.stderr, flush=True)
    sys.exit(1)


def _parse_flags(argv):
    """absl flag parsing with one-line errors for bad configs and overrides."""
    try:
        return flags.FLAGS(argv)
    except JaxadError as e:  # raised by a config file's get_config
        _fail(e)
    except flags.Error as e:
        _fail(e)
    except (AttributeError, KeyError) as e:  # lock_config: the field does not exist
        overrides = ' '.join(a for a in argv[1:] if a.startswith('--config.'))
        field = str(e).strip('"\'')
        _fail(f'unknown config field {field!r} (in {overrides}); lock_config forbids new fields')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    logging.get_absl_handler().addFilter(_QuietOrbax())
    from jaxad import distributed
    try:  # before anything touches a device
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               mode=_DISTRIBUTED.value)
    except JaxadError as e:
        _fail(e)
    mode = _MODE.value
    if mode in ('train', 'eval') and _CONFIG.value is None:
        _fail(f'--config is required for --mode={mode}')
    if mode in ('predict', 'calibrate') and not _INPUT.value:
        _fail(f'--input is required for --mode={mode} (a folder, glob, list file, image or .npz)')
    from jaxad import train  # after flag parsing: a bad flag fails fast
    try:
        if mode == 'train':
            train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
        elif mode == 'eval':
            train.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
        else:  # the run's config.json unless --config is given
            from jaxad import export, predict
            config = _CONFIG.value
            if mode == 'predict':
                predict.predict(_WORKDIR.value, _INPUT.value, _OUTPUT.value, config=config)
            elif mode == 'calibrate':
                predict.calibrate(_WORKDIR.value, _INPUT.value, _ANOMALIES.value, config=config)
            else:
                export.export_run(_WORKDIR.value, _OUTPUT.value, config=config)
    except JaxadError as e:
        logging.flush()
        _fail(e)


if __name__ == '__main__':
    app.run(main, flags_parser=_parse_flags)
