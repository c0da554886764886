"""Method registry: each method module owns its views, loss and scores.

A method object gives the shared trainer and evaluator:
  model, headline_score, paper_one_class(class_names) -> published numbers or None
  init_variables(key, image_shape) -> {'params', 'batch_stats'}
  loss(params, batch_stats, consts, batch, key) -> (loss, (metrics, batch_stats))
      batch: {'image': uint8 (B, H, W, C)} plus the keys named in `inputs`
  features(variables, images, indices, key) -> feature tree (eval mode)
  fit_scoring(train_features) -> scoring state; score(scoring, test_features) -> {name: (N,)}
and optionally
  inputs: extra batch keys, 'label' (class position) and/or 'outlier' (OE images)
  fit_consts(train_features) -> constants fixed from the initial model (MSC's centre)
  needs_step, configure(steps_per_epoch): the update count arrives as batch['step']
  needs_bank = False: the scores use no train-bank features (the bank pass is skipped)
Pixel methods return (N, h, w) anomaly maps among their scores; the evaluator turns them
into pixel_AUROC / AUPRO against the test masks and overlay PNGs.
"""
from jaxad.errors import ConfigError

METHODS = ('csi', 'msc', 'mcl', 'oecl', 'self_oecl', 'recontrast', 'anomem')

# name -> (module, class, the config section its knobs live in)
_CLASSES = {
    'csi': ('jaxad.methods.csi', 'CSI', 'csi'),
    'msc': ('jaxad.methods.msc', 'MSC', 'msc'),
    'mcl': ('jaxad.methods.mcl', 'MCL', 'mcl'),
    'oecl': ('jaxad.methods.oecl', 'OECL', 'oecl'),
    'self_oecl': ('jaxad.methods.oecl', 'OECL', 'oecl'),
    'recontrast': ('jaxad.methods.recontrast', 'ReContrast', 'recontrast'),
    'anomem': ('jaxad.methods.anomem', 'AnoMem', 'anomem'),
}


def config_section(name):
    """The config section of method `name` (`self_oecl` reads `oecl.*`); the name itself
    for an unknown method (get_method reports that)."""
    return _CLASSES[name][2] if name in _CLASSES else name


def scoring_fields(name):
    """Dotted config fields that change method `name`'s scores but not its training
    (its class's `scoring_fields`); jaxad.fingerprint rescores rather than refuses them."""
    if name not in _CLASSES:
        return ()
    import importlib
    module, cls, _ = _CLASSES[name]
    return tuple(getattr(getattr(importlib.import_module(module), cls), 'scoring_fields', ()))


def _build(config):
    name = config.method
    if name == 'csi':
        from jaxad.methods.csi import CSI
        # eval.density sees the 0-degree TTA-mean projection, as CSI's own knn_cosine does.
        return CSI(config), lambda f: f['z_bar'][:, 0]
    if name == 'msc':
        from jaxad.methods.msc import MSC
        return MSC(config), lambda f: f['phi']
    if name == 'mcl':
        from jaxad.methods.mcl import MCL
        return MCL(config), lambda f: f['u'][:, 0]
    if name in ('oecl', 'self_oecl'):
        from jaxad.methods.oecl import OECL
        return OECL(config, self_supervised=name == 'self_oecl'), lambda f: f['z_clean']
    if name == 'recontrast':
        from jaxad.methods.recontrast import ReContrast
        # eval.density sees the trainable encoder's pooled layer3 features.
        return ReContrast(config), lambda f: f['pooled']
    if name == 'anomem':
        from jaxad.methods.anomem import AnoMem
        return AnoMem(config), AnoMem.density_features
    raise ConfigError(f'unknown method {name!r}; available: {", ".join(METHODS)}')


def get_method(config):
    """The method object named by `config.method`, with `eval.density` evaluators attached."""
    from jaxad import density
    method, density_features = _build(config)
    return density.with_density(method, config.eval, density_features)
