"""Method registry: each method module owns its views, loss and scores."""
from jaxad.errors import ConfigError

METHODS = ('csi',)


def get_method(config):
    """The method object named by `config.method`."""
    if config.method == 'csi':
        from jaxad.methods.csi import CSI
        return CSI(config)
    raise ConfigError(f'unknown method {config.method!r}; available: {", ".join(METHODS)}')
