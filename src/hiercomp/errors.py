"""User-facing errors: one line that says what went wrong and what to do."""

from __future__ import annotations


class HiercompError(Exception):
    """An error caused by the user's input. The CLI prints its message as one line and exits 2."""
