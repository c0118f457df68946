"""A loopback test double of the Hugging Face Hub's HTTP API — not the Hub, and not a server
to run anywhere but in tests.

It implements only the endpoints that huggingface_hub 1.x's `HfApi` calls for glmrel's
publish and remote check (repo create/info, refs, commits, branch, tag, preupload, NDJSON
commit, LFS batch + basic upload + verify, tree, paths-info, file resolve with Range,
validate-yaml), with the Hub's observable rules made strict so a client bug fails here the
way it would fail on the Hub:

- writes need `Authorization: Bearer <token>` with the double's token (401 otherwise);
- a commit to a branch that does not exist is 404 RevisionNotFound (the Hub never creates
  branches implicitly), and so is a commit addressed to a tag or a commit id;
- a commit whose `parentCommit` is not the branch head is 412 (a concurrent publisher);
- a regular (non-LFS) file over 10 MiB, or a binary regular file, is rejected (400);
- an `lfsFile` whose object was never uploaded, or uploaded with another size, is rejected;
- an LFS upload whose bytes do not hash to the announced sha256 is rejected;
- creating a branch or tag that exists is 409; deleting a missing file is 404 EntryNotFound.

Xet is not implemented: clients must run with `HF_HUB_DISABLE_XET=1`.
Faults for resume tests: `state.fail_uploads_after = k` refuses every LFS upload after the
k-th with 403 (not retried by the client), as a connection lost mid-publish would leave it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

MAX_REGULAR = 10 * 1024 * 1024
LFS_PATTERNS = (
    r".*\.safetensors",
    r".*\.bin",
    r".*\.pt",
    r".*\.png",
    r".*\.jpg",
    r".*\.parquet",
    r".*\.zip",
    r".*\.gz",
    r"tokenizer\.json",
)
GITATTRIBUTES = (
    "".join(f"{p.replace(chr(92), '').replace('.*', '*')} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)
).encode()
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Entry:
    """One file in a commit's tree: regular (content) or LFS (oid + size)."""

    size: int
    content: bytes | None = None
    lfs_oid: str | None = None

    @property
    def blob_id(self) -> str:
        if self.lfs_oid is not None:
            return git_blob_sha(lfs_pointer(self.lfs_oid, self.size))
        return git_blob_sha(self.content or b"")

    def to_tree(self, path: str) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "oid": self.blob_id, "size": self.size, "path": path}
        if self.lfs_oid is not None:
            out["lfs"] = {
                "oid": self.lfs_oid,
                "size": self.size,
                "pointerSize": len(lfs_pointer(self.lfs_oid, self.size)),
            }
        return out


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    tree: dict[str, Entry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (commit, message)
    lfs: dict[str, int] = field(default_factory=dict)  # oid -> size (objects only; bytes kept below)
    lfs_data: dict[str, bytes] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev][0]
        return rev if rev in self.commits else None

    def read(self, entry: Entry) -> bytes:
        return self.lfs_data[entry.lfs_oid] if entry.lfs_oid is not None else (entry.content or b"")


