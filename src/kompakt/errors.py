"""Errors a user can cause. Each message says what to do; the CLI prints it in one line."""

from __future__ import annotations


class KompaktError(Exception):
    """Base of every user-facing error; the CLI prints it on one line and exits with 2."""

    exit_code = 2


class ModelNotFoundError(KompaktError):
    """A path, embedded name or hub id that does not resolve to a model."""


class ModelFormatError(KompaktError):
    """A model that exists but cannot be read (truncated, corrupt, pickle-only, ...)."""


class UnsupportedArchitectureError(KompaktError):
    """A model family missing from the architecture table."""


class DataError(KompaktError):
    """Missing, empty, binary or too-short data."""


class ConfigError(KompaktError):
    """Bad options: a window longer than the context, an unknown key, a bad value."""


class OutputPathError(KompaktError):
    """An output path that cannot be written (points into a file, exists without --force)."""
