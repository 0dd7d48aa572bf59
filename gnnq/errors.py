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


def load_failure(err: Exception) -> str:
    """Why ``torch.load`` failed, in a few words: the exception's type and first sentence.
    PyTorch's later sentences advise ``weights_only=False``, which is not the user's to change.
    """
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0].split('. ')[0]}"