@dataclass
class HubState:
    token: str
    repos: dict[str, Repo] = field(default_factory=dict)
    counter: int = 0
    lfs_uploads: list[str] = field(default_factory=list)  # every accepted LFS upload, by oid
    commits_made: int = 0
    fail_uploads_after: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def new_commit(self, repo: Repo, parent: str | None, title: str, message: str, tree: dict[str, Entry]) -> str:
        self.counter += 1
        oid = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{title}\0{self.counter}".encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, title, message, dict(tree))
        return oid


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Handler(BaseHTTPRequestHandler):
    server: HubDouble  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    # ------------------------------------------------------------ plumbing

    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        return self._raw

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        hdrs.setdefault("Content-Length", str(len(body)))
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def _require_write(self) -> None:
        if not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit:
        oid = repo.resolve(unquote(rev))
        if oid is None:
            raise HubError(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")
        return repo.commits[oid]

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        # Read the whole body first: a route that fails early must not leave it on the
        # keep-alive connection, where it would be parsed as the next request.
        n = int(self.headers.get("Content-Length") or 0)
        self._raw = self.rfile.read(n) if n else b""
        try:
            with self.state.lock:
                self._route(method, path, query)
        except HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json({"error": e.message}, e.status, headers)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # ------------------------------------------------------------ routes

    def _route(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        repo_re = r"(?P<repo>[^/]+/[^/]+)"
        routes = [
            ("POST", r"/api/repos/create", self.create_repo),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("GET", rf"/api/models/{repo_re}/refs", self.refs),
            ("GET", rf"/api/models/{repo_re}/commits/(?P<rev>[^/]+)", self.commits),
            ("POST", rf"/api/models/{repo_re}/branch/(?P<branch>[^/]+)", self.create_branch),
            ("POST", rf"/api/models/{repo_re}/tag/(?P<rev>[^/]+)", self.create_tag),
            ("POST", rf"/api/models/{repo_re}/preupload/(?P<rev>[^/]+)", self.preupload),
            ("POST", rf"/api/models/{repo_re}/commit/(?P<rev>[^/]+)", self.commit),
            ("GET", rf"/api/models/{repo_re}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self.tree),
            ("POST", rf"/api/models/{repo_re}/paths-info/(?P<rev>[^/]+)", self.paths_info),
            ("GET", rf"/api/models/{repo_re}/revision/(?P<rev>[^/]+)", self.info),
            ("GET", rf"/api/models/{repo_re}", self.info),
            ("POST", rf"/{repo_re}\.git/info/lfs/objects/batch", self.lfs_batch),
            ("PUT", rf"/lfs-upload/{repo_re}/(?P<oid>[0-9a-f]{{64}})", self.lfs_upload),
            ("POST", rf"/lfs-verify/{repo_re}", self.lfs_verify),
            ("GET", rf"/{repo_re}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
            ("HEAD", rf"/{repo_re}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
        ]
        for m, pattern, fn in routes:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                fn(query=query, method=method, **{k: v for k, v in match.groupdict().items()})
                return
        raise HubError(404, f"no such endpoint: {method} {path}")

    def create_repo(self, **_: Any) -> None:
        self._require_write()
        body = json.loads(self._body())
        if body.get("type", "model") != "model":
            raise HubError(400, "the double only hosts model repos")
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if not REPO_ID.fullmatch(repo_id):
            raise HubError(400, f"invalid repo id {repo_id!r}")
        if repo_id in self.state.repos:
            raise HubError(409, "You already created this model repo")
        repo = Repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
        init = self.state.new_commit(
            repo, None, "initial commit", "", {".gitattributes": Entry(len(GITATTRIBUTES), GITATTRIBUTES)}
        )
        repo.branches["main"] = init
        self.state.repos[repo_id] = repo
        self._json({"url": f"{self.server.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self, **_: Any) -> None:
        self._body()
        self._json({"errors": [], "warnings": []})

    def info(self, repo: str, rev: str = "main", **_: Any) -> None:
        r = self._repo(repo)
        c = self._commit(r, rev)
        self._json(
            {
                "id": repo,
                "modelId": repo,
                "sha": c.oid,
                "private": r.private,
                "siblings": [{"rfilename": p} for p in sorted(c.tree)],
                "tags": [],
                "downloads": 0,
                "likes": 0,
            }
        )

    def refs(self, repo: str, **_: Any) -> None:
        r = self._repo(repo)
        self._json(
            {
                "branches": [
                    {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in sorted(r.branches.items())
                ],
                "tags": [
                    {"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, (c, _m) in sorted(r.tags.items())
                ],
                "converts": [],
            }
        )

    def commits(self, repo: str, rev: str, **_: Any) -> None:
        r = self._repo(repo)
        c: Commit | None = self._commit(r, rev)
        out = []
        while c is not None:
            out.append(
                {
                    "id": c.oid,
                    "authors": [{"user": "glmrel-test"}],
                    "date": "2026-11-27T00:00:00.000Z",
                    "title": c.title,
                    "message": c.message,
                }
            )
            c = r.commits[c.parent] if c.parent else None
        self._json(out)

    def create_branch(self, repo: str, branch: str, **_: Any) -> None:
        self._require_write()
        r = self._repo(repo)
        body = json.loads(self._body() or b"{}")
        if branch in r.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._commit(r, body.get("startingPoint") or "main")
        r.branches[branch] = start.oid
        self._json({})

    def create_tag(self, repo: str, rev: str, **_: Any) -> None:
        self._require_write()
        r = self._repo(repo)
        body = json.loads(self._body())
        if body["tag"] in r.tags:
            raise HubError(409, f"Tag reference {body['tag']} already exists")
        r.tags[body["tag"]] = (self._commit(r, rev).oid, body.get("message", ""))
        self._json({})

    def preupload(self, repo: str, rev: str, **_: Any) -> None:
        self._require_write()
        r = self._repo(repo)
        head = self._commit(r, rev)
        files = []
        for f in json.loads(self._body())["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = (
                any(re.fullmatch(p, f["path"].rsplit("/", 1)[-1]) for p in LFS_PATTERNS)
                or f["size"] > MAX_REGULAR
                or b"\0" in sample
            )
            existing = head.tree.get(f["path"])
            oid = None if existing is None else (existing.lfs_oid or git_blob_sha(existing.content or b""))
            files.append(
                {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._json({"files": files, "commitOid": head.oid})

    def lfs_batch(self, repo: str, **_: Any) -> None:
        self._require_write()
        r = self._repo(repo)
        body = json.loads(self._body())
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubError(400, "the double only accepts basic LFS uploads")
        objects = []
        for o in body["objects"]:
            obj: dict[str, Any] = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if r.lfs.get(o["oid"]) != o["size"]:
                obj["actions"] = {
                    "upload": {"href": f"{self.server.url}/lfs-upload/{repo}/{o['oid']}", "header": {}},
                    "verify": {"href": f"{self.server.url}/lfs-verify/{repo}", "header": {}},
                }
            objects.append(obj)
        self._json({"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_upload(self, repo: str, oid: str, **_: Any) -> None:
        r = self._repo(repo) if repo in self.state.repos else None
        data = self._body()
        if r is None:
            raise HubError(404, "no such repo")
        if self.state.fail_uploads_after is not None and len(self.state.lfs_uploads) >= self.state.fail_uploads_after:
            raise HubError(403, "simulated interruption: upload refused")
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "uploaded bytes do not match the announced sha256")
        r.lfs[oid], r.lfs_data[oid] = len(data), data
        self.state.lfs_uploads.append(oid)
        self._send(200)

    def lfs_verify(self, repo: str, **_: Any) -> None:
        r = self._repo(repo)
        body = json.loads(self._body())
        if r.lfs.get(body["oid"]) != body["size"]:
            raise HubError(422, f"LFS object {body['oid']} was not uploaded with size {body['size']}")
        self._json({})

    def commit(self, repo: str, rev: str, **_: Any) -> None:
        self._require_write()
        r = self._repo(repo)
        branch = unquote(rev)
        if branch not in r.branches:
            raise HubError(404, f"Invalid rev id: {branch} (commits go to an existing branch)", "RevisionNotFound")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "commit payload must start with a header")
        header = lines[0]["value"]
        head = r.commits[r.branches[branch]]
        parent = header.get("parentCommit")
        if parent is not None and parent != head.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(head.tree)
        for item in lines[1:]:
            key, v = item["key"], item["value"]
            if key == "file":
                data = base64.b64decode(v["content"])
                if len(data) > MAX_REGULAR:
                    raise HubError(400, f"{v['path']}: files larger than 10 MiB must be stored with LFS")
                if b"\0" in data[:8000]:
                    raise HubError(400, f"{v['path']}: binary files must be stored with LFS")
                tree[v["path"]] = Entry(len(data), data)
            elif key == "lfsFile":
                if r.lfs.get(v["oid"]) != v["size"]:
                    raise HubError(
                        400, f"{v['path']}: LFS object {v['oid'][:12]} of {v['size']} bytes was never uploaded"
                    )
                tree[v["path"]] = Entry(v["size"], lfs_oid=v["oid"])
            elif key == "deletedFile":
                if v["path"] not in tree:
                    raise HubError(404, f"A file with this name doesn't exist: {v['path']}", "EntryNotFound")
                del tree[v["path"]]
            else:
                raise HubError(400, f"the double does not implement commit operation {key!r}")
        oid = self.state.new_commit(r, head.oid, header["summary"], header.get("description") or "", tree)
        r.branches[branch] = oid
        self.state.commits_made += 1
        self._json({"commitUrl": f"{self.server.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})

    def tree(self, repo: str, rev: str, sub: str | None = None, **_: Any) -> None:
        r = self._repo(repo)
        c = self._commit(r, rev)
        prefix = f"{sub.strip('/')}/" if sub else ""
        self._json([e.to_tree(p) for p, e in sorted(c.tree.items()) if p.startswith(prefix)])

    def paths_info(self, repo: str, rev: str, **_: Any) -> None:
        r = self._repo(repo)
        c = self._commit(r, rev)
        form = parse_qs(self._body().decode())
        self._json([c.tree[p].to_tree(p) for p in form.get("paths", []) if p in c.tree])

    def resolve(self, repo: str, rev: str, file: str, method: str, **_: Any) -> None:
        r = self._repo(repo)
        c = self._commit(r, rev)
        entry = c.tree.get(file)
        if entry is None:
            raise HubError(404, f"Entry not found: {file}", "EntryNotFound")
        data = r.read(entry)
        headers = {"X-Repo-Commit": c.oid, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if entry.lfs_oid is not None:
            headers.update(
                {"X-Linked-Etag": f'"{entry.lfs_oid}"', "X-Linked-Size": str(entry.size), "ETag": f'"{entry.lfs_oid}"'}
            )
        else:
            headers["ETag"] = f'"{entry.blob_id}"'
        status = 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            if not m:
                raise HubError(416, f"bad Range {rng}")
            start = int(m[1])
            end = min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        headers["Content-Length"] = str(len(data))
        self._send(status, data, headers, head=method == "HEAD")


class HubDouble(ThreadingHTTPServer):
    """`with HubDouble(token) as hub:` serves on 127.0.0.1 at `hub.url` until the block ends."""

    daemon_threads = True

    def __init__(self, token: str) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState(token)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> HubDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
        self.server_close()

    def files(self, repo_id: str, rev: str) -> dict[str, bytes]:
        """What a clone of `rev` would hold, for byte-for-byte comparisons in tests."""
        r = self.state.repos[repo_id]
        oid = r.resolve(rev)
        assert oid is not None, f"{rev} not in {repo_id}"
        return {p: r.read(e) for p, e in r.commits[oid].tree.items()}
