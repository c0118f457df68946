"""Where a branch's files are read from, for the one check flow (branch.py): a local folder
(`LocalBranch`) or a published Hub revision (`HubRevision`, read without downloading weights).
Each says which files the branch has, reads a small JSON file, gives the files' sizes and
digests for the manifest's comparison, and reads a shard's safetensors header."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from huggingface_hub.utils import SafetensorsFileMetadata

from ..errors import ReleaseError
from ..layout import read_shard, validate_layout
from ..manifest import MANIFEST_FILE, HashCache, Manifest, folder_entries, sha256_file
from .report import CheckReport

ShardReader = Callable[[], tuple[SafetensorsFileMetadata | None, list[str]]]
Digest = Callable[[str], str | None]


class BranchSource(Protocol):
    label: str  # how messages name the branch (its folder's name, or the revision)
    no_manifest: str  # what a missing manifest.json is told

    def files(self, report: CheckReport) -> set[str]:
        """The names of the branch's files; an entry a branch must not hold fails `report`."""
        ...

    def json(self, name: str) -> Any:
        """A small file's JSON (OSError or ValueError when it cannot be read)."""
        ...

    def where(self, name: str) -> str:
        """How messages name one of its files."""
        ...

    def manifest(self) -> Manifest:
        """Its manifest.json (ReleaseError when it is unreadable or malformed)."""
        ...

    def sizes_and_digests(self, manifest: Manifest, names: set[str]) -> tuple[dict[str, int], Digest, str]:
        """The sizes of `names`, their sha256 where it is to be compared, and how they were read."""
        ...

    def header(self, shard: str) -> ShardReader: ...


class LocalBranch:
    """A branch folder on disk: regular files only (a link, sub-folder or other entry fails).
    `no_hash`: sizes only; `rehash` False: a file the hash cache vouches for (unchanged size,
    mtime, inode and ctime since it was hashed) is not read again."""

    no_manifest = "no manifest.json in the branch (build-all writes it; or run `glmrel manifest PATH`)"

    def __init__(self, folder: Path, *, no_hash: bool = False, rehash: bool = True) -> None:
        self.folder, self.label, self.no_hash, self.rehash = folder, folder.name, no_hash, rehash

    def files(self, report: CheckReport) -> set[str]:
        files, others = folder_entries(self.folder)
        for p, kind in others:
            report.rejected.add(p.name)
            if kind == "link":
                report.fail(
                    "files", f"{p.name} is a symbolic link (to {os.readlink(p)}); a branch holds regular files only"
                )
            elif kind == "folder":
                report.fail("files", f"{p.name}/ is a sub-folder; a branch holds a flat set of files (move it out)")
            else:
                report.fail("files", f"{p.name} is not a regular file")
        return {p.name for p in files}

    def json(self, name: str) -> Any:
        return json.loads((self.folder / name).read_text())

    def where(self, name: str) -> str:
        return str(self.folder / name)

    def manifest(self) -> Manifest:
        return Manifest.load(self.folder / MANIFEST_FILE)

    def sizes_and_digests(self, manifest: Manifest, names: set[str]) -> tuple[dict[str, int], Digest, str]:
        folder = self.folder
        sizes = {n: (folder / n).stat().st_size for n in sorted(names)}
        if self.no_hash:
            return sizes, lambda n: None, "sizes"
        if self.rehash:
            return sizes, lambda n: sha256_file(folder / n), "sizes and sha256"
        # a file whose size, mtime, inode and ctime are those it had when hashed is not read
        # again (git's index does the same; ctime cannot be set back); the rest are hashed now
        listed = [folder / n for n in sizes if n in manifest.files and sizes[n] == manifest.files[n].size]
        known, read = HashCache(folder).hashes_and_read(listed)
        vouched = len(listed) - len(read)
        how = "sizes and sha256" + (f"; {vouched} unchanged since hashed, not read again" if vouched else "")
        return sizes, lambda n: known[n][1] if n in known else None, how

    def header(self, shard: str) -> ShardReader:
        return lambda: read_shard(self.folder / shard)


