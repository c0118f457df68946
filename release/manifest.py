"""Branch manifests: every file with its size and sha256, plus the branch's quantization metadata.

Hashing streams each file once in fixed-size blocks (constant memory), hashes files in
parallel (hashlib releases the GIL on large updates), and reuses a previous manifest's hash
for any file whose size and mtime are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import ReleaseError

MANIFEST_FILE = "manifest.json"
MANIFEST_SCHEMA = 1
BLOCK = 8 << 20


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str
    mtime_ns: int


@dataclass(frozen=True)
class Manifest:
    schema: int
    branch: str
    files: dict[str, FileEntry]
    quantization: dict[str, Any]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "branch": self.branch,
            "total_bytes": self.total_bytes,
            "quantization": self.quantization,
            "files": {name: asdict(e) for name, e in sorted(self.files.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "manifest") -> Manifest:
        if data.get("schema") != MANIFEST_SCHEMA:
            raise ReleaseError(
                f"{source} has schema {data.get('schema')!r}; this glmrel reads schema {MANIFEST_SCHEMA}",
                hint="rebuild the manifest with `glmrel manifest`",
            )
        try:
            files = {
                n: FileEntry(int(e["size"]), str(e["sha256"]), int(e.get("mtime_ns", 0)))
                for n, e in data["files"].items()
            }
            return cls(MANIFEST_SCHEMA, str(data["branch"]), files, dict(data.get("quantization") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise ReleaseError(f"{source} is malformed: {e!r}") from e

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            return cls.from_json(json.loads(path.read_text()), str(path))
        except (OSError, json.JSONDecodeError) as e:
            raise ReleaseError(f"cannot read manifest {path}: {e}") from e

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")
        tmp.replace(path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def hash_files(paths: list[Path], workers: int | None = None) -> dict[Path, str]:
    workers = workers or min(32, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return dict(zip(paths, pool.map(sha256_file, paths)))


def branch_files(folder: Path) -> list[Path]:
    """The files a branch publishes: every regular file except the manifest and hidden files."""
    return sorted(
        p for p in folder.iterdir() if p.name != MANIFEST_FILE and not p.name.startswith(".") and not p.is_dir()
    )


def quantization_summary(folder: Path) -> dict[str, Any]:
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return {}
    w = (qc.get("config_groups") or {}).get("group_0", {}).get("weights") or {}
    return {
        "quant_method": qc.get("quant_method"),
        "format": qc.get("format"),
        "num_bits": w.get("num_bits"),
        "type": w.get("type"),
        "symmetric": w.get("symmetric"),
        "strategy": w.get("strategy"),
        "group_size": w.get("group_size"),
        "ignore": qc.get("ignore"),
    }


def build_manifest(folder: Path, branch: str | None = None, previous: Manifest | None = None) -> Manifest:
    """Describe `folder`; hash only files that are new or whose size or mtime changed."""
    if previous is None and (folder / MANIFEST_FILE).is_file():
        try:
            previous = Manifest.load(folder / MANIFEST_FILE)
        except ReleaseError:
            previous = None
    entries: dict[str, FileEntry] = {}
    to_hash: list[Path] = []
    stats = {}
    for p in branch_files(folder):
        if p.is_symlink():
            raise ReleaseError(f"{p} is a symbolic link", hint="a branch folder must hold regular files only")
        st = p.stat()
        stats[p] = st
        old = previous.files.get(p.name) if previous else None
        if old and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
            entries[p.name] = old
        else:
            to_hash.append(p)
    for p, digest in hash_files(to_hash).items():
        entries[p.name] = FileEntry(stats[p].st_size, digest, stats[p].st_mtime_ns)
    return Manifest(MANIFEST_SCHEMA, branch or folder.name, entries, quantization_summary(folder))


def write_manifest(folder: Path, branch: str | None = None) -> Manifest:
    m = build_manifest(folder, branch)
    m.write(folder / MANIFEST_FILE)
    return m
