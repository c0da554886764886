"""The one-class table: one detector per normal class, trained as stacks.

`normal_class=all` (or `0,3,5`) sets `table.classes`; each item becomes a
*member*, a detector whose normal data is that class. Members are trained as
stacks: their params, batch stats and optimizer states carry a leading model
axis, and one jitted, donated step applies the method's ordinary
`(state, batch, rng)` step to every member (`jax.vmap` on accelerators,
unrolled on CPU: `jaxad.stacking`), each member fed a batch of its own class
from its own data stream. BatchNorm statistics therefore stay per
member, and member k runs the step of a single run of its class with the same
seed (same init key, augmentation keys and data order), up to float32 rounding:
the stacked program orders some float32 sums differently, so over many steps a
member can end at a visibly different model (README, RESULTS.md).

Members stack when their step budgets agree (same images per class, hence
same steps per epoch and learning-rate schedule); `table.stack_size` bounds
a stack (memory) and the rest run as following groups. Each group is its own
Orbax checkpoint directory under `workdir/groups/<classes>/`, so rerunning the
command resumes the unfinished group and never retrains a finished one. A group is a
`jaxad.loop.Run`: it restores, trains, logs and saves with the single run's loop.

Outputs: `workdir/results.json` (per-member metrics and their mean) and
`workdir/results.md` (the table a person pastes into a paper).
"""
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import numpy as np
from absl import logging

from jaxad import evaluate as eval_lib
from jaxad import fingerprint, loop, preemption, sharding, stacking, storage, thresholds
from jaxad.config import normal_classes as parse_normal_classes
from jaxad.config import validate_config
from jaxad.data import sources
from jaxad.errors import ConfigError, TrainingError
from jaxad.methods import StepBudget, get_method
from jaxad.writers import Progress

METRICS = ('image_AUROC', 'image_AUPR', 'FPR@95TPR')


@dataclasses.dataclass(frozen=True)
class Member:
    """One detector of the table."""
    normal_classes: tuple
    name: str
    indices: np.ndarray  # its normal training images
    steps_per_epoch: int
    total_steps: int

    @property
    def budget(self):
        return StepBudget(self.steps_per_epoch, self.total_steps)


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


