"""The one-class table: one detector per normal class, trained as stacks.

`normal_class=all` (or `0,3,5`) sets `table.classes`; each item becomes a
*member*, a detector whose normal data is that class. Members are trained as
stacks: their params, batch stats and optimizer states carry a leading model
axis, and one jitted, donated step applies the method's ordinary
`(state, batch, rng)` step to every member (`jax.vmap` on accelerators,
unrolled on CPU: `jaxad.stacking`), each member fed a batch of its own class
from its own data stream. BatchNorm statistics therefore stay per
member, and member k computes exactly what a single run of its class with the
same seed computes (same init key, augmentation keys and data order).

Members stack when their step budgets agree (same images per class, hence
same steps per epoch and learning-rate schedule); `table.stack_size` bounds
a stack (memory) and the rest run as following groups. Each group is its own
Orbax checkpoint directory under `workdir/groups/<classes>/`, so rerunning the
command resumes the unfinished group and never retrains a finished one.

Outputs: `workdir/results.json` (per-member metrics and their mean) and
`workdir/results.md` (the table a person pastes into a paper).
"""
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
from absl import logging

from jaxad import checkpoint as ckpt_lib
from jaxad import evaluate as eval_lib
from jaxad import distributed
from jaxad import fingerprint, optim, sharding, stacking, thresholds
from jaxad import train as train_lib
from jaxad.config import normal_classes as parse_normal_classes
from jaxad.config import validate_config
from jaxad.data import pipeline, sources
from jaxad.errors import ConfigError, TrainingError
from jaxad.methods import get_method
from jaxad.writers import MetricWriter, Progress

METRICS = ('image_AUROC', 'image_AUPR', 'FPR@95TPR')


@dataclasses.dataclass(frozen=True)
class Member:
    """One detector of the table."""
    normal_classes: tuple
    name: str
    indices: np.ndarray  # its normal training images
    steps_per_epoch: int
    total_steps: int


def parse_members(spec, class_names):
    """'all' / '0,3,5' / '0+1,2' -> list of normal-class tuples, in order."""
    items = []
    for item in str(spec).split(','):
        if item == 'all':
            items.extend((c,) for c in range(len(class_names)))
        else:
            items.append(parse_normal_classes(item))
    for classes in items:
        bad = [c for c in classes if not 0 <= c < len(class_names)]
        if bad:
            raise ConfigError(f'table.classes={spec!r}: class {bad[0]} is not one of the '
                              f'{len(class_names)} classes 0..{len(class_names) - 1}')
    if len(set(items)) != len(items):
        raise ConfigError(f'table.classes={spec!r} lists a detector twice')
    return items


def make_groups(members, stack_size):
    """Members with equal step budgets, in order, in stacks of at most `stack_size`."""
    by_budget = {}
    for m in members:
        by_budget.setdefault((m.steps_per_epoch, m.total_steps), []).append(m)
    size = stack_size or len(members)
    return [ms[i:i + size] for ms in by_budget.values() for i in range(0, len(ms), size)]


class Group:
    """A stack of members trained as one program, with its own checkpoints."""

    def __init__(self, config, workdir, members, method):
        self.members = members
        self.k = len(members)
        self.steps_per_epoch = members[0].steps_per_epoch
        self.total_steps = members[0].total_steps
        self.mode = stacking.resolve_mode(config.table.stack_mode)
        # Unrolled models index the model axis one by one: keep it whole on every device.
        # Several processes: likewise (each process feeds all K models' batch slices).
        by_model = self.mode == 'vmap' and jax.process_count() == 1
        self.mesh = sharding.make_mesh(config.num_devices, num_models=self.k if by_model else 1)
        sharding.check_batch_divides(config.batch_size, self.mesh)
        self.tx, self.schedule = optim.make_optimizer(
            config.optim, self.steps_per_epoch, self.total_steps, config.batch_size,
            freeze=getattr(method, 'frozen_params', ()))
        self.name = 'classes_' + '_'.join('+'.join(map(str, m.normal_classes)) for m in members)
        self.directory = os.path.join(workdir, 'groups', self.name)
        os.makedirs(self.directory, exist_ok=True)
        self.checkpoints = ckpt_lib.Checkpoints(
            os.path.join(self.directory, 'checkpoints'),
            max_to_keep=config.checkpoint.max_to_keep, use_async=config.checkpoint.use_async)
        # Every member uses the run's seed, as K separate runs of the paper protocol would.
        seeds = np.full(self.k, config.seed, np.uint32)
        self.rngs = jax.device_put(jax.vmap(jax.random.key)(seeds),
                                   sharding.model_sharding(self.mesh))

    def initial_state(self, method, image_shape, seed):
        init = stacking.stacked(train_lib.make_init_fn(method, self.tx, image_shape), self.mode)
        keys = jax.vmap(train_lib.init_key)(np.full(self.k, seed, np.uint32))
        return jax.jit(init, out_shardings=sharding.model_sharding(self.mesh))(keys)

    def restore_latest(self, method, image_shape, seed):
        """(stacked state, step) from the latest checkpoint, or a fresh state and 0."""
        state = self.initial_state(method, image_shape, seed)
        # A damaged newest step is set aside and the newest readable one used.
        restored = self.checkpoints.restore_newest(ckpt_lib.abstract_like(state),
                                                   using='using')
        if restored is None:
            return state, 0
        state, step = restored
        logging.info('group %s: resuming from step %d', self.name, step)
        return state, step

    def results_path(self):
        return os.path.join(self.directory, 'results.json')


