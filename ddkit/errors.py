"""User-facing errors.

Every problem a user can cause (bad paths, corrupt files, unknown names, bad config values) is raised as a
:class:`DDKitError`.  The CLI catches exactly this class and prints its message on one line, so messages must
say what was expected and where, without relying on a traceback.
"""
from __future__ import annotations


class DDKitError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class DataError(DDKitError):
    """Missing, incomplete or corrupt dataset files."""


class ConfigError(DDKitError, ValueError):
    """An unknown configuration key, a value of the wrong type, or an impossible setting."""


class UnknownNameError(DDKitError, ValueError):
    """An unknown registry name (dataset, model, method); the message lists close matches."""


class ArtifactError(DDKitError):
    """A file that is not a valid ddkit artifact (synthetic set, checkpoint, expert store)."""


class DivergenceError(DDKitError):
    """A NaN/Inf loss during distillation; the last good checkpoint is kept."""
