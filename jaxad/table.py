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
import functools
import json
import os
import sys
import time

import jax
import numpy as np
from absl import logging

from jaxad import baseline, detectors, fingerprint, loop, reuse, sharding, stacking, storage
from jaxad import thresholds
from jaxad import evaluate as eval_lib
from jaxad.config import validate_config
from jaxad.errors import ConfigError

METRICS = ('image_AUROC', 'image_AUPR', 'FPR@95TPR')


def make_groups(members, stack_size):
    """Members with equal step budgets, in order, in stacks of at most `stack_size`."""
    by_budget = {}
    for m in members:
        by_budget.setdefault((m.steps_per_epoch, m.total_steps), []).append(m)
    size = stack_size or len(members)
    return [ms[i:i + size] for ms in by_budget.values() for i in range(0, len(ms), size)]


class Group(loop.Run):
    """A stack of detectors trained as one program (`loop.Run`), with its own checkpoints,
    metrics.jsonl and results.json under WORKDIR/groups/<classes>/."""

    def __init__(self, setup, members, position):
        config = setup.config
        self.setup, self.members, self.k = setup, members, len(members)
        self.member_names = [m.name for m in members]
        self.position = position  # 'i of n': the table's groups before this one (messages)
        self.mode = stacking.resolve_mode(config.table.stack_mode)
        # Unrolled models index the model axis one by one: keep it whole on every device.
        # Several processes: likewise (each process feeds all K models' batch slices).
        by_model = self.mode == 'vmap' and jax.process_count() == 1
        mesh = sharding.make_mesh(config.num_devices, num_models=self.k if by_model else 1)
        name = 'classes_' + '_'.join('+'.join(map(str, m.normal_classes)) for m in members)
        directory = storage.join(setup.workdir, 'groups', name)
        storage.makedirs(directory)
        self._build(config, directory, setup.data, members, mesh, name,
                    method=setup.method_for(members[0].budget))

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
        return loop.jit_stacked_step(train_step, self.mesh, self.mode,
                                     on_device=self.device_input is not None)

    def batches(self, start_step):
        """Member k's batch of its own class from its own stream, stacked on axis 0."""
        streams = self.host_streams(start_step, read_threads=1 if self.k > 2 else 2)
        where = sharding.stacked_data_sharding(self.mesh)
        while True:
            batches = [next(stream) for stream in streams]
            stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)
            yield self.with_tables(sharding.to_global(stacked, self.mesh, where))

    def member_features(self, state, label):
        """Each member's features of its own normal training images, one stacked pass."""
        return eval_lib.extract_stacked_features(
            self.method, loop.variables_of(state), self.data.train_set,
            [m.indices for m in self.members], batch_size=self.config.eval.batch_size,
            mesh=self.mesh, mode=self.mode, key=eval_lib.eval_bank_key(self.config.seed),
            label=f'{self.name} {label}')

    def stack(self, trees):
        return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *trees)

    def unstack(self, tree):
        return [jax.tree_util.tree_map(lambda x, i=i: x[i], tree) for i in range(self.k)]

    def pack_scoring(self, scorings):
        return {f'm{i}': s for i, s in enumerate(scorings)}

    def evaluate(self, state, scoring, step, extra):
        """Per-member results from one stacked pass over the test split, also written to
        the group's results.json."""
        t0 = time.time()
        config, test_set = self.config, self.data.test_set
        feats = eval_lib.extract_stacked_features(
            self.method, loop.variables_of(state), test_set, None,
            batch_size=config.eval.batch_size, mesh=self.mesh, mode=self.mode,
            key=eval_lib.eval_test_key(config.seed), label=f'{self.name} test')
        results = []
        for i, (m, member_feats) in enumerate(zip(self.members, self.unstack(feats))):
            r, _, _ = eval_lib.results_with_maps(
                self.method, eval_lib.score_features(self.method, scoring[f'm{i}'],
                                                     member_feats),
                test_set, m.normal_classes, config.method,
                bank=eval_lib.baseline_bank(config, self.data.train_set, m.indices))
            r.update(name=m.name, step=int(step), group=self.name, **(extra or {}),
                     **fingerprint.results_record(config))
            results.append(r)
        seconds = round(time.time() - t0, 2)
        for r in results:
            r['group_eval_seconds'] = seconds
        if jax.process_index() == 0:
            storage.write_json(self.results_path(), results, indent=2)
        return results

    def saved_results(self, step):
        """The group's results.json if it belongs to checkpoint `step` and was scored with
        this config's training fingerprint and scoring settings, else None."""
        try:
            results = json.loads(storage.read_text(self.results_path()))
        except (OSError, ValueError):
            return None
        record = fingerprint.results_record(self.config)
        if len(results) == self.k and all(
                r.get('step') == step and all(r.get(k) == v for k, v in record.items())
                for r in results):
            return results
        return None

    def results_path(self):
        return storage.join(self.directory, 'results.json')

    def preempted_fields(self):
        return dict(group=self.name, groups_done=self.position)


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
    """A table's data, detectors (`members`) and groups (its `Run`s, trained one after the
    other by `jaxad.train`), and how its results are written."""

    def __init__(self, config, workdir):
        validate_config(config)
        check_no_threshold(config)
        self.config, self.workdir = config, workdir
        # The table's own questions (headline score, published numbers); each group trains
        # with a method built for its step budget.
        self.method = reuse.method(config)
        self.data = detectors.load(config)
        self.members = self.data.detectors
        self.test_set, self.image_shape = self.data.test_set, self.data.image_shape
        self.groups = []
        try:
            stacks = make_groups(self.members, config.table.stack_size)
            for i, ms in enumerate(stacks):
                self.groups.append(Group(self, ms, f'{i} of {len(stacks)}'))
        except BaseException:
            self.close()
            raise

    @property
    def runs(self):
        return self.groups

    def method_for(self, budget):
        """The method of groups with step budget `budget` (one object per budget, so groups
        of equal budgets share its compiled programs; `jaxad.reuse`)."""
        return reuse.method(self.config, budget)

    def close(self):
        for g in self.groups:
            g.checkpoints.close()

    def write(self, results, extra=None):
        return write_table(self, results, extra)


