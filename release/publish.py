"""glmrel publish: a plan against the remote's refs, then its application — git backend.

Each quant branch is an orphan branch holding exactly its folder's files; `main` holds the
landing page; a repo-wide annotated tag (`v1`) and one immutable tag per branch
(`v1-W4A16_GS64`). Commits are built with git plumbing (hash-object, mktree, commit-tree) in
a local cache repository, and pushed with `--force-with-lease` naming the commit the plan saw,
so a concurrent publisher makes the push fail instead of interleaving. A tree that equals the
remote's is not committed again, so a second run does nothing and an interrupted run resumes.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import git

from .check import check_branch
from .config import ReleaseConfig
from .errors import ReleaseError
from .manifest import MANIFEST_FILE, branch_files
from .render import CARD_FILE, load_changelog

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

    @property
    def up_to_date(self) -> bool:
        return self.remote_commit is not None and not self.changes


@dataclass
class TagPlan:
    name: str
    branch: str
    action: str  # create | exists


@dataclass
class Plan:
    remote: str
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

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "empty": self.empty}

    def to_text(self) -> str:
        lines = [f"publish {self.version} -> {self.remote} (git)"]
        if self.create_repo:
            lines.append("  create repository")
        for b in self.branches:
            if b.up_to_date:
                lines.append(f"  {b.name}: up to date")
                continue
            head = "create orphan branch" if b.remote_commit is None else f"update from {b.remote_commit[:10]}"
            counts = {a: [c for c in b.changes if c.action == a] for a in ("add", "change", "delete")}
            parts = [f"{len(v)} to {a} ({sum(c.bytes for c in v):,} bytes)" for a, v in counts.items() if v]
            lines.append(f"  {b.name}: {head}; " + ", ".join(parts))
            for c in b.changes:
                lines.append(f"      {c.action:6} {c.path} ({c.bytes:,} bytes)")
        for t in self.tags:
            lines.append(f"  tag {t.name} -> {t.branch}: {'create' if t.action == 'create' else 'exists, same commit'}")
        if self.empty:
            lines.append("  nothing to do")
        return "\n".join(lines)


class GitRemote:
    """A git remote (URL or local path) seen through a local bare cache repository."""

    def __init__(self, url: str, cache: Path) -> None:
        self.url = url
        cache.mkdir(parents=True, exist_ok=True)
        self.repo = git.Repo.init(cache, bare=True) if not (cache / "HEAD").exists() else git.Repo(cache)

    def exists(self) -> bool:
        if re.match(r"^[a-z+]+://|^[^/]+@", self.url):
            return True  # a network remote: assume it exists, pushes will say otherwise
        return Path(self.url).exists()

    def create(self) -> None:
        git.Repo.init(self.url, bare=True, initial_branch="main")

    def refs(self) -> dict[str, str]:
        """ref name -> commit sha; annotated tags are peeled to the commit they name."""
        if not self.exists():
            return {}
        out: dict[str, str] = {}
        for line in self.repo.git.ls_remote(self.url).splitlines():
            sha, ref = line.split("\t")
            if ref.endswith("^{}"):
                out[ref[:-3]] = sha
            else:
                out.setdefault(ref, sha)
        return out

    def fetch(self) -> None:
        if self.exists() and self.refs():
            self.repo.git.fetch(self.url, "+refs/heads/*:refs/remote-heads/*", "--no-tags", "--quiet")

    def tree_of(self, commit: str) -> dict[str, tuple[str, int]]:
        out = {}
        for line in self.repo.git.ls_tree("-r", "-l", commit).splitlines():
            meta, path = line.split("\t", 1)
            _mode, _type, sha, size = meta.split()
            out[path] = (sha, int(size))
        return out

    def tree_sha(self, commit: str) -> str:
        return self.repo.git.rev_parse(f"{commit}^{{tree}}")

    def write_tree(self, files: list[Path]) -> tuple[str, dict[str, tuple[str, int]]]:
        entries = {}
        listing = []
        for p in files:
            sha = self.repo.git.hash_object("-w", "--no-filters", str(p))
            entries[p.name] = (sha, p.stat().st_size)
            listing.append(f"100644 blob {sha}\t{p.name}")
        with tempfile.TemporaryFile("w+") as f:
            f.write("\n".join(listing) + "\n")
            f.seek(0)
            tree = self.repo.git.mktree(istream=f)
        return tree, entries

    def commit(self, tree: str, parent: str | None, message: str) -> str:
        args = [tree, "-m", message] + (["-p", parent] if parent else [])
        env = {
            "GIT_AUTHOR_NAME": "glmrel",
            "GIT_AUTHOR_EMAIL": "glmrel@localhost",
            "GIT_COMMITTER_NAME": "glmrel",
            "GIT_COMMITTER_EMAIL": "glmrel@localhost",
        }
        with self.repo.git.custom_environment(**env):
            return self.repo.git.commit_tree(*args)

    def push_branch(self, branch: str, commit: str, expected: str | None) -> None:
        try:
            self.repo.git.push(
                self.url,
                f"{commit}:refs/heads/{branch}",
                f"--force-with-lease=refs/heads/{branch}:{expected or ''}",
                "--quiet",
            )
        except git.GitCommandError as e:
            raise ReleaseError(
                f"the remote's branch {branch} moved since the plan (expected {expected or 'no branch'}); nothing was overwritten",
                hint="someone else published meanwhile: run `glmrel publish --dry-run` again to see the new plan",
            ) from e

    def push_tag(self, name: str, commit: str, message: str) -> None:
        env = {"GIT_COMMITTER_NAME": "glmrel", "GIT_COMMITTER_EMAIL": "glmrel@localhost"}
        with self.repo.git.custom_environment(**env):
            self.repo.git.tag("-f", "-a", name, commit, "-m", message)
        try:
            self.repo.git.push(self.url, f"refs/tags/{name}:refs/tags/{name}", "--quiet")
        except git.GitCommandError as e:
            raise ReleaseError(f"tag {name} could not be pushed (it exists on the remote at another commit?)") from e


def _branch_sources(cfg: ReleaseConfig) -> list[tuple[str, Path]]:
    out = [(b.name, cfg.output_dir / b.name) for b in cfg.branches]
    out.append(("main", cfg.output_dir / "main"))
    return out


def _publish_files(name: str, folder: Path) -> list[Path]:
    files = branch_files(folder)
    if name != "main" and (folder / MANIFEST_FILE).is_file():
        files.append(folder / MANIFEST_FILE)
    return sorted(files, key=lambda p: p.name)


def plan_publish(
    cfg: ReleaseConfig, version: str, remote: str | None = None, cache: Path | None = None
) -> tuple[Plan, GitRemote]:
    """Compare the local release with the remote; refuse anything that fails `check`."""
    url = remote or cfg.publish_remote
    if not url:
        raise ReleaseError("no publish remote", hint="set publish_remote: in the config or pass --remote")
    version, entries = load_changelog(cfg.changelog, version)
    entry = entries[-1]
    message = f"{cfg.name} {version}: {entry['summary']}\n\n" + "".join(f"- {c}\n" for c in entry.get("changes", []))
    for b in cfg.branches:
        folder = cfg.output_dir / b.name
        if not folder.is_dir():
            raise ReleaseError(f"branch folder {folder} does not exist", hint="run `glmrel build-all` first")
        report = check_branch(folder, group_size=b.group_size)
        if not report.passed:
            raise ReleaseError(
                f"branch {b.name} fails check: {report.failures[0].message}",
                hint=f"run `glmrel check {folder}`; publish only ships branches that pass",
            )
        if not (folder / CARD_FILE).is_file():
            raise ReleaseError(f"branch {b.name} has no {CARD_FILE}", hint="run `glmrel render` first")
    if not (cfg.output_dir / "main" / CARD_FILE).is_file():
        raise ReleaseError("the landing page main/README.md is missing", hint="run `glmrel render` first")

    backend = GitRemote(url, cache or cfg.output_dir / ".publish-cache.git")
    exists = backend.exists()
    refs = backend.refs() if exists else {}
    backend.fetch()
    branches = []
    for name, folder in _branch_sources(cfg):
        files = _publish_files(name, folder)
        tree, local = backend.write_tree(files)
        head = refs.get(f"refs/heads/{name}")
        remote_files = backend.tree_of(head) if head else {}
        changes = []
        if not head or backend.tree_sha(head) != tree:
            for path, (sha, size) in sorted(local.items()):
                if path not in remote_files:
                    changes.append(FileChange(path, "add", size))
                elif remote_files[path][0] != sha:
                    changes.append(FileChange(path, "change", size))
            for path, (_sha, size) in sorted(remote_files.items()):
                if path not in local:
                    changes.append(FileChange(path, "delete", size))
        branches.append(BranchPlan(name, str(folder), head, tree, changes))
    tags = []
    for name, branch in [(version, "main")] + [(f"{version}-{b.name}", b.name) for b in cfg.branches]:
        existing = refs.get(f"refs/tags/{name}")
        head = refs.get(f"refs/heads/{branch}")
        bplan = next(b for b in branches if b.name == branch)
        if existing is None:
            tags.append(TagPlan(name, branch, "create"))
        elif existing == head and bplan.up_to_date:
            tags.append(TagPlan(name, branch, "exists"))
        else:
            raise ReleaseError(
                f"tag {name} already exists on the remote at {existing[:10]}, not at {branch}'s new content",
                hint=f"published tags never move: add a new changelog version (e.g. {_next_version(version)}) and publish that",
            )
    return Plan(url, version, message, not exists, branches, tags), backend


def _next_version(v: str) -> str:
    m = re.match(r"^(.*?)(\d+)$", v)
    return f"{m[1]}{int(m[2]) + 1}" if m else f"{v}.1"


def apply_plan(plan: Plan, backend: GitRemote, echo: Echo = print) -> dict[str, str]:
    """Create the repo, commit and push each changed branch, then the tags. Returns branch -> commit."""
    if plan.create_repo:
        backend.create()
        echo(f"created repository {plan.remote}")
    heads: dict[str, str] = {}
    for b in plan.branches:
        if b.up_to_date:
            heads[b.name] = b.remote_commit  # type: ignore[assignment]
            continue
        commit = backend.commit(b.tree, b.remote_commit, plan.message)
        backend.push_branch(b.name, commit, b.remote_commit)
        heads[b.name] = commit
        echo(f"pushed {b.name} -> {commit[:10]}")
    for t in plan.tags:
        if t.action == "create":
            backend.push_tag(t.name, heads[t.branch], f"{plan.message.splitlines()[0]} [{t.branch}]")
            echo(f"tagged {t.name} -> {heads[t.branch][:10]}")
    return heads


@dataclass(frozen=True)
class RemoteCheck:
    ref: str
    passed: bool
    detail: str


def verify_published(cfg: ReleaseConfig, backend: GitRemote, version: str) -> list[RemoteCheck]:
    """Read every published branch back from the remote and check it against its folder:
    byte-identical files (git blob ids) and, for quant branches, a full `check` of the checkout."""
    results = []
    refs = backend.refs()
    backend.fetch()
    for name, folder in _branch_sources(cfg):
        head = refs.get(f"refs/heads/{name}")
        if head is None:
            results.append(RemoteCheck(name, False, "branch missing on the remote"))
            continue
        remote_files = backend.tree_of(head)
        _tree, local = backend.write_tree(_publish_files(name, folder))
        if remote_files != local:
            diff = sorted(set(remote_files.items()) ^ set(local.items()))
            results.append(RemoteCheck(name, False, f"remote files differ from {folder}: {[d[0] for d in diff][:5]}"))
            continue
        if name == "main":
            results.append(RemoteCheck(name, True, f"{len(local)} file(s) identical to {folder}"))
            continue
        with tempfile.TemporaryDirectory() as tmp:
            checkout = Path(tmp) / name
            checkout.mkdir()
            for path in remote_files:
                (checkout / path).write_bytes(
                    backend.repo.git.cat_file(
                        "blob", f"{head}:{path}", stdout_as_string=False, strip_newline_in_stdout=False
                    )
                )
            report = check_branch(checkout, group_size=cfg.branch(name).group_size)
            shutil.rmtree(checkout)
        results.append(
            RemoteCheck(name, report.passed, "read back and checked" if report.passed else report.failures[0].message)
        )
    for tag, branch in [(version, "main")] + [(f"{version}-{b.name}", b.name) for b in cfg.branches]:
        at, head = refs.get(f"refs/tags/{tag}"), refs.get(f"refs/heads/{branch}")
        ok = at is not None and at == head
        results.append(
            RemoteCheck(
                f"tag {tag}",
                ok,
                f"-> {branch} {head[:10] if head else '?'}" if ok else f"points at {at}, {branch} is at {head}",
            )
        )
    return results
