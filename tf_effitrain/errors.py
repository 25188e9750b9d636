"""The toolkit's user-facing errors: each message says what is wrong and how to fix it.

`tf-effitrain` prints any `TfEffitrainError` as one line and exits with code 2; Python
users can catch the base class or the specific kind.
"""

__all__ = ["TfEffitrainError", "ConfigError", "DataError", "StrategyError", "RunDirError",
           "TrainingInterrupted", "NonFiniteError", "DataWarning"]


class TfEffitrainError(Exception):
    """Base class of the errors caused by input the user can fix."""


class ConfigError(TfEffitrainError, ValueError):
    """A configuration value or key that cannot be used. The message names the key."""


class DataError(TfEffitrainError, ValueError):
    """Input data that cannot be used for training; the message says what to fix."""


class StrategyError(TfEffitrainError, RuntimeError):
    """A requested strategy cannot run here; the message says what is missing."""


class RunDirError(TfEffitrainError, ValueError):
    """A run directory that cannot be written or is not the finished run expected."""


class TrainingInterrupted(TfEffitrainError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; the message says
    how to resume. `tf-effitrain` exits with code 130."""


class NonFiniteError(TfEffitrainError, FloatingPointError):
    """The loss or the weights became NaN/Inf; the message names the update and the
    last good checkpoint."""


class DataWarning(UserWarning):
    """Data that trains, but probably not as the user meant (e.g. a class too small to
    appear in every split)."""
