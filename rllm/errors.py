"""Errors shared by the loaders (weights, zoo, OPT), in a module of their own so that none of them
has to import another for its error type."""


class ModelLoadError(ValueError):
    """Weights could not be found or loaded; the message says which file, what is wrong and what to do."""
