"""The Hub backend (`HubRemote`, `hf://owner/name`): huggingface_hub's HfApi; branches start from
the repo's initial commit; one `create_commit` per branch with `parent_commit`; the token and
the repo id checked before any request."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..check import check_remote
from ..errors import ReleaseError, hub_error
from ..manifest import (
    open_regular,
)
from .plan import (
    BranchPlan,
    FileChange,
    RemoteCheck,
    changed_since_check,
    file_changes,
    file_digests,
    interrupted_error,
    moved_error,
)

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
                local[p.name] = (file_digests(p)[1], p.stat().st_size)
        return file_changes(local, remote), ""

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
                        raise moved_error(b.name, None) from e
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
                raise changed_since_check(p)
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
                raise moved_error(b.name, b.remote_commit) from e
            if status in (401, 403, 404, 429):
                raise hub_error(e, f"committing to {b.name}", self.repo_id, self.token) or e from e
            raise interrupted_error(b.name, e) from e
        except (RuntimeError, OSError) as e:  # huggingface_hub wraps a failed LFS upload in RuntimeError
            raise interrupted_error(b.name, e) from e
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


def hub_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ReleaseError(
            "no Hugging Face token: publishing to the Hub needs a token with write access",
            hint="set HF_TOKEN, or run `hf auth login` once on this machine",
        )
    return token


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