def jit_stacked_step(train_step, mesh, mode):
    """jit of the stacked step: state and rngs on 'model', batches on ('model', 'data')."""
    models = sharding.model_sharding(mesh)
    batch = sharding.stacked_data_sharding(mesh)  # every batch key
    return jax.jit(stacking.stacked(train_step, mode), donate_argnums=(0,),
                   in_shardings=(models, batch, models), out_shardings=(models, models))


def check_no_threshold(config):
    """A table scores many detectors and writes no threshold.json (predict, calibrate and
    export take single runs): threshold settings would be silently ignored, so refuse them."""
    if thresholds.holdout_fraction(config) > 0:
        raise ConfigError(
            f'threshold.holdout_fraction={config.threshold.holdout_fraction} with a one-class '
            'table: a table calibrates no threshold and would train on the held-out images '
            'anyway; set it to 0, or train the class as a single run (normal_class=N)')
    if config.threshold.get('value') is not None:
        raise ConfigError('threshold.value with a one-class table: a table writes no '
                          'threshold; unset it, or set it on a single run')


class TableSetup:
    """Data, members and groups of a table run (everything but train state)."""

    def __init__(self, config, workdir):
        validate_config(config)
        check_no_threshold(config)
        self.config, self.workdir = config, workdir
        self.method = get_method(config)
        self.train_set = sources.load_split(config.data, 'train')
        self.test_set = sources.with_ood(sources.load_split(config.data, 'test'),
                                         config.eval.ood)
        self.image_shape = train_lib.check_image_shape(self.train_set, config.data)
        train_lib.check_image_shape(self.test_set, config.data)
        names = self.train_set.class_names
        self.members = []
        for classes in parse_members(config.table.classes, names):
            indices = sources.one_class_indices(self.train_set.labels, classes, len(names),
                                                self.train_set.name)
            sources.one_class_indices(self.test_set.labels, classes, len(names),
                                      self.test_set.name)
            spe, total = train_lib.step_budget(config, len(indices), f'class(es) {classes}')
            self.members.append(Member(tuple(classes), '+'.join(names[c] for c in classes),
                                       indices, spe, total))
        self.outlier_set = train_lib.load_auxiliary_outliers(self.method, config,
                                                             self.image_shape)
        self.groups = [Group(config, workdir, ms, self.method)
                       for ms in make_groups(self.members, config.table.stack_size)]

    def close(self):
        for g in self.groups:
            g.checkpoints.close()


