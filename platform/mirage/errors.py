"""Errors that mean "the user's input is wrong"; the CLI prints them as one line."""

from __future__ import annotations


class MirageError(Exception):
    """Base of user-facing errors: the message says what, where, and what was expected."""


class DataError(MirageError):
    """A dataset file, key, shape or value is not what the Algonauts layout promises."""


class FeatureStoreError(MirageError):
    """A feature store is missing, incomplete, corrupt or was written with other parameters."""


class ModelLoadError(MirageError):
    """A checkpoint or model URI cannot be loaded into the MIRAGE model."""
