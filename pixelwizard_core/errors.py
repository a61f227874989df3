"""Exceptions that carry messages meant for people: what was wrong, with what value, what to do."""


class PixelWizardError(Exception):
    """Base class of every error the library raises on purpose."""


class WeightFormatError(PixelWizardError, ValueError):
    """A weight file is unreadable, of an unknown layout, or does not match the model it is loaded into."""


class UnsafeCheckpointError(WeightFormatError):
    """A pickle checkpoint needs code execution to load; it is refused."""


class MissingFileError(PixelWizardError, FileNotFoundError):
    """A file the user must provide (weights, tokenizer) is not where it was looked for."""


class ConfigError(PixelWizardError, ValueError):
    """An option or input has a value the library cannot work with."""