def _train_group(setup, group, state, start_step, progress, done_before, classes_done):
    """Trains one stack from `start_step` to its total; returns the stacked state."""
    config, mesh = setup.config, group.mesh
    step_fn = jit_stacked_step(
        train_lib.make_train_step(setup.method, group.tx, group.schedule,
                                  group.steps_per_epoch), mesh, group.mode)
    streams = [pipeline.method_train_iterator(
        getattr(setup.method, 'inputs', ()), setup.train_set, m.indices, m.normal_classes,
        global_batch_size=config.batch_size, seed=config.seed,
        outliers=train_lib.outlier_source(config, setup.train_set, m.indices, m.normal_classes,
                                          setup.outlier_set),
        start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count(), read_threads=1 if group.k > 2 else 2)
        for m in group.members]
    where = sharding.stacked_data_sharding(mesh)
    writer = MetricWriter(group.directory, tensorboard=config.get('tensorboard', False))
    logging.info('group %s: %d models (%s) x %d steps, %d images per model per step, mesh %s',
                 group.name, group.k, group.mode, group.total_steps, config.batch_size,
                 dict(mesh.shape))
    geometry = train_lib.batch_geometry(config, mesh, group.schedule, group.steps_per_epoch)
    last_saved, t_last, step_last = start_step, time.time(), start_step
    for step in range(start_step + 1, group.total_steps + 1):
        batches = [next(s) for s in streams]
        batch = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
        state, metrics = step_fn(state, sharding.to_global(batch, mesh, where), group.rngs)
        is_log, is_save = train_lib.log_and_save_flags(step, group.total_steps, config)
        if is_log or is_save:
            metrics = {k: np.asarray(v, np.float64)
                       for k, v in distributed.to_host(metrics).items()}
            _check_members_finite(group, step, metrics, last_saved)
        if is_log:
            rate = (step - step_last) / max(time.time() - t_last, 1e-9)
            record = {k: float(v.mean()) for k, v in metrics.items()}
            record.update({f'{k}/{m.name}': float(v[i]) for k, v in metrics.items()
                           if k.startswith('loss') for i, m in enumerate(group.members)})
            record.update(steps_per_sec=rate, images_per_sec=rate * config.batch_size * group.k,
                          epoch=step / group.steps_per_epoch, **geometry)
            writer.write(step, record)
            progress.update(done_before + step, classes=classes_done,
                            group=group.name, loss=record['loss'],
                            img_s=round(record['images_per_sec'], 1))
            t_last, step_last = time.time(), step
        if is_save:
            group.checkpoints.save(step, state)
            last_saved = step
    return state


def _check_members_finite(group, step, metrics, last_saved):
    bad = sorted({m.name for v in metrics.values() for m, x in zip(group.members, v)
                  if not np.isfinite(x)})
    if bad:
        raise TrainingError(
            f'non-finite training metrics at step {step} for class(es) {bad} (group '
            f'{group.name}). Stopping; the last good checkpoint is step {last_saved} '
            '(lower optim.lr or check the data).')


def _variables(state):
    return {'params': state.params, 'batch_stats': state.batch_stats}


def _fit_group_scoring(setup, group, state):
    """Scoring states of all members, from one stacked pass over their train banks."""
    if not eval_lib.needs_bank_pass(setup.method):
        one = jax.tree_util.tree_map(lambda x: x[0], _variables(state))
        return {f'm{i}': eval_lib.bankless_scoring(setup.method, one, setup.image_shape,
                                                   len(m.indices),
                                                   jax.random.key(setup.config.seed))
                for i, m in enumerate(group.members)}
    feats = eval_lib.extract_stacked_features(
        setup.method, _variables(state), setup.train_set, [m.indices for m in group.members],
        batch_size=setup.config.eval.batch_size, mesh=group.mesh, mode=group.mode,
        key=eval_lib.eval_bank_key(setup.config.seed), label=f'{group.name} train banks')
    labels = np.asarray(setup.train_set.labels)
    return {f'm{i}': eval_lib.scoring_from_features(
        setup.method, eval_lib.with_bank_labels(setup.method, f, labels[m.indices]))
        for i, (f, m) in enumerate(zip(feats, group.members))}


def _init_group_consts(setup, group, state):
    """Each member's method constants from its initial model and its own normal images
    (`train.init_consts` for a stack); unchanged for methods without constants."""
    if not hasattr(setup.method, 'fit_consts'):
        return state
    feats = eval_lib.extract_stacked_features(
        setup.method, _variables(state), setup.train_set, [m.indices for m in group.members],
        batch_size=setup.config.eval.batch_size, mesh=group.mesh, mode=group.mode,
        key=eval_lib.eval_bank_key(setup.config.seed), label=f'{group.name} initial features')
    fit = jax.jit(setup.method.fit_consts)
    consts = [jax.device_get(fit(f)) for f in feats]
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *consts)
    return state.replace(consts=jax.device_put(stacked, sharding.model_sharding(group.mesh)))


def _restore_group_scoring(setup, group, state, step):
    """Saved scoring states of a group's final checkpoint."""
    unstacked = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), _variables(state))
    rng = jax.random.key(setup.config.seed)
    abstract = {f'm{i}': train_lib.scoring_shapes(setup.method, unstacked, setup.image_shape,
                                                  len(m.indices), rng)
                for i, m in enumerate(group.members)}
    # Damaged: the step is set aside, the scoring states refitted from `state` and the
    # step saved again.
    return group.checkpoints.restore_or_refit_scoring(
        step, state, abstract, lambda: _fit_group_scoring(setup, group, state))


