"""What publish will do (`Plan`: per branch the files to send and the head it builds on, per
tag where it points), what a read-back found (`RemoteCheck`), and the errors both backends
raise for a moved head, an interrupted upload or a file changed after its check."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ReleaseError
from ..manifest import (
    BLOCK,
    open_regular,
)

# What a landing page (`main/`) may hold: its card and the pictures it shows. Weights,
# configs or anything else on main would be served as the repo's default revision.
LANDING_SUFFIXES = frozenset({".md", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"})
LANDING_MAX_BYTES = 10 << 20  # the Hub's limit for a non-LFS file; cards and plots are far below

Echo = Callable[[str], None]


@dataclass
class FileChange:
    path: str
    action: str  # add | change | delete
    bytes: int


@dataclass
class BranchPlan:
    name: str
    folder: str
    remote_commit: str | None
    tree: str
    changes: list[FileChange] = field(default_factory=list)
    # path -> sha256 of the content that was checked (the manifest's, which `check` matched
    # against the files); publishing anything else is refused
    expected_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def up_to_date(self) -> bool:
        return self.remote_commit is not None and not self.changes


@dataclass
class TagPlan:
    name: str
    branch: str
    action: str  # create | exists | conflict (a published tag that would have to move)
    at: str | None = None


@dataclass
class Plan:
    remote: str
    backend: str  # git | hub
    version: str
    message: str
    create_repo: bool
    branches: list[BranchPlan]
    tags: list[TagPlan]

    @property
    def empty(self) -> bool:
        return (
            not self.create_repo
            and all(b.up_to_date for b in self.branches)
            and all(t.action == "exists" for t in self.tags)
        )

    @property
    def conflicts(self) -> list[TagPlan]:
        return [t for t in self.tags if t.action == "conflict"]

    def refuse_conflicts(self) -> None:
        """Published tags never move: a plan that would move one is shown, then refused."""
        if self.conflicts:
            t = self.conflicts[0]
            raise ReleaseError(
                f"tag {t.name} already exists on the remote at {(t.at or '?')[:10]}, not at {t.branch}'s new content",
                hint=f"published tags never move: add a new changelog version (e.g. {next_version(self.version)}) "
                "and publish that",
            )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for b in data["branches"]:
            b.pop("expected_sha256")
        return {**data, "empty": self.empty}

    def to_text(self) -> str:
        lines = [f"publish {self.version} -> {self.remote} ({self.backend})"]
        if self.create_repo:
            lines.append("  create repository")
        for b in self.branches:
            if b.up_to_date:
                lines.append(f"  {b.name}: up to date")
                continue
            new = "create orphan branch" if self.backend == "git" else "create branch from the initial commit"
            head = new if b.remote_commit is None else f"update from {b.remote_commit[:10]}"
            counts = {a: [c for c in b.changes if c.action == a] for a in ("add", "change", "delete")}
            parts = [f"{len(v)} to {a} ({sum(c.bytes for c in v):,} bytes)" for a, v in counts.items() if v]
            lines.append(f"  {b.name}: {head}; " + ", ".join(parts))
            for c in b.changes:
                lines.append(f"      {c.action:6} {c.path} ({c.bytes:,} bytes)")
        for t in self.tags:
            what = {"create": "create", "exists": "exists, same commit"}.get(
                t.action, f"REFUSED: exists at {(t.at or '?')[:10]} and published tags never move"
            )
            lines.append(f"  tag {t.name} -> {t.branch}: {what}")
        if self.empty:
            lines.append("  nothing to do")
        return "\n".join(lines)


def file_changes(local: dict[str, tuple[str, int]], remote: dict[str, tuple[str, int]]) -> list[FileChange]:
    """add / change / delete per path, from (content id, size) pairs on each side. The ids
    (git blob ids, LFS sha256) name the content, size included; the sizes only label the
    change (the local file's, or the deleted remote file's)."""
    changes = []
    for path, (oid, size) in sorted(local.items()):
        if path not in remote:
            changes.append(FileChange(path, "add", size))
        elif remote[path][0] != oid:
            changes.append(FileChange(path, "change", size))
    for path, (_oid, size) in sorted(remote.items()):
        if path not in local:
            changes.append(FileChange(path, "delete", size))
    return changes


@dataclass(frozen=True)
class RemoteCheck:
    ref: str
    passed: bool
    detail: str


def moved_error(branch: str, expected: str | None) -> ReleaseError:
    return ReleaseError(
        f"the remote's branch {branch} moved since the plan (expected {expected or 'no branch'}); nothing was overwritten",
        hint="someone else published meanwhile: run `glmrel publish --dry-run` again to see the new plan",
    )


def interrupted_error(branch: str, e: Exception) -> ReleaseError:
    return ReleaseError(
        f"publishing {branch} stopped before its commit ({type(e).__name__}: {e}); the branch is unchanged",
        hint="run the same `glmrel publish` again: it resumes, and files the Hub already has are not uploaded again",
    )


def file_digests(p: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, in one read."""
    size = p.stat().st_size
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with open_regular(p) as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            sha256.update(block)
            sha1.update(block)
    return sha256.hexdigest(), sha1.hexdigest()


def changed_since_check(p: Path) -> ReleaseError:
    return ReleaseError(
        f"{p} changed after it was checked; nothing from it was published",
        hint="run `glmrel check` on the branch and publish again once nothing else writes to the release",
    )


def next_version(v: str) -> str:
    m = re.match(r"^(.*?)(\d+)$", v)
    return f"{m[1]}{int(m[2]) + 1}" if m else f"{v}.1"
