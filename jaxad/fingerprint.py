"""What trained a workdir, so that another config never silently reuses it.

Every config field is one of three kinds:

* **training** (the default): the data and its classes, the model, the method and its
  loss, the optimiser and schedule, the seed, the batch, the step budget. A workdir
  that holds checkpoints is bound to the training fields it was trained with; a config
  that differs in any of them is refused before any data is loaded or compiled, with
  one line per differing field (`data.normal_classes: (0,) -> (3,)`).
* **scoring**: `eval.*` and a method's own `scoring_fields` (MSC's `msc.knn_k`, ...).
  They change the scores, not the model: a finished run is rescored with them (its
  scoring state refitted on the training images when it was saved with other
  settings), and results.json states the settings it was made with.
* **neutral**: fields that change neither (logging, checkpoint cadence, device count,
  how a table is stacked, the NT-Xent implementation, eval batch and plot options,
  thresholds, which have their own record in threshold.json). Sections of the *other*
  registered methods are neutral too: CSI never reads `msc.*`.

Files: `WORKDIR/fingerprint.json` holds the training fields (and their SHA-256) of the
run in the workdir, written when a run starts from no checkpoint; `scoring_settings.json`
beside each final checkpoint directory (the workdir, or a table group's directory) holds
the scoring fields its saved scoring state was fitted with. A workdir written before
these files existed is judged by its `config.json`; fields that it does not list (added
to jaxad later) cannot be compared and are skipped.
"""
import hashlib
import json
from jaxad import storage
from jaxad.errors import ConfigError

FINGERPRINT_FILE = 'fingerprint.json'
SCORING_FILE = 'scoring_settings.json'

# Fields (exact or 'section.' prefixes) that change neither the model nor the scores.
NEUTRAL = (
    'log_every', 'tensorboard', 'num_devices',  # 8 devices = 1 (tests/test_train.py)
    'checkpoint.',  # when and how checkpoints are written: resume is exact
    'table.stack_size', 'table.stack_mode',  # stacked = separate (tests/test_table.py)
    'loss.nt_xent', 'loss.key_block',  # dense = chunked (tests/test_train.py)
    'threshold.quantile', 'threshold.value',  # threshold.json records its own rule
    'export.',  # which platforms an export is lowered for
    'data.on_device',  # where a batch is gathered, not which (tests/test_table.py)
    'eval.batch_size', 'eval.plots', 'eval.pixel_baseline', 'eval.num_overlays', 'eval.save_maps',
    'eval.density_test_block', 'eval.density_bank_block',
    # how a TFDS data set is had (downloaded on first use or not), not which data it is
    'data.tfds_download', 'data.tfds_alternative', 'oe.tfds_download', 'oe.tfds_alternative',
    'eval.ood.tfds_download', 'eval.ood.tfds_alternative',
)
SCORING = ('eval.',)


def _matches(field, patterns):
    return any(field == p or (p.endswith('.') and field.startswith(p)) for p in patterns)


def flatten(tree, prefix=''):
    """{'a': {'b': 1}} -> {'a.b': 1}, values as JSON gives them back (tuples -> lists)."""
    out = {}
    for key, value in tree.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            out.update(flatten(value, name + '.'))
        else:
            out[name] = value
    return out


def _as_json(config):
    """The config as plain JSON values (what config.json holds)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _kinds(config_json):
    """(neutral patterns, scoring patterns) for the run's method."""
    from jaxad import methods
    name = config_json.get('method', 'csi')
    own = methods.config_section(name)
    others = tuple(f'{methods.config_section(m)}.' for m in methods.REGISTRY
                   if methods.config_section(m) != own)
    return NEUTRAL + others, SCORING + tuple(methods.scoring_fields(name))


def split(config_json):
    """(training fields, scoring fields) of a config given as JSON: flat dicts."""
    neutral, scoring = _kinds(config_json)
    training, scores = {}, {}
    for field, value in flatten(config_json).items():
        if _matches(field, neutral):
            continue
        (scores if _matches(field, scoring) else training)[field] = value
    return training, scores


def training_fields(config):
    return split(_as_json(config))[0]


def scoring_fields(config):
    """The fields that change scores, {dotted name: value}: results.json's eval_settings."""
    return split(_as_json(config))[1]


def digest(fields):
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def show(value):
    """A JSON value as the config would print it: lists as tuples."""
    if isinstance(value, list):
        inner = ', '.join(show(v) for v in value)
        return f'({inner},)' if len(value) == 1 else f'({inner})'
    return repr(value)


def differences(recorded, current):
    """['field: old -> new', ...] for fields of both whose values differ (sorted)."""
    return [f'{k}: {show(recorded[k])} -> {show(current[k])}'
            for k in sorted(set(recorded) & set(current)) if recorded[k] != current[k]]