def _mean_row(results):
    mean = {k: float(np.mean([r[k] for r in results])) for k in METRICS}
    mean['scores'] = {s: {k: float(np.mean([r['scores'][s][k] for r in results]))
                          for k in METRICS}
                      for s in results[0]['scores']}
    if all('baseline' in r for r in results):  # results saved before it: none
        mean['baseline'] = {baseline.NAME: {'image_AUROC': float(np.mean(
            [r['baseline'][baseline.NAME]['image_AUROC'] for r in results]))}}
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
    pixel = 'baseline' in table['mean']
    head = ['normal class', 'image AUROC %', 'image AUPR %', 'FPR@95TPR %']
    if pixel:
        head.append('raw-pixel 1-NN AUROC %')
    if paper:
        head.append('paper AUROC %')
    lines = [f"# {table['method'].upper()} one-class table: {table['dataset']}", '',
             '| ' + ' | '.join(head) + ' |', '|' + '---|' + '---:|' * (len(head) - 1)]

    def row(name, r, paper_value):
        cells = [name] + [f'{100 * r[k]:.2f}' for k in METRICS]
        if pixel:
            base = r['baseline'][baseline.NAME]['image_AUROC']
            cells.append(f'{100 * base:.2f}' + (' (above the detector)'
                                                 if baseline.below(r) else ''))
        if paper:
            cells.append('' if paper_value is None else f'{paper_value:.1f}')
        return '| ' + ' | '.join(cells) + ' |'

    for r in table['classes']:
        lines.append(row(r['name'], r, paper['per_class'].get(r['name']) if paper else None))
    lines.append(row('**mean**', table['mean'], paper['mean'] if paper else None))
    lines += ['', f"Score: `{table['headline_score']}`; FPR@95TPR with anomaly as the positive "
              'class; each detector tests its normal class against all other test images.']
    if pixel:
        weaker = [r['name'] for r in table['classes'] if baseline.below(r)]
        lines.append(f'Raw-pixel 1-NN: {baseline.DESCRIPTION}, the same split (jaxad.baseline). '
                     + (f"The detector is below it for {', '.join(weaker)}"
                        + (' and on the mean.' if baseline.below(table['mean']) else '.')
                        if weaker or baseline.below(table['mean'])
                        else 'The detector is not below it for any class.'))
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
