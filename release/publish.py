"""glmrel publish: a plan against the remote's refs, then its application (git or Hub).

Each quant branch holds exactly its folder's files (no landing page); `main` holds the
landing page; a repo-wide tag (`v1`) and one immutable tag per branch (`v1-W4A16_GS64`).
Both backends commit on top of the head the plan saw and fail if it moved (a concurrent
publisher), skip what the remote already has (a second run does nothing, an interrupted run
resumes), and never move a published tag.

- git (`GitRemote`, any URL or path): orphan branches built with git plumbing in a local
  cache repository, pushed with `--force-with-lease`; annotated tags.
- Hub (`HubRemote`, `hf://owner/name`): huggingface_hub's HfApi; branches start from the
  repo's initial commit; one `create_commit` per branch with `parent_commit`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import git

from .check import check_branch, check_remote
from .config import ReleaseConfig, check_release_refs, is_network_url
from .errors import ReleaseError, hub_error
from .manifest import (
    BLOCK,
    CACHE_DIR,
    MANIFEST_FILE,
    Manifest,
    open_regular,
    release_files,
    sha256_file,
    write_if_changed,
)
from .render import CARD_FILE, load_changelog

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
                hint=f"published tags never move: add a new changelog version (e.g. {_next_version(self.version)}) "
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


def _changes(local: dict[str, tuple[str, int]], remote: dict[str, tuple[str, int]]) -> list[FileChange]:
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


LFS_SUFFIXES = (".safetensors", ".png", ".bin")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
LFS_FILTERS = [
    "-c",
    "filter.lfs.smudge=git-lfs smudge -- %f",
    "-c",
    "filter.lfs.process=git-lfs filter-process",
    "-c",
    "filter.lfs.required=true",
]


def git_lfs_available() -> bool:
    """git-lfs on PATH, unless GLMREL_GIT_LFS=0 turns it off."""
    return os.environ.get("GLMREL_GIT_LFS", "1") != "0" and shutil.which("git-lfs") is not None


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


class GitRemote:
    """A git remote (URL or local path) seen through a local bare cache repository.

    With git-lfs installed, weights and images are LFS objects (a pointer blob in the tree,
    the bytes pushed with `git lfs push`) and each branch carries the `.gitattributes` that
    says so — the layout the Hub's own git endpoint expects. Without git-lfs they are plain
    blobs, and the read-back says which."""

    kind = "git"

    def __init__(self, url: str, cache: Path, lfs: bool | None = None) -> None:
        check_git_remote(url)
        self.url = url
        cache.mkdir(parents=True, exist_ok=True)
        self.repo = git.Repo.init(cache, bare=True) if not (cache / "HEAD").exists() else git.Repo(cache)
        # git runs no transport but these for this remote, whatever a URL or config asks for
        self.repo.git.update_environment(GIT_ALLOW_PROTOCOL=ALLOWED_PROTOCOLS)
        self.lfs = git_lfs_available() if lfs is None else lfs
        self.tree_lfs: dict[str, list[str]] = {}  # tree sha -> LFS oids it references

    @property
    def lfs_url(self) -> str:
        return self.url if is_network_url(self.url) else Path(self.url).resolve().as_uri()

    def exists(self) -> bool:
        if is_network_url(self.url):
            return True  # a network remote: assume it exists, pushes will say otherwise
        return Path(self.url).exists()

    def create(self) -> None:
        """Create the bare repository. Another publisher may create it at the same moment
        (`git init` then fails on "File exists"): a repository that exists afterwards is fine,
        the branch leases decide who publishes."""
        try:
            git.Repo.init(self.url, bare=True, initial_branch="main")
        except (git.GitCommandError, OSError) as e:
            if (Path(self.url) / "HEAD").is_file():
                return
            raise ReleaseError(
                f"cannot create the git repository {self.url}: {getattr(e, 'stderr', '') or e}".strip(),
                hint="check that the parent folder exists and is writable, or create the bare repo yourself",
            ) from e

    def refs(self) -> dict[str, str]:
        """ref name -> commit sha; annotated tags are peeled to the commit they name."""
        if not self.exists():
            return {}
        out: dict[str, str] = {}
        try:
            listing = str(self.repo.git.ls_remote(self.url))  # GitPython's union return: text here
        except git.GitCommandError as e:
            raise ReleaseError(
                f"cannot read the refs of {self.url}: {(e.stderr or '').strip() or e}",
                hint="check the remote's URL or path and your access to it",
            ) from e
        for line in listing.splitlines():
            sha, ref = line.split("\t")
            if ref.endswith("^{}"):
                out[ref[:-3]] = sha
            else:
                out.setdefault(ref, sha)
        return out

    def fetch(self, refs: dict[str, str]) -> None:
        if refs:
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

    def _blob(self, data: bytes) -> str:
        with tempfile.TemporaryFile("w+b") as f:
            f.write(data)
            f.seek(0)
            return self.repo.git.hash_object("-w", "--no-filters", "--stdin", istream=f)

    def _lfs_store(self, p: Path, oid: str) -> None:
        """Copy the file into the cache's LFS object store, and keep the copy only if its
        sha256 is `oid` (the checked content): what is pushed is what was checked, even if the
        file changes meanwhile. An object already there entered the same way, so it is not read
        again. Never a hard link: git-lfs links objects onward into a local remote, and a later
        in-place rewrite of the branch file would change published content."""
        obj = Path(self.repo.git_dir) / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
        if obj.is_file() and obj.stat().st_size == p.stat().st_size:
            return
        obj.parent.mkdir(parents=True, exist_ok=True)
        tmp = obj.with_name(obj.name + ".tmp")
        tmp.unlink(missing_ok=True)
        with open_regular(p) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, BLOCK)
        if sha256_file(tmp) != oid:
            tmp.unlink()
            raise _changed_since_check(p)
        tmp.replace(obj)

    def write_tree(self, files: list[Path], expected: dict[str, str]) -> tuple[str, dict[str, tuple[str, int]]]:
        """Blobs (or LFS pointers) for `files` and the tree holding them; path -> (blob, size).
        Every file's content must have the sha256 in `expected` (what was checked)."""
        entries = {}
        listing = []
        oids = []
        for p in files:
            size = p.stat().st_size
            if self.lfs and p.suffix in LFS_SUFFIXES:
                oid = expected[p.name]
                self._lfs_store(p, oid)
                sha = self._blob(lfs_pointer(oid, size))
                oids.append(oid)
            else:
                digest, blob = _digests(p)
                if digest != expected[p.name]:
                    raise _changed_since_check(p)
                sha = self.repo.git.hash_object("-w", "--no-filters", str(p))
                if sha != blob:  # the file changed between our read and git's
                    raise _changed_since_check(p)
            entries[p.name] = (sha, size)
            listing.append(f"100644 blob {sha}\t{p.name}")
        if self.lfs:
            data = GITATTRIBUTES.encode()
            sha = self._blob(data)
            entries[".gitattributes"] = (sha, len(data))
            listing.append(f"100644 blob {sha}\t.gitattributes")
        with tempfile.TemporaryFile("w+") as f:
            f.write("\n".join(sorted(listing, key=lambda x: x.split("\t")[1])) + "\n")
            f.seek(0)
            tree = self.repo.git.mktree(istream=f)
        self.tree_lfs[tree] = oids
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

    def publish_plan(self, plan: Plan, echo: Echo) -> dict[str, str]:
        """Every changed branch and every new tag of `plan` in ONE atomic push: the remote takes
        all of it or none of it (a hook refusing one ref, or a branch that moved, leaves every
        branch and tag as it was). LFS objects go first, so no branch points at missing
        content. Returns branch -> commit."""
        heads: dict[str, str] = {}
        refspecs, leases, expected = [], [], {}
        for b in plan.branches:
            if b.up_to_date:
                heads[b.name] = b.remote_commit  # type: ignore[assignment]
                continue
            self.push_lfs(b.tree)
            heads[b.name] = self.commit(b.tree, b.remote_commit, plan.message)
            refspecs.append(f"{heads[b.name]}:refs/heads/{b.name}")
            leases.append(f"--force-with-lease=refs/heads/{b.name}:{b.remote_commit or ''}")
            expected[b.name] = b.remote_commit
        for t in plan.tags:
            if t.action == "create":
                self.make_tag(t.name, heads[t.branch], f"{plan.message.splitlines()[0]} [{t.branch}]")
                refspecs.append(f"refs/tags/{t.name}:refs/tags/{t.name}")
        if refspecs:
            self.push_atomic(refspecs, leases, expected)
        for b in plan.branches:
            if not b.up_to_date:
                echo(f"pushed {b.name} -> {heads[b.name][:10]}")
        for t in plan.tags:
            if t.action == "create":
                echo(f"tagged {t.name} -> {heads[t.branch][:10]}")
        return heads

    def push_atomic(self, refspecs: list[str], leases: list[str], expected: dict[str, str | None]) -> None:
        """`git push --atomic`; a refusal is reported as what it is: a branch that moved since
        the plan (someone else published), or the remote's own message (a hook, a permission)."""
        try:
            self.repo.git.push("--atomic", "--porcelain", *leases, self.url, *refspecs)
        except git.GitCommandError as e:
            raise push_refusal(self.url, _git_output(e), expected) from e

    def make_tag(self, name: str, commit: str, message: str) -> None:
        env = {"GIT_COMMITTER_NAME": "glmrel", "GIT_COMMITTER_EMAIL": "glmrel@localhost"}
        with self.repo.git.custom_environment(**env):
            self.repo.git.tag("-f", "-a", name, commit, "-m", message)

    def diff(
        self, head: str | None, name: str, files: list[Path], expected: dict[str, str]
    ) -> tuple[list[FileChange], str]:
        """Changes from the remote branch head to `files`, and the tree to commit."""
        tree, local = self.write_tree(files, expected)
        if head and self.tree_sha(head) == tree:
            return [], tree
        return _changes(local, self.tree_of(head) if head else {}), tree

    def check_revision(self, name: str, head: str, group_size: int) -> RemoteCheck:
        """Clone the branch back from the remote (LFS content included) and run the full
        local `check` on the checkout."""
        with tempfile.TemporaryDirectory() as tmp:
            checkout = Path(tmp) / name
            filters = LFS_FILTERS if self.lfs else []
            cmd = [
                "git",
                *filters,
                "clone",
                "--quiet",
                "--branch",
                name,
                "--single-branch",
                self.lfs_url,
                str(checkout),
            ]
            try:
                git.Git().execute(cmd)
            except git.GitCommandError as e:
                return RemoteCheck(name, False, f"cannot clone {name} back: {e.stderr.strip() if e.stderr else e}")
            if git.Repo(checkout).head.commit.hexsha != head:
                return RemoteCheck(name, False, f"the clone of {name} is not at {head[:10]}")
            shutil.rmtree(checkout / ".git")
            (checkout / ".gitattributes").unlink(missing_ok=True)
            report = check_branch(checkout, group_size=group_size)
        how = "cloned back with its LFS objects and checked" if self.lfs else "cloned back and checked (plain blobs)"
        return RemoteCheck(name, report.passed, how if report.passed else report.failures[0].message)

    def push_lfs(self, tree: str) -> None:
        oids = self.tree_lfs.get(tree) or []
        if not oids:
            return
        try:
            self.repo.git.lfs("push", "--object-id", self.lfs_url, *oids)
        except git.GitCommandError as e:
            raise ReleaseError(
                f"git lfs push to {self.url} failed: {e.stderr.strip() if e.stderr else e}; no branch was moved",
                hint="check that the remote accepts LFS objects (or set GLMREL_GIT_LFS=0 to publish plain blobs)",
            ) from e