def has_checkpoints(workdir):
    """Whether `workdir` holds a checkpoint step of a single run or of a table group."""
    dirs = [storage.join(workdir, 'checkpoints')]
    groups = storage.join(workdir, 'groups')
    if storage.isdir(groups):
        dirs += [storage.join(groups, g, 'checkpoints') for g in storage.listdir(groups)]
    return any(storage.isdir(d) and any(n.isdigit() for n in storage.listdir(d)) for d in dirs)


def _read_json(path):
    try:
        value = json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f'cannot read {path} ({e}); it records what trained this workdir. '
                          'Restore it, or use a new --workdir') from e
    if not isinstance(value, dict):
        raise ConfigError(f'{path} is not a JSON object; restore it, or use a new --workdir')
    return value


def recorded_training(workdir):
    """The training fields the checkpoints in `workdir` were trained with, or None when
    nothing records them."""
    path = storage.join(workdir, FINGERPRINT_FILE)
    if storage.isfile(path):
        record = _read_json(path)
        if not isinstance(record.get('training'), dict):
            raise ConfigError(f'{path} has no "training" record; restore it, or use a new '
                              '--workdir')
        return record['training']
    legacy = storage.join(workdir, 'config.json')
    if storage.isfile(legacy):
        return split(_read_json(legacy))[0]
    return None


def check_workdir(config, workdir):
    """Refuses `config` for a workdir whose checkpoints another training config made.

    Called first by every mode (train, eval, tables, predict, calibrate, export), before
    data is read. A workdir without checkpoints is free: a run that failed before its
    first checkpoint can be rerun with a corrected config.
    """
    workdir = storage.normalize(workdir)
    if not has_checkpoints(workdir):
        return
    recorded = recorded_training(workdir)
    if recorded is None:
        raise ConfigError(
            f'workdir {workdir} holds checkpoints but neither {FINGERPRINT_FILE} nor '
            'config.json says what trained them; use a new --workdir')
    diffs = differences(recorded, training_fields(config))
    if diffs:
        raise ConfigError(
            f'workdir {workdir} holds a run trained with another config ({len(diffs)} '
            'training field(s) differ, recorded -> given):\n  ' + '\n  '.join(diffs) +
            f'\nUse a new --workdir for this config, or rerun with the workdir\'s own config '
            f'({storage.join(workdir, "config.json")}). Nothing was changed.')


def write_run_record(config, workdir):
    """config.json and fingerprint.json of the run about to train in `workdir`."""
    training = training_fields(config)
    record = {'training': training, 'training_sha256': digest(training),
              'note': 'the training fields of the checkpoints in this workdir '
                      '(jaxad.fingerprint); another config is refused'}
    _write(storage.join(workdir, FINGERPRINT_FILE), record)
    _write(storage.join(workdir, 'config.json'), _as_json(config))


def write_scoring_settings(config, directory):
    """Records the scoring fields a just-saved scoring state was fitted with."""
    _write(storage.join(directory, SCORING_FILE), {'scoring': scoring_fields(config)})


def saved_scoring(directory, workdir):
    """The scoring fields of the scoring state saved under `directory` (the workdir's
    config.json for runs written before scoring_settings.json existed), or None."""
    path = storage.join(directory, SCORING_FILE)
    if storage.isfile(path):
        return _read_json(path).get('scoring', {})
    legacy = storage.join(workdir, 'config.json')
    return split(_read_json(legacy))[1] if storage.isfile(legacy) else None


def scoring_changes(config, directory, workdir):
    """['field: saved -> given', ...]: how `config`'s scoring fields differ from those of the
    scoring state saved under `directory`; [] when they agree or nothing is recorded."""
    saved = saved_scoring(directory, workdir)
    return [] if saved is None else differences(saved, scoring_fields(config))


def check_scoring_use(config, workdir):
    """predict/calibrate/export: the checkpoint's saved scoring state is used as it is, so
    `config` must agree with the run in both training and scoring fields."""
    check_workdir(config, workdir)
    changes = scoring_changes(config, workdir, workdir)
    if changes:
        raise ConfigError(
            f'the scoring state saved in {workdir} was fitted with other scoring settings '
            '(saved -> given):\n  ' + '\n  '.join(changes) +
            '\npredict, calibrate and export use that saved state: drop --config to use the '
            "run's own config.json, or rerun training with these settings in a new --workdir")


def results_record(config):
    """What results.json states about the settings behind its numbers."""
    return {'eval_settings': scoring_fields(config),
            'training_fingerprint': digest(training_fields(config))}


def _write(path, value):
    import jax
    if jax.process_index() != 0:
        return
    storage.write_json(path, value, indent=2, sort_keys=True)
