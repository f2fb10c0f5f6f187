"""Typed errors. Every failure a user can cause is an ``AlmtError`` with a one-line message.

The CLI prints ``error: <message>`` and exits non-zero; library callers can catch the base class.
"""


class AlmtError(Exception):
    """Base class of all errors raised for bad input, missing parts or failed work."""


class ConfigError(AlmtError):
    """A config file or option is invalid (unknown key, wrong type, impossible value)."""


class FeatureFileError(AlmtError):
    """A feature file cannot be read or does not match the MMSA schema / the model config."""


class UnsafePickleError(FeatureFileError):
    """A pickle asked to build an object outside the allowed set (possible code execution)."""


class MediaError(AlmtError):
    """A media file cannot be probed or decoded (missing stream, corrupt, too short...)."""


class ExtractionError(AlmtError):
    """A feature extractor failed on a clip."""


class TextModelError(AlmtError):
    """The text model (BERT-architecture) cannot be found or loaded."""


class CheckpointError(AlmtError):
    """A checkpoint directory is missing, incomplete or incompatible."""


class DependencyError(AlmtError):
    """An optional package (or its model weights) needed for the requested feature is missing."""


class TrainingError(AlmtError):
    """Training cannot proceed (e.g. an empty split, non-finite loss)."""
