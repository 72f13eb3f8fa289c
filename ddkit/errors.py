"""User-facing errors and warnings.

Every problem a user can cause (bad paths, corrupt files, unknown names, bad config values) is raised as a
:class:`DDKitError`.  The CLI catches exactly this class and prints its message on one line, so messages must
say what was expected and where, without relying on a traceback.
"""
from __future__ import annotations


class DDKitError(Exception):
    """A problem with the user's input or environment, explained in the message."""

    #: the CLI's exit status for this error (2: bad input; 130: interrupted by the user)
    exit_code: int = 2


class DataError(DDKitError):
    """Missing, incomplete or corrupt dataset files, or data that do not match a synthetic set."""


class ConfigError(DDKitError, ValueError):
    """An unknown configuration key, a value of the wrong type, or an impossible setting."""


class UnknownNameError(DDKitError, ValueError):
    """An unknown registry name (dataset, model, method); the message lists close matches."""


class ArtifactError(DDKitError):
    """A file that is not a valid ddkit artifact (synthetic set, checkpoint, expert store), or a failed write."""


class DivergenceError(DDKitError):
    """A NaN/Inf loss or synthetic tensor during distillation; the last good checkpoint is kept."""


class RunFolderError(DDKitError):
    """A run folder that may not be used as asked: it holds another run, another process uses it, or the
    checkpoint in it was made with other settings than the ones given for ``--resume``."""


class Interrupted(DDKitError):
    """The user stopped a command (Ctrl-C); the message says what was kept and how to continue."""

    exit_code = 130


class DDKitWarning(UserWarning):
    """Something ddkit did not do as the user may have expected (e.g. an option the dataset ignores).

    The CLI prints these as one ``ddkit <command>: warning: ...`` line."""
