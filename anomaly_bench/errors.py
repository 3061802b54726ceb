"""User-facing errors.

Every problem a user can fix (a bad path, a wrong layout, a missing weights file, an
invalid config value) is raised as an :class:`AnomalyBenchError`. The CLI prints its
message as one paragraph and exits non-zero without a traceback.
"""

from __future__ import annotations


class AnomalyBenchError(Exception):
    """Base class of errors caused by the user's input, not by a bug."""

    exit_code = 2


class ConfigError(AnomalyBenchError):
    """A config key holds a value that cannot be used."""


class DataError(AnomalyBenchError):
    """A dataset folder, image or mask is missing, malformed or inconsistent."""


class WeightsError(AnomalyBenchError):
    """Backbone weights cannot be fetched or loaded."""


class CheckpointError(AnomalyBenchError):
    """A model checkpoint is missing or does not match the config."""


class OutputError(AnomalyBenchError):
    """What the run computed cannot be written (disk full, file-size limit, read-only,
    a file where a folder goes, a symbolic link); the message carries what was computed."""


def some(items: list[str], limit: int) -> str:
    """The first ``limit`` of ``items`` joined by '; ', and how many more there are: the
    list inside a one-paragraph message stays readable however long it is."""
    more = len(items) - limit
    return "; ".join(items[:limit]) + (f"; and {more} more" if more > 0 else "")
