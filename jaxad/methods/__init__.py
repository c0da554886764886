"""Method registry: each method module owns its views, loss and scores."""
from jaxad.errors import ConfigError

METHODS = ('csi',)


def get_method(config):
    """The method object named by `config.method`."""
    if config.method == 'csi':
        from jaxad import density
        from jaxad.methods.csi import CSI
        # eval.density sees the 0-degree TTA-mean projection, as CSI's own knn_cosine does.
        return density.with_density(CSI(config), config.eval, lambda f: f['z_bar'][:, 0])
    raise ConfigError(f'unknown method {config.method!r}; available: {", ".join(METHODS)}')