class Group(loop.Run):
    """A stack of members trained as one program (`loop.Run`), with its own checkpoints
    and metrics.jsonl under WORKDIR/groups/<classes>/."""

    groups_done = None  # 'i of n': the table's groups finished before this one (messages)

    def __init__(self, setup, members):
        config = setup.config
        self.setup, self.members, self.k = setup, members, len(members)
        self.member_names = [m.name for m in members]
        self.mode = stacking.resolve_mode(config.table.stack_mode)
        # Unrolled models index the model axis one by one: keep it whole on every device.
        # Several processes: likewise (each process feeds all K models' batch slices).
        by_model = self.mode == 'vmap' and jax.process_count() == 1
        mesh = sharding.make_mesh(config.num_devices, num_models=self.k if by_model else 1)
        name = 'classes_' + '_'.join('+'.join(map(str, m.normal_classes)) for m in members)
        directory = storage.join(setup.workdir, 'groups', name)
        storage.makedirs(directory)
        budget = members[0].budget
        self._build(config, directory, budget, mesh, setup.image_shape, name,
                    method=setup.method_for(budget))

    @functools.cached_property
    def state_sharding(self):
        return sharding.model_sharding(self.mesh)

    @functools.cached_property
    def rng(self):
        # Every member uses the run's seed, as K separate runs of the paper protocol would.
        seeds = np.full(self.k, self.config.seed, np.uint32)
        return jax.device_put(jax.vmap(jax.random.key)(seeds), self.state_sharding)
    def init_fn(self):
        return stacking.stacked(loop.make_init_fn(self.method, self.tx, self.image_shape),
                                self.mode)

    def init_keys(self):
        return jax.vmap(loop.init_key)(np.full(self.k, self.config.seed, np.uint32))

    def jit_step(self, train_step):
        return loop.jit_stacked_step(train_step, self.mesh, self.mode)

    def batches(self, start_step):
        """Member k's batch of its own class from its own stream, stacked on axis 0."""
        s = self.setup
        streams = [loop.train_batches(self.method, self.config, s.train_set, m.indices,
                                      m.normal_classes, s.outlier_set, start_step,
                                      read_threads=1 if self.k > 2 else 2)
                   for m in self.members]
        where = sharding.stacked_data_sharding(self.mesh)
        while True:
            batches = [next(stream) for stream in streams]
            yield sharding.to_global({k: np.stack([b[k] for b in batches]) for k in batches[0]},
                                     self.mesh, where)

    def fit_consts(self, state):
        """Each member's method constants from its initial model and its own normal images
        (`train.init_consts` for a stack); unchanged for methods without constants."""
        if not self.method.uses_consts:
            return state
        feats = self.member_features(state, 'initial features')
        fit = jax.jit(self.method.fit_consts)
        consts = [jax.device_get(fit(f)) for f in feats]
        stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *consts)
        return state.replace(consts=jax.device_put(stacked, self.state_sharding))

    def member_features(self, state, label):
        """Each member's features of its own normal training images, one stacked pass."""
        s = self.setup
        return eval_lib.extract_stacked_features(
            self.method, _variables(state), s.train_set, [m.indices for m in self.members],
            batch_size=self.config.eval.batch_size, mesh=self.mesh, mode=self.mode,
            key=eval_lib.eval_bank_key(self.config.seed), label=f'{self.name} {label}')

    def results_path(self):
        return storage.join(self.directory, 'results.json')

    def preempted_fields(self):
        return dict(group=self.name, groups_done=self.groups_done)


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
        # The table's own questions (headline score, published numbers, outlier input);
        # each group trains with a method built for its step budget.
        self.method = get_method(config)
        self.train_set = sources.load_split(config.data, 'train')
        self.test_set = sources.with_ood(sources.load_split(config.data, 'test'),
                                         config.eval.ood)
        self.image_shape = loop.check_image_shape(self.train_set, config.data)
        loop.check_image_shape(self.test_set, config.data)
        names = self.train_set.class_names
        self.members = []
        for classes in parse_members(config.table.classes, names):
            indices = sources.one_class_indices(self.train_set.labels, classes, len(names),
                                                self.train_set.name)
            sources.one_class_indices(self.test_set.labels, classes, len(names),
                                      self.test_set.name)
            budget = StepBudget.of(config, len(indices), f'class(es) {classes}')
            self.members.append(Member(tuple(classes), '+'.join(names[c] for c in classes),
                                       indices, budget.steps_per_epoch, budget.total_steps))
        self.outlier_set = loop.load_auxiliary_outliers(self.method, config, self.image_shape)
        self._methods, self.groups = {}, []
        try:
            for ms in make_groups(self.members, config.table.stack_size):
                self.groups.append(Group(self, ms))
        except BaseException:
            self.close()
            raise

    def method_for(self, budget):
        """The method of groups with step budget `budget` (one object per budget, so groups
        of equal budgets share its compiled programs)."""
        if budget not in self._methods:
            self._methods[budget] = get_method(self.config, budget)
        return self._methods[budget]

    def close(self):
        for g in self.groups:
            g.checkpoints.close()


def _variables(state):
    return {'params': state.params, 'batch_stats': state.batch_stats}


def _fit_group_scoring(setup, group, state):
    """Scoring states of all members, from one stacked pass over their train banks."""
    method = group.method
    if not eval_lib.needs_bank_pass(method):
        one = jax.tree_util.tree_map(lambda x: x[0], _variables(state))
        return {f'm{i}': eval_lib.bankless_scoring(method, one, setup.image_shape,
                                                   len(m.indices),
                                                   jax.random.key(setup.config.seed))
                for i, m in enumerate(group.members)}
    feats = group.member_features(state, 'train banks')
    labels = np.asarray(setup.train_set.labels)
    return {f'm{i}': eval_lib.scoring_from_features(
        method, eval_lib.with_bank_labels(method, f, labels[m.indices]))
        for i, (f, m) in enumerate(zip(feats, group.members))}


def _restore_group_scoring(setup, group, state, step):
    """Saved scoring states of a group's final checkpoint (their shapes from the
    checkpoint's own metadata). Damaged: the step is set aside, the scoring states
    refitted from `state` and the step saved again."""
    return group.checkpoints.restore_or_refit_scoring(
        step, state, lambda: _fit_group_scoring(setup, group, state))


