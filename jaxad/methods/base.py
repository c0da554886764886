"""The method contract: the one base class the trainer, the table, the evaluator, predict and
export read a method through (docs/architecture.md §3).

A method is one module under jaxad/methods/ with one `Method` subclass, registered by name in
`jaxad.methods.REGISTRY`. Everything outside jaxad/methods/ uses only the members listed on
`Method` below: no `hasattr`/`getattr` probes, no method names. Required members are
abstract (a subclass that lacks one cannot be built); optional ones have their default here.

Conventions:
  * Members that depend on the config (`model`, `headline_score`, `inputs`) are instance
    attributes, set by every method's `__init__` (even when constant). Members fixed per
    method (`config_section`, `scoring_fields`, `needs_step`, `needs_bank`, `uses_consts`,
    `frozen_params`) are class attributes: `jaxad.fingerprint` reads `scoring_fields` from the
    registered class without building it.
  * A method owns its config section: `default_config()` gives `config.<config_section>`'s
    defaults (jaxad.config puts every registered section into the common base) and
    `validate(config)` its checks (called by jaxad.config.validate_config before any data is
    loaded, and again by the constructor).
  * `Method(config, budget=None)`: `budget` is the run's `StepBudget`, computed by the trainer;
    None when the method is built only to score (evaluate from a checkpoint, predict, export).
    Training-only quantities derived from it (OECL's warm-up in steps, ReContrast's alpha
    schedule length) are then unknown and `loss` raises TrainingError saying so.
"""
import abc
import dataclasses

import ml_collections

from jaxad.errors import ConfigError, TrainingError


@dataclasses.dataclass(frozen=True)
class StepBudget:
    """How long a run trains: `steps_per_epoch` updates per pass over the normal training
    images and `total_steps` updates in all.

    steps_per_epoch = N // batch_size: every step is a full global batch (one shape, one
    compilation). The image stream runs across epoch boundaries, so no image is left out for
    good, but an epoch here is floor(N/B) updates. A PyTorch loader with drop_last=False takes
    ceil(N/B), the last batch smaller: CSI's DistributedSampler over 4 GPUs x 32 images gives
    ceil(1250/32) = 40 iterations for a CIFAR-10 class (5000 images), 39 full and one of
    8 images, where this gives 5000 // 128 = 39 (MCL and OECL drop the last batch: floor, as
    here). The schedules are functions of the fractional epoch step / steps_per_epoch, as
    CSI's, so the rate at each epoch is the same; a run of optim.epochs makes 39/40 of the
    original's updates (39 000 vs 40 000 in 1000 epochs: the cosine's T_max in steps scales
    the same) and has none of its 8-image steps (which LARS scales to a full step's size).
    """
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, config, num_normal, what):
        """The budget of `config` on `num_normal` normal training images (`what` names them in
        the error): steps_per_epoch = num_normal // batch_size; total_steps = config.total_steps,
        or optim.epochs x steps_per_epoch when that is 0."""
        steps_per_epoch = num_normal // config.batch_size
        if steps_per_epoch == 0:
            raise ConfigError(f'batch_size={config.batch_size} is larger than the {num_normal} '
                              f'normal training images of {what}')
        total = (config.total_steps if config.total_steps > 0
                 else config.optim.epochs * steps_per_epoch)
        return cls(int(steps_per_epoch), int(total))


