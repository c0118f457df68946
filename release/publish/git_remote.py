"""The git backend (`GitRemote`, any URL or path): orphan branches built with git plumbing in a
local cache repository, weights as LFS objects where git-lfs is installed, pushed atomically
with `--force-with-lease`; annotated tags; and the checks of a git remote's URL."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import git

from ..check import check_branch
from ..config import is_network_url
from ..errors import ReleaseError
from ..manifest import (
    BLOCK,
    open_regular,
    sha256_file,
)
from .plan import Echo, FileChange, Plan, RemoteCheck, changed_since_check, file_changes, file_digests, moved_error

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
            raise changed_since_check(p)
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
                digest, blob = file_digests(p)
                if digest != expected[p.name]:
                    raise changed_since_check(p)
                sha = self.repo.git.hash_object("-w", "--no-filters", str(p))
                if sha != blob:  # the file changed between our read and git's
                    raise changed_since_check(p)
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
        return file_changes(local, self.tree_of(head) if head else {}), tree

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
            return moved_error(m[1], expected.get(m[1]))
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
