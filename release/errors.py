"""The one exception type glmrel raises for problems a user can fix."""

from __future__ import annotations


class ReleaseError(Exception):
    """A problem with the user's input or environment, with an optional hint naming the fix.

    The CLI prints ``Error: <message>`` and ``Hint: <hint>`` and exits non-zero; library
    callers can catch this one type.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"