def _evaluate_group(setup, group, state, scorings, step, extra=None):
    """Per-member results from one stacked pass over the test split."""
    t0 = time.time()
    config = setup.config
    feats = eval_lib.extract_stacked_features(
        setup.method, _variables(state), setup.test_set, None,
        batch_size=config.eval.batch_size, mesh=group.mesh, mode=group.mode,
        key=eval_lib.eval_test_key(config.seed), label=f'{group.name} test')
    results = []
    for i, m in enumerate(group.members):
        member_feats = jax.tree_util.tree_map(lambda x, i=i: x[i], feats)
        r, _, _ = eval_lib.results_with_maps(
            setup.method, eval_lib.score_features(setup.method, scorings[f'm{i}'], member_feats),
            setup.test_set, m.normal_classes, config.method)
        r.update(name=m.name, step=int(step), group=group.name, **(extra or {}),
                 **fingerprint.results_record(config))
        results.append(r)
    seconds = round(time.time() - t0, 2)
    for r in results:
        r['group_eval_seconds'] = seconds
    return results


def _save_group_results(group, results):
    if jax.process_index() == 0:
        with open(group.results_path(), 'w') as f:
            json.dump(results, f, indent=2)


def _saved_group_results(group, step, config):
    """The group's results.json if it belongs to checkpoint `step` and was scored with
    `config`'s training fingerprint and scoring settings, else None."""
    try:
        with open(group.results_path()) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    record = fingerprint.results_record(config)
    if len(results) == group.k and all(
            r.get('step') == step and all(r.get(k) == v for k, v in record.items())
            for r in results):
        return results
    return None


def train_table(config, workdir):
    """Trains (resuming where it stopped) and evaluates every member; writes the table."""
    fingerprint.check_workdir(config, workdir)  # before any data is read or compiled
    t0 = time.time()
    train_lib.start_record(config, workdir)
    setup = TableSetup(config, workdir)
    # One bar for the whole table; steps already in checkpoints count as done for the ETA.
    progress = Progress(sum(g.total_steps for g in setup.groups), label='table',
                        first=sum(min(g.checkpoints.latest_step() or 0, g.total_steps)
                                  for g in setup.groups))
    try:
        results, done_before = [], 0
        for group in setup.groups:
            state, start = group.restore_latest(setup.method, setup.image_shape, config.seed)
            if start == 0:
                state = _init_group_consts(setup, group, state)
            classes_done = f'{len(results)}/{len(setup.members)}'
            finished = start >= group.total_steps and group.checkpoints.has_scoring(start)
            saved = _saved_group_results(group, start, config) if finished else None
            if saved is not None:
                logging.info('group %s finished at step %d; reusing its results', group.name,
                             start)
                group_results = saved
            elif finished:
                scorings, extra = _finished_group_scoring(setup, group, state, start)
                group_results = _evaluate_group(setup, group, state, scorings, start, extra)
            else:
                state = _train_group(setup, group, state, start, progress, done_before,
                                     classes_done)
                scorings = _fit_group_scoring(setup, group, state)
                group.checkpoints.save(group.total_steps, state, scoring=scorings)
                group.checkpoints.wait()
                fingerprint.write_scoring_settings(config, group.directory)
                group_results = _evaluate_group(setup, group, state, scorings, group.total_steps)
            _save_group_results(group, group_results)
            results.extend(group_results)
            done_before += group.total_steps
            progress.update(done_before, classes=f'{len(results)}/{len(setup.members)}')
        return write_table(setup, results, extra=dict(wall_seconds=round(time.time() - t0, 2)))
    finally:
        setup.close()


def _finished_group_scoring(setup, group, state, step):
    """(scoring states, results extra) of a finished group: the saved ones, or, when the
    config's scoring fields differ from those they were fitted with, refitted now."""
    changes = fingerprint.scoring_changes(setup.config, group.directory, setup.workdir)
    if not changes:
        return _restore_group_scoring(setup, group, state, step), {}
    logging.warning('group %s: scoring settings differ from those of its saved scoring '
                    'state (%s): refitting it on the training images; the checkpoint keeps '
                    'the saved one', group.name, '; '.join(changes))
    return (_fit_group_scoring(setup, group, state),
            dict(scoring_state='refitted', scoring_changes=changes))


