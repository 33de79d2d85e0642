"""User-facing errors.

A :class:`UserError` is a problem with what the user gave us (a file, a flag, a prompt). The CLI prints its
message as one paragraph and exits non-zero without a traceback; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message names the file/field and says what was expected."""

    exit_code = 2


class ArtifactError(UserError):
    """An artifact on disk is missing, truncated, of the wrong schema version, or fails its sha256 check."""