HUB_SCHEME = "hf://"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class HubRemote:
    """A Hugging Face Hub model repo through huggingface_hub's `HfApi`.

    Quant branches start from the repo's initial commit (only `.gitattributes`), never from
    `main`, so they carry no landing-page files. Each branch gets one commit per publish with
    `parent_commit` set to the head the plan saw: a concurrent publisher makes it fail (412)
    instead of interleaving. Unchanged files are left out of the commit, and LFS objects the
    Hub already holds are not uploaded again, so an interrupted publish resumes.
    `.gitattributes` is the repo's own LFS configuration and is never added or deleted.
    """

    kind = "hub"

    def __init__(self, repo_id: str, token: str, endpoint: str | None = None) -> None:
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        self.token = token
        self.api = HfApi(endpoint=endpoint, token=token)

    def _call(self, action: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One HfApi call; auth, permission, not-found, rate-limit and network failures become
        one ReleaseError with a hint (the token never printed)."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            mapped = hub_error(e, action, f"{self.repo_id} ({self.api.endpoint})", self.token)
            if mapped is None:
                raise
            raise mapped from e

    def exists(self) -> bool:
        return bool(self._call("looking the repo up", self.api.repo_exists, self.repo_id))

    def create(self) -> None:
        self._call("creating the repo", self.api.create_repo, self.repo_id, exist_ok=True)

    def refs(self) -> dict[str, str]:
        r = self._call("listing its branches and tags", self.api.list_repo_refs, self.repo_id)
        return {g.ref: g.target_commit for g in [*r.branches, *r.tags]}

    def fetch(self, refs: dict[str, str]) -> None:
        pass  # every read goes to the Hub

    def remote_files(self, head: str) -> dict[str, tuple[str, int]]:
        """path -> ("sha256:<lfs oid>" or git blob id, size), `.gitattributes` left out."""
        from huggingface_hub.hf_api import RepoFile

        out = {}
        listing = self._call(
            "listing files", lambda: list(self.api.list_repo_tree(self.repo_id, revision=head, recursive=True))
        )
        for f in listing:
            if isinstance(f, RepoFile) and f.path != ".gitattributes":
                out[f.path] = (f"sha256:{f.lfs.sha256}" if f.lfs else f.blob_id, f.size)
        return out

    def diff(
        self, head: str | None, name: str, files: list[Path], expected: dict[str, str]
    ) -> tuple[list[FileChange], str]:
        remote = self.remote_files(head) if head else {}
        local = {}
        for p in files:
            r = remote.get(p.name)
            if r is None:
                local[p.name] = ("", p.stat().st_size)  # new: no id needed
            elif r[0].startswith("sha256:"):
                local[p.name] = (f"sha256:{expected[p.name]}", p.stat().st_size)
            else:
                local[p.name] = (_digests(p)[1], p.stat().st_size)
        return _changes(local, remote), ""

    def initial_commit(self) -> str:
        commits = self._call("reading main's history", self.api.list_repo_commits, self.repo_id, revision="main")
        return commits[-1].commit_id

    def publish_branch(self, b: BranchPlan, message: str) -> str:
        from huggingface_hub.errors import HfHubHTTPError

        parent = b.remote_commit
        if parent is None:
            parent = self.initial_commit()
            if b.name != "main":
                try:
                    self.api.create_branch(self.repo_id, branch=b.name, revision=parent)
                except HfHubHTTPError as e:
                    if e.response is not None and e.response.status_code == 409:
                        raise _moved(b.name, None) from e
                    raise hub_error(e, f"creating branch {b.name}", self.repo_id, self.token) or e from e
        with contextlib.ExitStack() as opened:
            ops = self._operations(b, opened)
            return self._commit(b, ops, message, parent)

    def _operations(self, b: BranchPlan, opened: contextlib.ExitStack) -> list[Any]:
        """Commit operations reading through descriptors opened without following links:
        huggingface_hub hashes what it will upload, and that must be the checked content."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        ops: list[Any] = []
        for c in b.changes:
            if c.action == "delete":
                ops.append(CommitOperationDelete(c.path))
                continue
            p = Path(b.folder) / c.path
            f = open_regular(p)
            opened.callback(f.close)  # open until the commit is made
            op = CommitOperationAdd(c.path, f)
            if op.upload_info.sha256.hex() != b.expected_sha256[c.path]:
                raise _changed_since_check(p)
            ops.append(op)
        return ops

    def _commit(self, b: BranchPlan, ops: list[Any], message: str, parent: str) -> str:
        from huggingface_hub.errors import HfHubHTTPError

        title, _, body = message.partition("\n\n")
        try:
            info = self.api.create_commit(
                self.repo_id,
                ops,
                commit_message=title,
                commit_description=body.strip() or None,
                revision=b.name,
                parent_commit=parent,
            )
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status == 412:
                raise _moved(b.name, b.remote_commit) from e
            if status in (401, 403, 404, 429):
                raise hub_error(e, f"committing to {b.name}", self.repo_id, self.token) or e from e
            raise _interrupted(b.name, e) from e
        except (RuntimeError, OSError) as e:  # huggingface_hub wraps a failed LFS upload in RuntimeError
            raise _interrupted(b.name, e) from e
        return info.oid

    def push_tag(self, name: str, commit: str, message: str) -> None:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            self.api.create_tag(self.repo_id, tag=name, revision=commit, tag_message=message)
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in (401, 403, 429) or (status or 0) >= 500:
                raise hub_error(e, f"creating tag {name}", self.repo_id, self.token) or e from e
            raise ReleaseError(
                f"tag {name} could not be created on {self.repo_id} ({status}); it may exist at another commit",
                hint="published tags never move: run `glmrel publish --dry-run` to see the remote's state",
            ) from e

    def check_revision(self, name: str, head: str, group_size: int) -> RemoteCheck:
        report = check_remote(self.repo_id, head, group_size=group_size, api=self.api)
        return RemoteCheck(
            name,
            report.passed,
            "checked on the Hub (`check --remote`)" if report.passed else report.failures[0].message,
        )


ALLOWED_PROTOCOLS = "file:git:http:https:ssh"
GIT_URL_SCHEMES = frozenset({"file", "git", "http", "https", "ssh"})


def check_git_remote(url: str) -> None:
    """Refuse a git remote that git would read as something else: an option (`--receive-pack=`,
    `-oProxyCommand=`), a transport helper that runs a command (`ext::`), or a scheme git does
    not publish over. Checked before anything is created or run."""
    problem = None
    if not url.strip():
        problem = "is empty"
    elif url.startswith("-"):
        problem = "starts with '-', so git would read it as an option"
    elif "::" in url:
        problem = "names a git transport helper ('<helper>::'), which can run commands"
    elif "://" in url and url.split("://", 1)[0].lower() not in GIT_URL_SCHEMES:
        problem = (
            f"uses the scheme {url.split('://', 1)[0]!r}; git remotes here are {', '.join(sorted(GIT_URL_SCHEMES))}"
        )
    elif any(c in url for c in "\n\r\0"):
        problem = "holds a control character"
    if problem is not None:
        raise ReleaseError(
            f"remote {url!r} {problem}; nothing was published",
            hint="give a git URL (https://, ssh://, user@host:path), a local path, or hf://owner/name for the Hub",
        )


def _git_output(e: git.GitCommandError) -> str:
    """A failed git command's stdout and stderr as git wrote them (GitPython quotes them)."""
    out = []
    for stream in (e.stdout, e.stderr):
        text = str(stream or "").strip()
        text = re.sub(r"^(stdout|stderr): '", "", text).rstrip("'")
        out.append(text)
    return "\n".join(out)


def push_refusal(url: str, output: str, expected: dict[str, str | None]) -> ReleaseError:
    """The error for a refused atomic push, from git's porcelain status lines and the
    remote's `remote:` lines."""
    for line in output.splitlines():
        m = re.match(
            r"^!\t[^\t]*:refs/heads/([^\t]+)\t\[rejected\] \((stale info|fetch first|non-fast-forward)\)", line
        )
        if m:
            return _moved(m[1], expected.get(m[1]))
    said = [line[len("remote:") :].strip() for line in output.splitlines() if line.startswith("remote:")]
    said = [x for x in said if x]
    reasons = sorted(set(re.findall(r"\[remote rejected\] \(([^)]*)\)", output)) - {"atomic push failed"})
    why = "; ".join(reasons) or (output.strip().splitlines() or ["no reason given"])[-1]
    return ReleaseError(
        f"the remote {url} refused the push ({why})"
        + (f"; it said: {' / '.join(said)}" if said else "")
        + "; the push is atomic, so no branch or tag moved",
        hint="fix what the remote's message names (a hook, a protected branch, your permissions), then publish again",
    )


def _moved(branch: str, expected: str | None) -> ReleaseError:
    return ReleaseError(
        f"the remote's branch {branch} moved since the plan (expected {expected or 'no branch'}); nothing was overwritten",
        hint="someone else published meanwhile: run `glmrel publish --dry-run` again to see the new plan",
    )


def _interrupted(branch: str, e: Exception) -> ReleaseError:
    return ReleaseError(
        f"publishing {branch} stopped before its commit ({type(e).__name__}: {e}); the branch is unchanged",
        hint="run the same `glmrel publish` again: it resumes, and files the Hub already has are not uploaded again",
    )


def _digests(p: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, in one read."""
    size = p.stat().st_size
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with open_regular(p) as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            sha256.update(block)
            sha1.update(block)
    return sha256.hexdigest(), sha1.hexdigest()


def _changed_since_check(p: Path) -> ReleaseError:
    return ReleaseError(
        f"{p} changed after it was checked; nothing from it was published",
        hint="run `glmrel check` on the branch and publish again once nothing else writes to the release",
    )


def hub_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ReleaseError(
            "no Hugging Face token: publishing to the Hub needs a token with write access",
            hint="set HF_TOKEN, or run `hf auth login` once on this machine",
        )
    return token


def open_remote(url: str, cache: Path) -> Remote:  # noqa: F821 (Remote is defined below)
    """`hf://owner/name` is a Hub model repo; anything else is a git URL or path."""
    if not url.startswith(HUB_SCHEME):
        return GitRemote(url, cache)
    return HubRemote(hub_repo_id(url), hub_token(), endpoint=os.environ.get("HF_ENDPOINT") or None)


def hub_repo_id(text: str) -> str:
    """`owner/name` from `hf://owner/name` (or `owner/name`), refused unless it is a valid Hub
    repo id: checked before any request, so a path or a typo never reaches huggingface_hub."""
    repo_id = text.removeprefix(HUB_SCHEME).strip("/")
    if not REPO_ID.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise ReleaseError(
            f"{repo_id!r} is not a Hub repo id of the form owner/name",
            hint="name the repo as owner/name (hf://owner/name for publish), e.g. my-org/GLM-4.7-W4A16",
        )
    return repo_id


def check_remote_name(url: str) -> None:
    """The remote is a valid Hub repo id or git remote (before any branch is hashed)."""
    if url.startswith(HUB_SCHEME):
        hub_repo_id(url)
    else:
        check_git_remote(url)


Remote = GitRemote | HubRemote


def _branch_sources(cfg: ReleaseConfig) -> list[tuple[str, Path]]:
    out = [(b.name, cfg.output_dir / b.name) for b in cfg.branches]
    out.append(("main", cfg.output_dir / "main"))
    return out


def _publish_files(name: str, folder: Path) -> list[Path]:
    files = release_files(folder, what="landing page" if name == "main" else "branch")
    if name != "main" and (folder / MANIFEST_FILE).is_file():
        files.append(folder / MANIFEST_FILE)
    return sorted(files, key=lambda p: p.name)


def check_landing(folder: Path) -> list[Path]:
    """What `main/` may hold: README.md and the pictures it shows, regular files under 10 MiB.
    Returns its files; raises ReleaseError naming the first thing that may not be there."""
    if not folder.is_dir() or folder.is_symlink():
        raise ReleaseError(f"the landing page folder {folder} is missing", hint="run `glmrel render` first")
    files = release_files(folder, what="landing page")
    if CARD_FILE not in {p.name for p in files}:
        raise ReleaseError("the landing page main/README.md is missing", hint="run `glmrel render` first")
    for p in files:
        if p.suffix.lower() not in LANDING_SUFFIXES:
            raise ReleaseError(
                f"{p} may not be published on main: a landing page holds its README.md and images "
                f"({', '.join(sorted(LANDING_SUFFIXES))})",
                hint=f"remove {p.name} from {folder}; model files belong in a quant branch",
            )
        if p.stat().st_size > LANDING_MAX_BYTES:
            raise ReleaseError(f"{p} is larger than 10 MiB; a landing page holds a card and small images")
    return files


def _expected_hashes(name: str, folder: Path, files: list[Path]) -> dict[str, str]:
    """sha256 of the content publish may send: a quant branch's files as its (checked)
    manifest lists them, plus the manifest itself; main's files as they are now (checked by
    `check_landing`)."""
    if name == "main":
        return {p.name: sha256_file(p) for p in files}
    manifest = Manifest.load(folder / MANIFEST_FILE)
    out = {n: e.sha256 for n, e in manifest.files.items()}
    out[MANIFEST_FILE] = sha256_file(folder / MANIFEST_FILE)
    if set(out) != {p.name for p in files}:
        raise ReleaseError(
            f"the files of {folder} changed after it was checked", hint="run `glmrel check` and publish again"
        )
    return out


def plan_publish(
    cfg: ReleaseConfig, version: str, remote: str | None = None, cache: Path | None = None, rehash: bool = True
) -> tuple[Plan, Remote]:
    """Compare the local release with the remote. Refuses a branch that fails `check`
    (unverified, failed, or verified on other content included) and a landing page with
    anything but its card and images. A tag that would have to move is planned as a
    conflict: the caller shows the plan, then `Plan.refuse_conflicts`. `rehash` False: files
    the release's hash cache vouches for (unchanged since hashed) are not read again."""
    url = remote if remote is not None else cfg.publish_remote or f"{HUB_SCHEME}{cfg.hub_repo}"
    version, entries = load_changelog(cfg.changelog, version)
    check_release_refs(version, [b.name for b in cfg.branches])
    check_remote_name(url)
    entry = entries[-1]
    message = f"{cfg.name} {version}: {entry['summary']}\n\n" + "".join(f"- {c}\n" for c in entry.get("changes", []))
    for b in cfg.branches:
        folder = cfg.output_dir / b.name
        if not folder.is_dir():
            raise ReleaseError(f"branch folder {folder} does not exist", hint="run `glmrel build-all` first")
        report = check_branch(folder, group_size=b.group_size, rehash=rehash)
        if not report.passed:
            raise ReleaseError(
                f"branch {b.name} fails check: {report.failures[0].message}",
                hint=f"run `glmrel check {folder}`; publish only ships branches that pass",
            )
        if not (folder / CARD_FILE).is_file():
            raise ReleaseError(f"branch {b.name} has no {CARD_FILE}", hint="run `glmrel render` first")
    check_landing(cfg.output_dir / "main")

    backend = open_remote(url, cache or cfg.output_dir / ".publish-cache.git")
    exists = backend.exists()
    refs = backend.refs() if exists else {}
    backend.fetch(refs)
    branches = []
    for name, folder in _branch_sources(cfg):
        head = refs.get(f"refs/heads/{name}")
        files = _publish_files(name, folder)
        expected = _expected_hashes(name, folder, files)
        changes, tree = backend.diff(head, name, files, expected)
        branches.append(BranchPlan(name, str(folder), head, tree, changes, expected))
    tags = []
    for name, branch in [(version, "main")] + [(f"{version}-{b.name}", b.name) for b in cfg.branches]:
        existing = refs.get(f"refs/tags/{name}")
        head = refs.get(f"refs/heads/{branch}")
        bplan = next(b for b in branches if b.name == branch)
        if existing is None:
            tags.append(TagPlan(name, branch, "create"))
        elif existing == head and bplan.up_to_date:
            tags.append(TagPlan(name, branch, "exists", existing))
        else:
            tags.append(TagPlan(name, branch, "conflict", existing))
    return Plan(url, backend.kind, version, message, not exists, branches, tags), backend


def _next_version(v: str) -> str:
    m = re.match(r"^(.*?)(\d+)$", v)
    return f"{m[1]}{int(m[2]) + 1}" if m else f"{v}.1"


def apply_plan(plan: Plan, backend: Remote, echo: Echo = print) -> dict[str, str]:
    """Create the repo, commit and push each changed branch, then the tags. Returns branch -> commit."""
    plan.refuse_conflicts()
    if plan.create_repo:
        backend.create()
        echo(f"created repository {plan.remote}")
    if isinstance(backend, GitRemote):  # one atomic push: all of it or none of it
        return backend.publish_plan(plan, echo)
    heads: dict[str, str] = {}
    for b in plan.branches:
        if b.up_to_date:
            heads[b.name] = b.remote_commit  # type: ignore[assignment]
            continue
        commit = backend.publish_branch(b, plan.message)
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


READ_BACK_FILE = "read-back.json"  # under <output_dir>/.glmrel-cache: the heads already read back per remote


def _read_back_record(cfg: ReleaseConfig) -> Path:
    return cfg.output_dir / CACHE_DIR / READ_BACK_FILE


def _read_back_heads(cfg: ReleaseConfig, url: str) -> dict[str, str]:
    """Branch -> the commit a full read-back of `url` passed at (empty if unknown or unreadable)."""
    try:
        heads = json.loads(_read_back_record(cfg).read_text()).get(url, {})
    except (OSError, ValueError, AttributeError):
        return {}
    return (
        {k: v for k, v in heads.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(heads, dict) else {}
    )


def _remember_read_back(cfg: ReleaseConfig, url: str, heads: dict[str, str]) -> None:
    path = _read_back_record(cfg)
    try:
        record = json.loads(path.read_text())
        record = record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        record = {}
    record[url] = heads
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_if_changed(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass  # a record that cannot be written costs a read-back next time, not correctness


def verify_published(
    cfg: ReleaseConfig, backend: Remote, version: str, url: str | None = None, reread: bool = True
) -> list[RemoteCheck]:
    """Read every published branch back from the remote and check it against its folder:
    the same files, and for quant branches a full `check` of what the remote holds; then
    every tag must point at its branch's head. `url` names the remote for the record of
    heads that passed (`<output_dir>/.glmrel-cache/read-back.json`); unless `reread`, a
    quant branch whose head is one that already passed a full check there is not read back
    again (a commit pins its content: nothing published since changed it)."""
    results = []
    refs = backend.refs()
    backend.fetch(refs)
    passed = _read_back_heads(cfg, url) if url is not None and not reread else {}
    now: dict[str, str] = {}
    for name, folder in _branch_sources(cfg):
        head = refs.get(f"refs/heads/{name}")
        if head is None:
            results.append(RemoteCheck(name, False, "branch missing on the remote"))
            continue
        files = _publish_files(name, folder)
        changes, _tree = backend.diff(head, name, files, _expected_hashes(name, folder, files))
        if changes:
            results.append(
                RemoteCheck(name, False, f"remote files differ from {folder}: {[c.path for c in changes][:5]}")
            )
        elif name == "main":
            results.append(RemoteCheck(name, True, f"files identical to {folder}"))
        elif passed.get(name) == head:
            results.append(
                RemoteCheck(name, True, f"files identical to {folder}; {head[:10]} passed its full read-back before")
            )
            now[name] = head
        else:
            result = backend.check_revision(name, head, cfg.branch(name).group_size)
            results.append(result)
            if result.passed:
                now[name] = head
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
    if url is not None:
        _remember_read_back(cfg, url, now)
    return results
