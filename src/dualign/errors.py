"""Errors about the user's input (config, data, model files). str() is one line naming what is wrong; the command
line prints it and exits with status 2 instead of a traceback."""


class InputError(ValueError):
    kind = "input"  # printed as "dualign: <kind> error: <message>"


class ConfigError(InputError):
    """A bad configuration value; str() is one line naming the key."""

    kind = "config"


class DataError(InputError):
    """Bad data: str() is one line naming the split, the row and the field."""

    kind = "data"


class LoadError(InputError):
    """A model, tokenizer or checkpoint that cannot be loaded."""

    kind = "model"
