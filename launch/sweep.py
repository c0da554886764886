"""Expands a config's sweep into commands, a SLURM job array, or local runs.

python launch/sweep.py --config=configs/scaling_cifar.py --root=/tmp/study
python launch/sweep.py --config=configs/scaling_cifar.py --root=/tmp/study \
    --axis=batch_size=256,512 --axis=seed=0,1 --format=commands
python launch/sweep.py --config=configs/scaling_cifar.py:epochs=200 --root=$SCRATCH/study \
    --format=slurm_array --sbatch=--gpus-per-node=1 --sbatch=--time=08:00:00 > study.sbatch
python launch/sweep.py --config=configs/scaling_tiny.py --root=/tmp/study_tiny --format=run

The axes come from the config file's `get_sweep()`; `--axis=field=v1,v2`
(repeatable, any dotted config field) replaces them. Formats:
  commands     one `python -m jaxad.main ...` line per run (pipe to a scheduler or GNU parallel)
  slurm_array  an sbatch script, `#SBATCH --array=0-(n-1)`, run i = array task i
  run          runs them here one after another (finished runs are skipped), then
               prints the collected table
Everything here is `jaxad.sweep`; the notebook colabs/scaling_study.ipynb uses the same.
"""
import sys

from absl import app, flags

from jaxad import sweep
from jaxad.errors import JaxadError

_CONFIG = flags.DEFINE_string('config', None, 'Config file, optionally with :args.')
_ROOT = flags.DEFINE_string('root', None, 'Sweep directory; run <name> writes to root/<name>.')
_AXIS = flags.DEFINE_multi_string('axis', [], 'field=v1,v2,... (repeatable); replaces the '
                                  "config's get_sweep().")
_FORMAT = flags.DEFINE_enum('format', 'commands', ['commands', 'slurm_array', 'run'],
                            'What to do with the runs.')
_EXTRA = flags.DEFINE_multi_string('extra', [], 'Extra flag for every jaxad.main command, e.g. '
                                   '--extra=--distributed=auto (repeatable).')
_PYTHON = flags.DEFINE_string('python', 'python', 'Interpreter in generated commands.')
_SBATCH = flags.DEFINE_multi_string('sbatch', [], 'Extra #SBATCH option for slurm_array, e.g. '
                                    '--sbatch=--gpus-per-node=1 (repeatable).')
_SETUP = flags.DEFINE_multi_string('setup', [], 'Shell line run before each array task '
                                   '(module load, source venv/bin/activate).')
_MODE = flags.DEFINE_enum('mode', 'inprocess', ['inprocess', 'subprocess'],
                          "format=run: train in this process or one subprocess per run.")
flags.mark_flags_as_required(['config', 'root'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    try:
        runs = sweep.runs_for(_CONFIG.value, _AXIS.value)
        if _FORMAT.value == 'commands':
            print('\n'.join(sweep.commands(_CONFIG.value, runs, _ROOT.value, _EXTRA.value,
                                           _PYTHON.value)))
        elif _FORMAT.value == 'slurm_array':
            print(sweep.slurm_array_script(_CONFIG.value, runs, _ROOT.value, _EXTRA.value,
                                           _PYTHON.value, sbatch=_SBATCH.value,
                                           setup=_SETUP.value), end='')
        else:
            sweep.run_local(_CONFIG.value, runs, _ROOT.value, mode=_MODE.value,
                            extra_flags=_EXTRA.value,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
            print(sweep.format_table(sweep.collect(_ROOT.value)))
    except JaxadError as e:
        print(f'jaxad: error: {e}', file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == '__main__':
    app.run(main)
