"""The attributes the engine replaces for one run, each put back when the run ends."""

from __future__ import annotations

from typing import Any

_ABSENT = object()


class Patches:
    """Attributes replaced with `set`, restored in reverse order by `undo` (the run's `finally`,
    so also after a failure). `undo` puts back the very object that was there, and removes what
    only shadowed an inherited attribute: a test checks identity with the library's own
    functions after a run."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        own = vars(owner).get(name, _ABSENT)  # the owner's own attribute, not one it inherits
        self._saved.append((owner, name, own))
        setattr(owner, name, value)

    def undo(self) -> None:
        while self._saved:
            owner, name, old = self._saved.pop()
            if old is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