def _evaluate_group(setup, group, state, scorings, step, extra=None):
    """Per-member results from one stacked pass over the test split."""
    t0 = time.time()
    config = setup.config
    method = group.method
    feats = eval_lib.extract_stacked_features(
        method, _variables(state), setup.test_set, None,
        batch_size=config.eval.batch_size, mesh=group.mesh, mode=group.mode,
        key=eval_lib.eval_test_key(config.seed), label=f'{group.name} test')
    results = []
    for i, m in enumerate(group.members):
        member_feats = jax.tree_util.tree_map(lambda x, i=i: x[i], feats)
        r, _, _ = eval_lib.results_with_maps(
            method, eval_lib.score_features(method, scorings[f'm{i}'], member_feats),
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
        storage.write_json(group.results_path(), results, indent=2)


def _saved_group_results(group, step, config):
    """The group's results.json if it belongs to checkpoint `step` and was scored with
    `config`'s training fingerprint and scoring settings, else None."""
    try:
        results = json.loads(storage.read_text(group.results_path()))
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
    loop.start_record(config, workdir)
    setup = TableSetup(config, workdir)
    # One bar for the whole table; steps already in checkpoints count as done for the ETA.
    progress = Progress(sum(g.total_steps for g in setup.groups), label='table',
                        first=sum(min(g.checkpoints.latest_step() or 0, g.total_steps)
                                  for g in setup.groups))
    try:
        results, done_before = [], 0
        # SIGTERM / SIGINT (jaxad.preemption): a group in training stops at a step with its
        # checkpoint, and no further group starts; evaluations are not watched (disarmed).
        with preemption.Watch() as watch:
            for i, group in enumerate(setup.groups):
                group.groups_done = f'{i} of {len(setup.groups)}'
                if watch.reached():
                    raise watch.preempted_between_groups(
                        group.name, group.groups_done, storage.join(workdir, 'groups'))
                state, start = group.resume()
                classes_done = f'{len(results)}/{len(setup.members)}'
                finished = start >= group.total_steps and group.checkpoints.has_scoring(start)
                saved = _saved_group_results(group, start, config) if finished else None
                if saved is not None:
                    logging.info('group %s finished at step %d; reusing its results',
                                 group.name, start)
                    group_results = saved
                elif finished:
                    scorings, extra = _finished_group_scoring(setup, group, state, start)
                    group_results = _evaluate_group(setup, group, state, scorings, start, extra)
                else:
                    state = group.train(state, start, progress, done_before, watch=watch,
                                        classes=classes_done, group=group.name)
                    scorings = _fit_group_scoring(setup, group, state)
                    group.checkpoints.save(group.total_steps, state, scoring=scorings)
                    group.checkpoints.wait()
                    fingerprint.write_scoring_settings(config, group.directory)
                    if watch.reached():
                        raise watch.preempted(group.total_steps, group.total_steps,
                                              group.checkpoints.directory, final=True,
                                              **group.preempted_fields())
                    watch.disarm()  # until the next group's first step
                    group_results = _evaluate_group(setup, group, state, scorings,
                                                    group.total_steps)
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
            state, step = group.restore_latest()
            if state is None:
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
    paper = setup.method.paper_one_class(setup.test_set.class_names)
    table = {
        'method': config.method, 'dataset': setup.test_set.name,
        'headline_score': setup.method.headline_score, 'table_classes': config.table.classes,
        'seed': config.seed, 'batch_size': config.batch_size,
        'groups': [[m.name for m in g.members] for g in setup.groups],
        'classes': results, 'mean': _mean_row(results),
        'paper_image_AUROC_percent': paper, 'FPR@95TPR_positive_class': 'anomaly',
        **fingerprint.results_record(config), **(extra or {})}
    if jax.process_index() == 0:
        storage.write_json(storage.join(setup.workdir, 'results.json'), table, indent=2)
        markdown = format_markdown(table, setup)
        storage.write_text(storage.join(setup.workdir, 'results.md'), markdown)
        print(markdown, flush=True)
        logging.info('table written to %s', storage.join(setup.workdir, 'results.md'))
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
