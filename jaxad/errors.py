"""The exceptions jaxad raises for bad input.

`jaxad.main` turns any `JaxadError` into one line on stderr and exit status 1,
so every message must say what is wrong and where (path, class, key).
"""


class JaxadError(Exception):
    """Base class: a user-facing problem with input, config or a run."""


class DataError(JaxadError):
    """Missing/corrupt/empty data, or images of the wrong shape."""


class ConfigError(JaxadError):
    """An unknown method, dataset, option or an inconsistent config."""


class TrainingError(JaxadError):
    """A run that cannot continue (NaN loss, incompatible checkpoint)."""
