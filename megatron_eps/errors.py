"""The error a user's setting raises, at the bottom so that every layer can raise it
(``megatron_eps.config`` is its public home)."""


class EPSConfigError(ValueError):
    """A megatron-eps setting has a value that is not allowed. The message names both."""
