"""Training and evaluation runs: `train_and_evaluate(config, workdir)` (the public entry) and
`evaluate_checkpoint` (`--mode=eval`), one driver for single runs and one-class tables.

A run is a list of `jaxad.loop.Run`s: a single run is one (`Setup`, below: one detector in
WORKDIR), a table one per stack of detectors (`jaxad.table`). Which one is decided once,
in `_open`; after that the driver treats both alike.

Order of work: refuse a workdir another training config made, validate the config, load
and check the data (`jaxad.detectors`: every input error surfaces here, before any
compile), build mesh/model/optimizer; then for each `Run`: resume from its latest
checkpoint if there is one, train (`Run.train`), fit the scoring state on the normal
training images, save it with the final checkpoint and evaluate on the test split. A run
finished before is only evaluated (its saved scoring state, refitted when the scoring
settings changed).
"""
import functools
import time

import jax
from absl import logging

from jaxad import detectors, fingerprint, loop, predict, preemption, sharding, storage, table
from jaxad import evaluate as eval_lib
from jaxad.config import validate_config
from jaxad.errors import TrainingError
from jaxad.lease import holds_workdir
from jaxad.writers import Progress


class Setup(loop.Run):
    """A single detector's run (checkpoints, metrics.jsonl and results in WORKDIR): a run
    of one `Run`, and that `Run`."""

    def __init__(self, config, workdir):
        validate_config(config)
        self.workdir = workdir
        data = detectors.load(config)
        detector, = data.detectors
        self.train_set, self.test_set, self.outlier_set = (data.train_set, data.test_set,
                                                           data.outlier_set)
        self.normal_classes = list(detector.normal_classes)
        self.normal_indices = detector.indices
        # threshold.holdout_fraction > 0: kept out of training and the scoring bank,
        # calibrates the decision threshold after training (jaxad.thresholds).
        self.holdout_indices = detector.holdout_indices
        mesh = sharding.make_mesh(config.num_devices)
        self._build(config, workdir, data, [detector], mesh, 'training')
        self.runs = [self]

    def close(self):
        self.checkpoints.close()

    def write(self, results, extra=None):  # pylint: disable=unused-argument
        """The run's results (results.json was written by `evaluate`)."""
        return results[0]

    # ------------------------------------------------------------------ loop.Run hooks

    @functools.cached_property
    def state_sharding(self):
        return sharding.replicated(self.mesh)

    @functools.cached_property
    def rng(self):
        return jax.random.key(self.config.seed)

    def init_fn(self):
        return loop.make_init_fn(self.method, self.tx, self.image_shape)

    def init_keys(self):
        return loop.init_key(self.config.seed)

    def jit_step(self, train_step):
        return loop.jit_train_step(train_step, self.mesh,
                                   on_device=self.device_input is not None)

    def batches(self, start_step):
        host, = self.host_streams(start_step)
        return (self.with_tables(sharding.to_global(b, self.mesh)) for b in host)

    def member_features(self, state, label):
        return [eval_lib.extract_features(
            self.method, loop.variables_of(state), self.train_set, self.normal_indices,
            batch_size=self.config.eval.batch_size, mesh=self.mesh,
            key=eval_lib.eval_bank_key(self.config.seed), label=label)]

    def stack(self, trees):
        return trees[0]

    def unstack(self, tree):
        return [tree]

    def pack_scoring(self, scorings):
        return scorings[0]

    def after_final_save(self, state, scoring, step):
        # config.json describes the saved run; the threshold is calibrated (if asked for).
        fingerprint.write_run_record(self.config, self.workdir)
        threshold = predict.calibrate_after_training(
            self.config, self.method, self.workdir, loop.variables_of(state), scoring, step,
            train_images=self.train_set.images, holdout_indices=self.holdout_indices)
        return {'threshold': threshold} if threshold else {}

    def evaluate(self, state, scoring, step, extra):
        return [eval_lib.evaluate(self.method, loop.variables_of(state), scoring, self.test_set,
                                  self.normal_classes, config=self.config, mesh=self.mesh,
                                  workdir=self.workdir, extra=dict(step=step, **extra),
                                  bank=eval_lib.baseline_bank(self.config, self.train_set,
                                                              self.normal_indices))]


