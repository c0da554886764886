"""Method registry: each method module owns its views, loss, scores and config section.

The contract is `jaxad.methods.base.Method`: the one base class listing every member the
trainer, the table, the evaluator, predict and export read (required ones and the defaults
of the optional ones), plus `StepBudget`, the run length a method is built with. Nothing
outside jaxad/methods/ probes a method or knows one by name: it asks `get_method(config,
budget)` for the object and reads only `Method`'s members.

Pixel methods return (N, h, w) anomaly maps among their scores; the evaluator turns them
into pixel_AUROC / AUPRO against the test masks and overlay PNGs.
"""
from jaxad.errors import ConfigError
from jaxad.methods.anomem import AnoMem
from jaxad.methods.base import Method, StepBudget, with_density
from jaxad.methods.csi import CSI
from jaxad.methods.feature_knn import FeatureKNN
from jaxad.methods.mcl import MCL
from jaxad.methods.msc import MSC
from jaxad.methods.oecl import OECL, SelfOECL
from jaxad.methods.recontrast import ReContrast

# name (config.method) -> Method subclass
REGISTRY = {
    'csi': CSI,
    'msc': MSC,
    'mcl': MCL,
    'oecl': OECL,
    'self_oecl': SelfOECL,
    'recontrast': ReContrast,
    'anomem': AnoMem,
    'feature_knn': FeatureKNN,
}

METHODS = tuple(REGISTRY)

__all__ = ['REGISTRY', 'METHODS', 'Method', 'StepBudget', 'method_class', 'get_method',
           'config_section', 'scoring_fields', 'with_density']


def method_class(name):
    """The registered class of method `name`; ConfigError for an unknown name."""
    if name not in REGISTRY:
        raise ConfigError(f'unknown method {name!r}; available: {", ".join(REGISTRY)}')
    return REGISTRY[name]


def config_section(name):
    """The config section of method `name` (`self_oecl` reads `oecl.*`); the name itself
    for an unknown method (get_method reports that)."""
    return REGISTRY[name].config_section if name in REGISTRY else name


def scoring_fields(name):
    """Dotted config fields that change method `name`'s scores but not its training
    (its class's `scoring_fields`); jaxad.fingerprint rescores rather than refuses them."""
    return tuple(REGISTRY[name].scoring_fields) if name in REGISTRY else ()


def get_method(config, budget=None):
    """The method object named by `config.method`, with `eval.density` evaluators attached.

    budget: the run's `StepBudget` (the trainer's); None to build it only to score.
    """
    method = method_class(config.method)(config, budget)
    return with_density(method, config.eval, method.density_features)
