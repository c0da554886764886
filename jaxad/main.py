r"""jaxad: train, evaluate and deploy image anomaly detectors from the command line.

Usage: python -m jaxad.main --mode=MODE --workdir=DIR [--config=configs/X.py[:k=v,...]] [flags]

Modes (--mode, default train):
  train      train (resuming from WORKDIR's latest checkpoint), then evaluate; needs --config
  eval       evaluate WORKDIR's latest checkpoint on the test set; needs --config
  predict    score --input images (folder, glob, list file, image or .npz) with the checkpoint
  calibrate  set the threshold from --input normal images (+ --anomalies: F1-max)
  export     write a self-contained jax.export scoring artifact (--output, default WORKDIR/export)

Examples (configs/quickstart.py: sklearn digits, no download):
  # train; hold out 10% of the normal images and threshold at their 0.95 quantile:
  python -m jaxad.main --config=configs/quickstart.py --workdir=/tmp/qs \
      --config.threshold.holdout_fraction=0.1 --config.threshold.quantile=0.95
  # evaluate the latest checkpoint again (results.json):
  python -m jaxad.main --mode=eval --config=configs/quickstart.py --workdir=/tmp/qs
  # score new images -> /tmp/qs/predictions/predictions.{csv,json}:
  python -m jaxad.main --mode=predict --workdir=/tmp/qs --input=new_images/
  # threshold from your own normal (and labelled anomalous) images:
  python -m jaxad.main --mode=calibrate --workdir=/tmp/qs --input=normal/ --anomalies=bad/
  # a jax.export artifact -> /tmp/qs/export (one module for cpu, cuda and tpu):
  python -m jaxad.main --mode=export --workdir=/tmp/qs
  # only for a GPU (export.platforms; any of cpu,cuda,tpu):
  python -m jaxad.main --mode=export --workdir=/tmp/qs --config=configs/quickstart.py \
      --config.export.platforms=cuda

Any config field can be overridden with --config.FIELD=VALUE (e.g. --config.tensorboard=True).
predict, calibrate and export read WORKDIR/config.json, so --config is optional there.
Multi-process runs: --coordinator_address, --num_processes, --process_id (or JAXAD_* env vars).

SIGTERM or SIGINT (Ctrl-C) during training: the step in flight finishes, a checkpoint of that
step is saved, one line says where, and the exit status is 143 (SIGTERM) or 130 (SIGINT);
rerun the same command to resume from that step (jaxad/preemption.py).

Kept short on purpose: the work is in `jaxad.train`, which notebooks call too.
"""
import gc
import logging as py_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxad.errors import JaxadError, Preempted

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/quickstart.py[:arg]; fields are overridden with '
    '--config.FIELD=VALUE. Required for train/eval; predict/calibrate/export default to '
    'WORKDIR/config.json.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'calibrate', 'export'],
                          '\n  train: train (resuming if possible), then evaluate (needs --config)'
                          '\n  eval: evaluate the latest checkpoint (needs --config)'
                          '\n  predict: score --input images'
                          '\n  calibrate: threshold from --input normal (+ --anomalies) images'
                          '\n  export: write a jax.export scoring artifact')
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


def _fail(message, code=1):
    print(f'jaxad: error: {message}', file=sys.stderr, flush=True)
    sys.exit(code)


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
    # After flag parsing (a bad flag fails fast). train/eval take single runs and tables
    # alike; predict, calibrate and export read WORKDIR/config.json unless --config is given.
    from jaxad import export, predict, train
    config, workdir = _CONFIG.value, _WORKDIR.value
    run = {
        'train': lambda: train.train_and_evaluate(config, workdir),
        'eval': lambda: train.evaluate_checkpoint(config, workdir),
        'predict': lambda: predict.predict(workdir, _INPUT.value, _OUTPUT.value, config=config),
        'calibrate': lambda: predict.calibrate(workdir, _INPUT.value, _ANOMALIES.value,
                                               config=config),
        'export': lambda: export.export_run(workdir, _OUTPUT.value, config=config),
    }[mode]
    try:
        run()
    except Preempted as e:  # SIGTERM / SIGINT: the checkpoint of e.step is committed
        logging.flush()
        print(f'jaxad: {e}', file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except JaxadError as e:
        logging.flush()
        _fail(e, getattr(e, 'exit_code', 1))


if __name__ == '__main__':
    # CPython collects its youngest generation every 700 new container objects; tracing a
    # train step makes millions, so the collector runs thousands of times before the first
    # step. Collecting 100x less often takes about 6% off a small run's start (7.9 -> 7.4
    # CPU-s for tests/helpers.tiny_config on CPU); the memory it holds back is small.
    gc.set_threshold(100_000, 50, 1000)
    app.run(main, flags_parser=_parse_flags)
