"""The few named exceptions of hpc-mto.

A ``UserError`` is something the user can fix (a config, a path, a file): the CLI prints its message
as one line and exits non-zero, without a traceback. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Base of every error caused by input the user controls."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or override is malformed or violates a rule."""


class DataError(UserError):
    """A dataset is missing, unreadable, or not usable as training data."""


class RunDirError(UserError):
    """A run directory is missing, not a run, locked by another process, or would be overwritten."""


class CheckpointError(UserError):
    """No usable checkpoint, or a checkpoint that does not match the run."""


class LaunchError(UserError):
    """The cluster or the local MPI launcher cannot run the request."""


class PeerMissing(Exception):
    """A peer task published nothing within the timeout where no fallback exists (file backend)."""

    exit_code = 4
