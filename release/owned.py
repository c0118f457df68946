"""Folders glmrel creates, and the only folders it ever deletes.

Every working folder glmrel makes (a branch being built, the offloaded base weights, a
calibration pass's stores, a benchmark's work folder) is created by `create_owned`, which
writes a marker file into it. `remove_owned` deletes a folder only when that marker is there
(or, for a sealed branch, when its provenance.json says glmrel built it): a folder the user
named that already holds their own files is never emptied, whatever a config points at.
A user-named location gets a glmrel-owned sub-folder, never the location itself.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from .errors import ReleaseError

MARKER = ".glmrel-owned"
PROVENANCE_FILE = "provenance.json"


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False


def has_marker(path: Path) -> bool:
    """`path` is a real folder (not a link) holding glmrel's marker file."""
    try:
        return _is_real_dir(path) and stat.S_ISREG((path / MARKER).lstat().st_mode)
    except OSError:
        return False


def sealed_by_glmrel(path: Path) -> bool:
    """`path` is a real folder whose provenance.json says glmrel built it (a branch sealed by
    a glmrel from before the marker existed)."""
    prov = path / PROVENANCE_FILE
    try:
        if not _is_real_dir(path) or not stat.S_ISREG(prov.lstat().st_mode):
            return False
        record = json.loads(prov.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("tool"), dict) and record["tool"].get("name") == "glmrel"


def made_by_glmrel(path: Path) -> bool:
    """glmrel made `path`: its marker is there, or it is a branch glmrel sealed."""
    return has_marker(path) or sealed_by_glmrel(path)


def create_owned(path: Path, purpose: str) -> Path:
    """Create `path` as a glmrel working folder. One glmrel made earlier (its marker) is
    emptied first; anything else already there is refused, untouched."""
    if path.is_symlink() or path.exists():
        if not has_marker(path):
            raise ReleaseError(
                f"{path} already exists and glmrel did not create it; glmrel would need it for {purpose}",
                hint=f"move {path} away (glmrel never deletes what it did not create), or point the config elsewhere",
            )
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True)
        (path / MARKER).write_text(json.dumps({"purpose": purpose}) + "\n")
    except OSError as e:
        raise ReleaseError(
            f"cannot create {path} for {purpose}: {e.strerror or e}",
            hint="check that the folder above it exists, is a folder, and is writable",
        ) from e
    return path


def remove_owned(path: Path, warn: Callable[[str], None] | None = None) -> bool:
    """Delete `path` if glmrel made it (`made_by_glmrel`); a missing path is fine. Anything else is
    left as it is, with a warning through `warn`. Returns whether something was deleted."""
    if not (path.is_symlink() or path.exists()):
        return False
    if not made_by_glmrel(path):
        if warn is not None:
            warn(f"warning: left {path} in place: glmrel did not create it")
        return False
    shutil.rmtree(path)
    return True


def require_replaceable(path: Path, what: str) -> None:
    """Refuse, before any work, to replace an existing `path` that glmrel did not make."""
    if (path.is_symlink() or path.exists()) and not made_by_glmrel(path):
        kind = "a link" if path.is_symlink() else "a folder" if _is_real_dir(path) else "a file"
        raise ReleaseError(
            f"{path} is {kind} glmrel did not create; building {what} would replace it",
            hint=f"move {path} away, or set output_dir to a folder for glmrel's branches only",
        )


def require_plain_file_or_nothing(path: Path, what: str) -> None:
    """Refuse, before any work, to write over `path` when it is a link or a folder: a file
    written there would replace the link (or fail on the folder) instead of being written
    where the user looks; a plain file (an earlier export) is replaced."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        kind = "a link" if path.is_symlink() else "a folder" if _is_real_dir(path) else "not a plain file"
        raise ReleaseError(
            f"{path} is {kind}; {what} writes a plain file there and glmrel does not replace what it did not make",
            hint=f"move {path} away, or set {what} to another folder",
        )


def require_writable_folder(path: Path, what: str) -> None:
    """`path` is (or can be made) a folder this process can write in: checked before any work,
    so a build does not calibrate for minutes and then fail on where it writes."""
    if path.is_symlink() and not path.exists():
        raise ReleaseError(f"{what} {path} is a link to nothing", hint=f"point {what} at a folder")
    if path.exists() and not path.is_dir():
        raise ReleaseError(
            f"{what} {path} is a file, not a folder", hint=f"set {what} to a folder (it is created if missing)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".glmrel-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ReleaseError(
            f"{what} {path} cannot be written: {e.strerror or e}",
            hint=f"set {what} to a folder you can write in (it is created if missing)",
        ) from e