def evaluate_table(config, workdir):
    """`--mode=eval`: rebuilds the table from the groups' checkpoints alone."""
    fingerprint.check_workdir(config, workdir)
    setup = TableSetup(config, workdir)
    try:
        results = []
        for group in setup.groups:
            state, step = group.restore_latest(setup.method, setup.image_shape, config.seed)
            if step == 0:
                raise TrainingError(f'no checkpoint for group {group.name} in '
                                    f'{group.checkpoints.directory}; train first (--mode=train)')
            extra = {}
            if group.checkpoints.has_scoring(step):
                scorings, extra = _finished_group_scoring(setup, group, state, step)
            else:
                logging.info('group %s step %d has no scoring state; computing it',
                             group.name, step)
                scorings = _fit_group_scoring(setup, group, state)
            group_results = _evaluate_group(setup, group, state, scorings, step, extra)
            _save_group_results(group, group_results)
            results.extend(group_results)
        return write_table(setup, results)
    finally:
        setup.close()


def _mean_row(results):
    mean = {k: float(np.mean([r[k] for r in results])) for k in METRICS}
    mean['scores'] = {s: {k: float(np.mean([r['scores'][s][k] for r in results]))
                          for k in METRICS}
                      for s in results[0]['scores']}
    return mean


def write_table(setup, results, extra=None):
    """results.json (per member + mean) and results.md; prints the table."""
    config = setup.config
    paper_fn = getattr(setup.method, 'paper_one_class', None)
    paper = paper_fn(setup.test_set.class_names) if paper_fn else None
    table = {
        'method': config.method, 'dataset': setup.test_set.name,
        'headline_score': setup.method.headline_score, 'table_classes': config.table.classes,
        'seed': config.seed, 'batch_size': config.batch_size,
        'groups': [[m.name for m in g.members] for g in setup.groups],
        'classes': results, 'mean': _mean_row(results),
        'paper_image_AUROC_percent': paper, 'FPR@95TPR_positive_class': 'anomaly',
        **fingerprint.results_record(config), **(extra or {})}
    if jax.process_index() == 0:
        with open(os.path.join(setup.workdir, 'results.json'), 'w') as f:
            json.dump(table, f, indent=2)
        markdown = format_markdown(table, setup)
        with open(os.path.join(setup.workdir, 'results.md'), 'w') as f:
            f.write(markdown)
        print(markdown, flush=True)
        logging.info('table written to %s', os.path.join(setup.workdir, 'results.md'))
    return table


def format_markdown(table, setup=None):
    """The table as Markdown: one row per member, a mean row, paper numbers if known."""
    paper = table['paper_image_AUROC_percent']
    head = ['normal class', 'image AUROC %', 'image AUPR %', 'FPR@95TPR %']
    if paper:
        head.append('paper AUROC %')
    lines = [f"# {table['method'].upper()} one-class table: {table['dataset']}", '',
             '| ' + ' | '.join(head) + ' |', '|' + '---|' + '---:|' * (len(head) - 1)]

    def row(name, values, paper_value):
        cells = [name] + [f'{100 * v:.2f}' for v in values]
        if paper:
            cells.append('' if paper_value is None else f'{paper_value:.1f}')
        return '| ' + ' | '.join(cells) + ' |'

    for r in table['classes']:
        lines.append(row(r['name'], [r[k] for k in METRICS],
                         paper['per_class'].get(r['name']) if paper else None))
    lines.append(row('**mean**', [table['mean'][k] for k in METRICS],
                     paper['mean'] if paper else None))
    lines += ['', f"Score: `{table['headline_score']}`; FPR@95TPR with anomaly as the positive "
              'class; each detector tests its normal class against all other test images.']
    if setup is not None:
        budgets = sorted({(g.total_steps, g.steps_per_epoch) for g in setup.groups})
        steps = ' or '.join(f'{t} steps ({s} per epoch)' for t, s in budgets)
        lines.append(f'{len(table["classes"])} detectors, seed {table["seed"]}, '
                     f'{table["batch_size"]} images per step, {steps}; stacks trained together: '
                     + '; '.join(', '.join(names) for names in table['groups']) + '.')
    if paper:
        lines.append(f"Paper numbers: {paper['source']}.")
    if os.path.basename(sys.argv[0]) == 'main.py' and 'jaxad' in sys.argv[0]:
        lines.append('Command: `python -m jaxad.main ' + ' '.join(sys.argv[1:]) + '`')
    return '\n'.join(lines) + '\n'