class HubRevision:
    """A published revision: the file list, sizes and LFS sha256 from `list_repo_tree`; small
    (non-LFS) files downloaded into a temporary cache (`with` it) and hashed; shard headers read
    with `parse_safetensors_file_metadata` (HTTP Range requests). Shards are taken from the index
    rather than `get_safetensors_metadata`, which reads only `model.safetensors` when that file
    exists, and compressed-tensors writes the MTP layer to a second shard beside it."""

    no_manifest = "no manifest.json in the revision"

    def __init__(self, api: Any, repo_id: str, revision: str) -> None:
        self.api, self.repo_id, self.revision, self.label = api, repo_id, revision, revision
        self.tree: dict[str, Any] = {}
        self.cache: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> HubRevision:
        import httpx
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

        repo_id, revision, api = self.repo_id, self.revision, self.api
        try:
            self.tree = {
                f.path: f
                for f in api.list_repo_tree(repo_id, revision=revision, recursive=True)
                if getattr(f, "size", None) is not None and f.path != ".gitattributes"
            }
        except RepositoryNotFoundError as e:
            raise ReleaseError(
                f"repository {repo_id} was not found (or the token cannot read it)",
                hint="check the repo id, and HF_TOKEN for a private repo",
            ) from e
        except RevisionNotFoundError as e:
            raise ReleaseError(
                f"{repo_id} has no revision {revision}",
                hint=f"list its branches and tags with `hf repo-refs {repo_id}` or publish first",
            ) from e
        except (HfHubHTTPError, httpx.HTTPError) as e:
            raise ReleaseError(
                f"cannot list {repo_id}@{revision} on {api.endpoint}: {type(e).__name__}: {e}",
                hint="check the network and HF_ENDPOINT",
            ) from e
        self.cache = tempfile.TemporaryDirectory(prefix="glmrel-remote-")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cache is not None:
            self.cache.cleanup()

    def fetch(self, name: str) -> Path:
        assert self.cache is not None, "use the revision in a `with` block"
        # the cache's snapshot entry is a link into its blob store (inside the temporary folder)
        path = self.api.hf_hub_download(self.repo_id, name, revision=self.revision, cache_dir=self.cache.name)
        return Path(path).resolve()

    def files(self, report: CheckReport) -> set[str]:
        names = {p for p in self.tree if "/" not in p}
        for nested in sorted(set(self.tree) - names):
            report.rejected.add(nested)
            report.fail("files", f"{nested} is in a subfolder; a branch holds a flat set of files")
        return names

    def json(self, name: str) -> Any:
        import httpx
        from huggingface_hub.errors import HfHubHTTPError

        try:
            return json.loads(self.fetch(name).read_text())
        except (HfHubHTTPError, httpx.HTTPError) as e:
            raise OSError(f"cannot download {name}: {e}") from e

    def where(self, name: str) -> str:
        return f"{self.revision}:{name}"

    def manifest(self) -> Manifest:
        try:
            return Manifest.from_json(self.json(MANIFEST_FILE), f"{self.revision}:{MANIFEST_FILE}")
        except (OSError, ValueError) as e:
            raise ReleaseError(str(e)) from e

    def sizes_and_digests(self, manifest: Manifest, names: set[str]) -> tuple[dict[str, int], Digest, str]:
        published = {n: self.tree[n] for n in sorted(names)}

        def digest(name: str) -> str:
            f = published[name]
            return f.lfs.sha256 if f.lfs is not None else sha256_file(self.fetch(name))

        return {n: f.size for n, f in published.items()}, digest, "sizes; LFS and file sha256"

    def header(self, shard: str) -> ShardReader:
        def read() -> tuple[SafetensorsFileMetadata | None, list[str]]:
            try:
                meta = self.api.parse_safetensors_file_metadata(self.repo_id, shard, revision=self.revision)
            except Exception as e:  # huggingface_hub raises SafetensorsParsingError and HTTP errors
                return None, [f"{shard}: header cannot be read ({type(e).__name__}: {e})"]
            # The header's own length is not returned, so size - 8 bounds the data region from
            # above; the LFS sha256 matched against the manifest pins the exact bytes.
            return meta, validate_layout(shard, meta, self.tree[shard].size - 8)

        return read