def _open(config, workdir):
    """The run's `Run`s and how its results are written: a table's (`table.classes` set) or
    a single run's. The one place that tells the two apart."""
    if config.table.classes:
        return table.TableSetup(config, workdir)
    return Setup(config, workdir)


@holds_workdir
def train_and_evaluate(config, workdir):
    """Trains (or resumes) the configured detector(s) and evaluates them.

    A workdir whose checkpoints another training config made is refused first
    (`jaxad.fingerprint`). A `Run` finished before trains nothing and is rescored from its
    checkpoint (refitting the scoring state when the scoring settings changed; a table
    reuses a finished group's results). Returns the results also written to
    `workdir/results.json` (a single run's, or the table's with `table.classes` set).
    """
    fingerprint.check_workdir(config, workdir)  # before any data is read or compiled
    t0 = time.time()
    loop.start_record(config, workdir)
    job = _open(config, workdir)
    runs = job.runs
    try:
        # Steps already in checkpoints count as done for the ETA.
        progress = Progress(sum(r.total_steps for r in runs),
                            label='table' if runs[0].member_names else 'train',
                            first=sum(min(r.checkpoints.latest_step() or 0, r.total_steps)
                                      for r in runs))
        results, done_steps = [], 0
        num_detectors = sum(len(r.detectors) for r in runs)
        # SIGTERM / SIGINT (jaxad.preemption): a run in training stops at a step with its
        # checkpoint, and no further run starts; evaluations are not watched (disarmed).
        with preemption.Watch() as watch:
            for i, run in enumerate(runs):
                if i and watch.reached():
                    raise watch.preempted_between_groups(
                        run.name, f'{i} of {len(runs)}', storage.join(workdir, 'groups'))
                t_run = time.time()
                state, start = run.resume()
                if start >= run.total_steps and run.checkpoints.has_scoring(start):
                    run_results = run.saved_results(start)
                    what = f'group {run.name}' if run.member_names else 'run'
                    if run_results is not None:
                        logging.info('%s finished at step %d; reusing its results', what, start)
                    else:
                        logging.info('%s already finished at step %d; evaluating only', what,
                                     start)
                        scoring, extra = run.finished_scoring(state, start, workdir)
                        run_results = run.evaluate(state, scoring, start, extra)
                else:
                    fields = (dict(classes=f'{len(results)}/{num_detectors}', group=run.name)
                              if run.member_names else {})
                    state = run.train(state, start, progress, done_steps, watch=watch,
                                      **fields)
                    run_results = run.finish(
                        state, watch, extra=dict(train_seconds=round(time.time() - t_run, 2)))
                results.extend(run_results)
                done_steps += run.total_steps
                if run.member_names:
                    progress.update(done_steps, classes=f'{len(results)}/{num_detectors}')
        return job.write(results, extra=dict(wall_seconds=round(time.time() - t0, 2)))
    finally:
        job.close()


@holds_workdir
def evaluate_checkpoint(config, workdir):
    """`--mode=eval`: scores the test split from the latest checkpoints, no training (a
    table is rebuilt from its groups' checkpoints alone)."""
    fingerprint.check_workdir(config, workdir)
    job = _open(config, workdir)
    try:
        results = []
        for run in job.runs:
            state, step = run.restore_latest()
            if state is None:
                which = f' for group {run.name}' if run.member_names else ''
                raise TrainingError(f'no checkpoint{which} in {run.checkpoints.directory}; '
                                    'train first (--mode=train)')
            scoring, extra = run.finished_scoring(state, step, workdir)
            results.extend(run.evaluate(state, scoring, step, extra))
        return job.write(results)
    finally:
        job.close()
