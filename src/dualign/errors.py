"""Errors about the user's input (config, data, model files). str() is one line naming what is wrong; the command
line prints it and exits with status 2 instead of a traceback."""


class InputError(ValueError):
    kind = "input"  # printed as "dualign: <kind> error: <message>"


class LoadError(InputError):
    """A model, tokenizer or checkpoint that cannot be loaded."""

    kind = "model"
