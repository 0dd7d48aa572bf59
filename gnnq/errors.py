"""User-facing errors.

Anything the user can fix (a bad name, a bad value, missing or corrupt data, an unreachable
tracking server) raises :class:`GnnqError`. The CLI prints its message as one paragraph and
exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations

from collections.abc import Iterable


class GnnqError(Exception):
    """An error caused by input the user can correct; ``str(err)`` is the whole message."""


def choice_error(what: str, value: object, choices: Iterable[str]) -> GnnqError:
    """The standard 'unknown X' error, naming the bad value and every valid choice."""
    valid = ", ".join(sorted(str(c) for c in choices))
    return GnnqError(f"Unknown {what} {value!r}. Valid choices: {valid}.")