class Method(abc.ABC):
    """A detector: its network, loss, features and scores.

    Readers: T = trainer (train.py / the loop), Tb = table.py, E = evaluate.py,
    P = predict.py, X = export.py, F = fingerprint.py, C = config.py, M = jaxad.methods.
    """

    # ------------------------------------------------------------------ class attributes
    # The config section holding this method's knobs ('csi', 'msc', ...; self_oecl: 'oecl'). [C, F]
    config_section = ''
    # Dotted config fields that change the scores but not the training (MSC's 'msc.knn_k'):
    # a finished run is rescored, not refused, when they change. [F]
    scoring_fields = ()
    # True: the loss reads the update count as batch['step'] (schedules inside the loss). [T, Tb]
    needs_step = False
    # False: the scores use no train-bank features, so the bank pass is skipped and
    # fit_scoring sees zeros of the bank's shapes (E.bankless_scoring). [E, Tb]
    needs_bank = True
    # True: `fit_consts` gives constants fixed from the initial model before step 1 (MSC's
    # centre); they live in TrainState.consts and reach `loss` as `consts`. [T, Tb]
    uses_consts = False
    # Regexes on param paths ('^frozen_encoder/') the optimiser never updates. [T, Tb]
    frozen_params = ()
    # False: nothing is trained (a fixed encoder; `loss` is never called): the run takes no
    # step and carries no optimiser state; fitting the scoring state is all it does. [T, Tb]
    trains = True

    # ------------------------------------------------------------------ instance attributes
    # Set by every method's __init__ (they may depend on the config).
    # The Flax module (required; read through init_variables / features). [T, P, X]
    model = None
    # The score name results, tables and thresholds lead with (required). [E, Tb, P, X]
    headline_score = None
    # Extra batch keys the loss reads: 'label' (class position among the normal classes)
    # and/or 'outlier' (outlier-exposure images). [T, Tb, E]
    inputs = ()

    def __init__(self, config, budget=None):
        """Checks the method's config (`validate`) and keeps the step budget (None: scoring
        only). Subclasses call this first, then set `model`, `headline_score` (and `inputs`)."""
        type(self).validate(config)
        self.budget = budget

    # ------------------------------------------------------------------ config ownership
    @classmethod
    def default_config(cls):
        """The defaults of `config.<config_section>` (a ConfigDict). [C]"""
        return ml_collections.ConfigDict()

    @classmethod
    def validate(cls, config):
        """Raises ConfigError for a bad `config` (this method's section and what it needs of
        the shared ones). [C: validate_config; the constructor]"""
        del config

    # ------------------------------------------------------------------ derived flags
    @property
    def needs_bank_labels(self):
        """The bank features carry 'label' (each image's position among the normal classes)
        for fit_scoring: methods that train with labels (MCL). [E, T]"""
        return 'label' in self.inputs

    @property
    def needs_outliers(self):
        """The batches carry 'outlier' images from the `oe.source` stream. [T, Tb]"""
        return 'outlier' in self.inputs

    # ------------------------------------------------------------------ required
    @abc.abstractmethod
    def init_variables(self, key, image_shape):
        """{'params', 'batch_stats'} of a fresh model for images of `image_shape` (H, W, C),
        `model.init_from` weights loaded. Pure (a stacked table vmaps it). [T, Tb, P, X]"""

    @abc.abstractmethod
    def loss(self, params, batch_stats, consts, batch, key):
        """(loss, (metrics dict, new batch_stats)), BN in train mode. batch: {'image': uint8
        (B, H, W, C)} plus the keys named in `inputs`, plus 'step' when `needs_step`. [T, Tb]"""

    @abc.abstractmethod
    def features(self, variables, images, indices, key):
        """Feature tree of a uint8 batch in eval mode; `indices` (dataset positions) and `key`
        seed any test-time augmentation so a feature never depends on batching. [E, Tb, P, X]"""

    @abc.abstractmethod
    def fit_scoring(self, train_features):
        """Scoring state (a dict of arrays, checkpointed) from the train-bank features.
        [E, Tb, P]"""

    @abc.abstractmethod
    def score(self, scoring, test_features):
        """{name: (N,) image scores, higher = more anomalous; pixel methods add (N, h, w)
        maps}; `headline_score` is one of the names. [E, Tb, P, X]"""

    # ------------------------------------------------------------------ optional
    def fit_consts(self, train_features):
        """Constants from the initial model's features of the normal training images, when
        `uses_consts`. [T, Tb]"""
        del train_features
        raise TrainingError(f'{type(self).__name__} has no constants (uses_consts is False): '
                            'fit_consts is only called for methods that set uses_consts')

    def paper_one_class(self, class_names):
        """{'per_class': {name: AUROC %}, 'mean', 'source'} published for a data set with these
        classes, or None (the default: nothing to compare with). [Tb]"""
        del class_names
        return None

    # ------------------------------------------------------------------ inside jaxad/methods
    # Not part of the contract: nothing outside jaxad/methods/ reads it.
    def density_features(self, features):
        """The (N, D) features the eval.density evaluators see (`get_method` attaches them
        through `with_density`; the wrapper is what readers get)."""
        del features
        raise ConfigError(f'{type(self).__name__} does not support eval.density')


# Every member a reader outside jaxad/methods/ uses (the contract): the wrapper below
# delegates exactly these.
MEMBERS = ('config_section', 'scoring_fields', 'needs_step', 'needs_bank', 'uses_consts',
           'frozen_params', 'model', 'headline_score', 'inputs', 'budget',
           'needs_bank_labels', 'needs_outliers', 'init_variables', 'loss', 'features',
           'fit_scoring', 'score', 'fit_consts', 'paper_one_class')


def _delegate(name):
    return property(lambda self: getattr(self.method, name),
                    doc=f'The wrapped method\'s `{name}`.')


class WithDensity(Method):
    """A method whose `fit_scoring`/`score` also fit and return eval.density evaluators.

    Every other member of the contract is the wrapped method's (explicit delegation, one
    property per member of `MEMBERS`). The density state lives under scoring['density'], so
    it is checkpointed and restored with the method's own state.
    """
    needs_bank = True  # the evaluators need the bank's features
    density_names = ()  # the evaluators attached (set by __init__)

    def __init__(self, method, names, cfg, feature_fn):  # pylint: disable=super-init-not-called
        """method: the wrapped method; names: evaluator names; cfg: a density.DensityConfig;
        feature_fn(features tree) -> the (N, D) features the evaluators see."""
        from jaxad import density
        self.method = method
        self.density_names = density.check_names(names)
        self.density_cfg = cfg
        self.density_feature_fn = feature_fn

    def fit_scoring(self, train_features):
        from jaxad import density
        scoring = dict(self.method.fit_scoring(train_features))
        scoring['density'] = density.fit(self.density_names,
                                         self.density_feature_fn(train_features),
                                         self.density_cfg)
        return scoring

    def score(self, scoring, test_features):
        from jaxad import density
        scoring = dict(scoring)
        state = scoring.pop('density')
        scores = dict(self.method.score(scoring, test_features))
        extra = density.score(self.density_names, state,
                              self.density_feature_fn(test_features), self.density_cfg)
        clash = set(scores) & set(extra)
        if clash:
            raise ValueError(f'density score names {sorted(clash)} clash with the method\'s')
        scores.update(extra)
        return scores


for _name in MEMBERS:
    if _name not in ('needs_bank', 'fit_scoring', 'score'):
        setattr(WithDensity, _name, _delegate(_name))
del _name
abc.update_abstractmethods(WithDensity)  # the delegating properties implement the contract


def with_density(method, eval_cfg, feature_fn):
    """`method` with the evaluators named by `eval_cfg.density` attached (unchanged if none).

    feature_fn(features tree) -> (N, D) array: the features the evaluators see.
    """
    from jaxad import density
    names = density.config_names(eval_cfg)
    if not names:
        return method
    return WithDensity(method, names, density.DensityConfig.from_config(eval_cfg), feature_fn)
