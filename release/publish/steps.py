"""publish's steps: the remote opened from its URL, the plan against its refs (every branch
checked first), its application, and the read-back of what was published."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..check import check_branch
from ..config import ReleaseConfig, check_release_refs
from ..errors import ReleaseError
from ..manifest import (
    CACHE_DIR,
    MANIFEST_FILE,
    Manifest,
    release_files,
    sha256_file,
    write_if_changed,
)
from ..render import CARD_FILE, load_changelog
from .git_remote import GitRemote, check_git_remote
from .hub_remote import HUB_SCHEME, HubRemote, hub_repo_id, hub_token
from .plan import LANDING_MAX_BYTES, LANDING_SUFFIXES, BranchPlan, Echo, Plan, RemoteCheck, TagPlan

Remote = GitRemote | HubRemote


def open_remote(url: str, cache: Path) -> Remote:
    """`hf://owner/name` is a Hub model repo; anything else is a git URL or path."""
    if not url.startswith(HUB_SCHEME):
        return GitRemote(url, cache)
    return HubRemote(hub_repo_id(url), hub_token(), endpoint=os.environ.get("HF_ENDPOINT") or None)


def check_remote_name(url: str) -> None:
    """The remote is a valid Hub repo id or git remote (before any branch is hashed)."""
    if url.startswith(HUB_SCHEME):
        hub_repo_id(url)
    else:
        check_git_remote(url)


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
