"""User-facing errors.

Every failure caused by the user's input (a bad file, an unknown name, a wrong shape) is raised as a
:class:`ManifoldLabError` whose message is ONE line saying what is wrong and what to do. The CLI
prints that line and exits non-zero without a traceback; library users get a normal exception.
"""

from __future__ import annotations


class ManifoldLabError(Exception):
    """An error the user can fix; ``str(err)`` is a single actionable line."""


class MissingWeightsError(ManifoldLabError):
    """A pretrained weights file is not on this machine (nothing is ever downloaded at run time)."""


class DataError(ManifoldLabError):
    """A dataset is empty, unreadable or inconsistent."""


class CheckpointError(ManifoldLabError):
    """A checkpoint is missing, corrupt or does not match the model it is loaded into."""


class ConfigError(ManifoldLabError):
    """A config file or override names a key that does not exist or has a wrong type."""
