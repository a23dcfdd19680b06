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


class PayloadError(MirageError):
    """A request body is not the file format it claims to be (a truncated or malformed npz/npy)."""


class PayloadTooLargeError(PayloadError):
    """A request body, or an array it declares, is larger than the configured limit."""


class ResourceError(MirageError):
    """A run asks for resources (GPUs) that this machine or Ray cluster cannot ever provide."""


class TrackingError(MirageError):
    """The MLflow tracking store cannot be reached or written."""
