"""Exceptions that the CLI turns into one red line and exit code 2."""


class BreastCNNError(Exception):
    """Base class for expected, user-facing failures (bad input, missing files)."""


class UserInputError(BreastCNNError, ValueError):
    """An option, argument or file is wrong; the message names it and the value received."""


class MissingDependencyError(BreastCNNError, ImportError):
    """An optional dependency (TensorFlow for the Keras models) is not installed."""


class BreastCNNWarning(UserWarning):
    """Something was wrong but handled (a damaged cache rebuilt); the CLI prints it as one yellow line."""
