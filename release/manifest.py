"""Branch manifests: every file with its size and sha256, plus the branch's quantization metadata.

A manifest is published content, so it holds only what describes the content (path, size,
sha256): writing it twice over unchanged files gives the same bytes. Re-hashing large shards
is avoided by a hash cache that lives beside the release, never in it
(`<output_dir>/.glmrel-cache/hashes/<branch>.json`, keyed by size, mtime, inode and ctime, and
kept only for files changed before they were hashed: `HashCache.hashes_and_read`).

`release_files` is the one way to list what a branch (or `main/`) publishes: it refuses
symbolic links, sub-folders and anything that is not a regular file, so nothing outside the
release folder is ever read or published.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from .errors import ReleaseError, not_utf8

SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # a sha256 as hexdigest() writes it

MANIFEST_FILE = "manifest.json"
VERIFY_FILE = "verify.json"
# `glmrel eval`'s record (release/evaluation/records.py): written after verification, bound to the content
EVAL_FILE = "eval.json"
MANIFEST_SCHEMA = 2
BLOCK = 8 << 20
CACHE_DIR = ".glmrel-cache"
# how long a hash waits for the filesystem's clock to pass the ctime of the files it reads
# (a tick: 1-10 ms on Linux); where it does not, those files' hashes are not kept
CLOCK_WAIT_S = 0.05
# Files written after a branch is verified (the record of the verification itself, the card,
# its plot, the manifest): everything else is the content `verify` measured.
WRITTEN_AFTER_VERIFY = frozenset(
    {VERIFY_FILE, EVAL_FILE, "README.md", "expert_coverage.png", "layer_divergence.png", MANIFEST_FILE}
)


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    schema: int
    branch: str
    files: dict[str, FileEntry]
    quantization: dict[str, Any]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def content_digest(self) -> str:
        return content_digest({n: e.sha256 for n, e in self.files.items()})

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
        if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else None
            raise ReleaseError(
                f"{source} has schema {found!r}; this glmrel reads schema {MANIFEST_SCHEMA}",
                hint="rebuild the manifest with `glmrel manifest PATH`",
            )
        try:
            files = {}
            for n, e in data["files"].items():
                if set(e) != {"size", "sha256"}:
                    raise ValueError(f"entry {n!r} has fields {sorted(e)}, expected size and sha256")
                files[str(n)] = FileEntry(int(e["size"]), str(e["sha256"]))
            return cls(MANIFEST_SCHEMA, str(data["branch"]), files, dict(data.get("quantization") or {}))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ReleaseError(f"{source} is malformed: {e}", hint="rebuild it with `glmrel manifest PATH`") from e

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """The manifest at `path`. Anything but a regular file of UTF-8 JSON is refused by name,
        before it is read (a FIFO would block the read for ever)."""
        rebuild = "rebuild it with `glmrel manifest BRANCH_FOLDER`"
        try:
            mode = path.stat().st_mode
        except FileNotFoundError as e:
            raise ReleaseError(
                f"manifest {path} does not exist", hint="write it with `glmrel manifest BRANCH_FOLDER`"
            ) from e
        except OSError as e:
            raise ReleaseError(f"cannot read manifest {path}: {e.strerror or e}", hint="check its permissions") from e
        if stat.S_ISDIR(mode):
            raise ReleaseError(
                f"manifest {path} is a folder, not a manifest file",
                hint="pass the manifest's JSON file (e.g. manifests/W4A16_GS64.json); `glmrel check` takes a branch folder",
            )
        if not stat.S_ISREG(mode):
            raise ReleaseError(f"manifest {path} is not a regular file", hint=rebuild)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ReleaseError(
                not_utf8(f"manifest {path}", e),
                hint=rebuild,
            ) from e
        except json.JSONDecodeError as e:
            raise ReleaseError(
                f"manifest {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})", hint=rebuild
            ) from e
        except OSError as e:
            raise ReleaseError(f"cannot read manifest {path}: {e.strerror or e}", hint="check its permissions") from e
        return cls.from_json(data, str(path))

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n"

    def write(self, path: Path) -> None:
        write_if_changed(path, self.dumps())


def write_if_changed(path: Path, text: str | bytes) -> bool:
    """Write atomically, and only when the bytes differ: unchanged records keep their mtime,
    so nothing downstream (hash cache, publish) sees a change that is not one."""
    data = text.encode() if isinstance(text, str) else text
    try:
        if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover (or a planted link) is never written through
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # nothing half-written is left beside the record
        raise
    return True


def content_digest(hashes: dict[str, str]) -> str:
    """One sha256 over the files `verify` measured (name and sha256 of each), so a
    verification record can name exactly the content it is about."""
    h = hashlib.sha256()
    for name in sorted(hashes):
        if name not in WRITTEN_AFTER_VERIFY:
            h.update(f"{name}\0{hashes[name]}\n".encode())
    return h.hexdigest()


def open_regular(path: Path, buffering: int = -1) -> io.BufferedReader | io.FileIO:
    """Open a file for reading without following a symbolic link: nothing outside a release
    folder is read, even if a file is swapped for a link after it was listed."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise ReleaseError(
            f"cannot open {path} as a regular file ({e.strerror}); nothing was read from it",
            hint="a release folder holds regular files only: replace links with the files themselves",
        ) from e
    # buffered, a BufferedReader; with buffering=0, the raw FileIO: both read into a buffer
    return cast("io.BufferedReader | io.FileIO", os.fdopen(fd, "rb", buffering=buffering))


def sha256_file(path: Path) -> str:
    """sha256 of a regular file, opened without following a symbolic link."""
    h = hashlib.sha256()
    with open_regular(path, buffering=0) as f:
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def hash_files(paths: list[Path], workers: int | None = None) -> dict[Path, str]:
    workers = workers or min(32, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return dict(zip(paths, pool.map(sha256_file, paths)))


def folder_entries(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """A release folder's entries, hidden ones left out, sorted: (regular files, [(entry,
    kind)] for everything else, kind being "link", "folder" or "other")."""
    files, others = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        mode = p.lstat().st_mode
        if stat.S_ISREG(mode):
            files.append(p)
        else:
            others.append((p, "link" if stat.S_ISLNK(mode) else "folder" if stat.S_ISDIR(mode) else "other"))
    return files, others


def release_files(folder: Path, *, what: str = "branch") -> list[Path]:
    """The files a branch (or `main/`) publishes, sorted: every regular file but the manifest
    and hidden entries (temporary files, caches). A symbolic link, a sub-folder or any other
    kind of entry is refused: publish never reads outside the folder, and a branch is the
    flat set of files transformers and vLLM load."""
    files, others = folder_entries(folder)
    for p, kind in others:
        if kind == "link":
            raise ReleaseError(
                f"{p} is a symbolic link (to {os.readlink(p)}); a {what} folder holds regular files only",
                hint=f"replace the link with the file itself, or remove it: nothing outside {folder} is published",
            )
        if kind == "folder":
            raise ReleaseError(
                f"{p} is a sub-folder; a {what} folder holds a flat set of files",
                hint=f"move {p.name}/ out of {folder} (transformers and vLLM load a flat folder)",
            )
        raise ReleaseError(f"{p} is not a regular file", hint=f"remove it from {folder}")
    return [p for p in files if p.name != MANIFEST_FILE]


def quantization_summary(folder: Path) -> dict[str, Any]:
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):  # ValueError: not JSON, or not UTF-8
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


class HashCache:
    """sha256 of a folder's files, reused while a file's size, mtime, inode and ctime are unchanged.
    Kept beside the release (`<parent>/.glmrel-cache/hashes/<folder>.json`), never published;
    a missing or unreadable cache only means hashing again."""

    def __init__(self, folder: Path) -> None:
        self.path = self.file_of(folder)
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            raw = {}
        # a damaged or edited cache only costs a hash: an entry not shaped as the cache writes
        # it (size, mtime, inode, ctime, sha256) is dropped, never trusted nor a traceback
        self.entries: dict[str, list] = {
            name: entry
            for name, entry in (raw.items() if isinstance(raw, dict) else ())
            if isinstance(entry, list)
            and len(entry) == 5
            and all(type(x) is int for x in entry[:4])
            and isinstance(entry[4], str)
            and SHA256_HEX.fullmatch(entry[4])
        }

    @staticmethod
    def file_of(folder: Path) -> Path:
        return folder.resolve().parent / CACHE_DIR / "hashes" / f"{folder.name}.json"

    @classmethod
    def follow_rename(cls, old: Path, new: Path) -> None:
        """After the folder `old` was renamed to `new` (a build's .partial swapped in as its
        branch): its cache becomes `new`'s. A rename keeps each file's inode and ctime, so the
        entries still vouch for exactly the bytes they hashed; without this the branch's first
        reader (verify) would hash every weight file again, and `old`'s cache would be left
        behind. A cache that cannot be moved is dropped: it costs time, not correctness."""
        src, dst = cls.file_of(old), cls.file_of(new)
        try:
            src.replace(dst)
        except FileNotFoundError:
            pass
        except OSError:
            with contextlib.suppress(OSError):
                src.unlink(missing_ok=True)

    @staticmethod
    def _key(st: os.stat_result) -> list:
        # ctime too, as git's index does: it cannot be set back, so a byte flipped in place
        # with its mtime restored is still hashed again
        return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]

    def hashes(self, files: list[Path]) -> dict[str, tuple[int, str]]:
        """name -> (size, sha256) for `files`, hashing only what the cache cannot vouch for."""
        return self.hashes_and_read(files)[0]

    def _clock(self, folder: Path, newest: int) -> int | None:
        """The filesystem's own time now, as the ctime of a probe file made beside the cache,
        once it is past `newest` (the newest ctime of the files about to be hashed): waited for
        a few ticks at most, so files written just before they are hashed (a build's seal) are
        still kept. None where no probe can be made there, or it is another filesystem than
        `folder`'s."""
        probe = self.path.parent / f".clock-{os.getpid()}-{threading.get_ident()}"
        deadline = time.monotonic() + CLOCK_WAIT_S
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
                try:
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                    probe.unlink(missing_ok=True)
                if st.st_ctime_ns > newest or time.monotonic() > deadline:
                    break
                time.sleep(0.001)
            return st.st_ctime_ns if st.st_dev == folder.lstat().st_dev else None
        except OSError:
            return None

    def hashes_and_read(self, files: list[Path]) -> tuple[dict[str, tuple[int, str]], list[Path]]:
        """`hashes`, and which of `files` had to be read (the cache could not vouch for them).

        A file is hashed after the filesystem's clock was read (`_clock`). Its entry is kept
        only if its ctime is older than that time, as git's index treats "racily clean" files:
        where timestamps are coarse (a jiffy on older kernels), a change within the same tick
        as the hash would keep size, mtime and ctime, so such an entry would vouch for bytes
        that are gone. Any change after the clock was read gets a ctime at least that time."""
        stats = {p: p.lstat() for p in files}
        out: dict[str, tuple[int, str]] = {}
        todo = []
        for p, st in stats.items():
            cached = self.entries.get(p.name)
            key = self._key(st)
            if cached is not None and cached[:-1] == key:  # entries are well-formed since loading
                out[p.name] = (st.st_size, cached[-1])
            else:
                todo.append(p)
        clock = self._clock(files[0].parent, max(stats[p].st_ctime_ns for p in todo)) if todo else None
        for p, digest in hash_files(todo).items():
            out[p.name] = (stats[p].st_size, digest)
        fresh = {
            p.name: [*self._key(stats[p]), out[p.name][1]]
            for p in files
            if p not in todo or (clock is not None and stats[p].st_ctime_ns < clock)
        }
        if fresh != self.entries:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_if_changed(self.path, json.dumps(fresh, sort_keys=True))
            except OSError:
                pass  # a cache that cannot be written costs time, not correctness
        return out, todo


def folder_branch(folder: Path) -> str:
    """The branch a folder holds, by its name as the path spells it once made absolute: `.` in
    out/demo/W4A16_GS64 is W4A16_GS64, never the empty name."""
    return Path(os.path.abspath(folder)).name


def build_manifest(folder: Path, branch: str | None = None) -> Manifest:
    """Describe `folder`: every file's size and sha256 (from the hash cache where it vouches)."""
    entries = {
        name: FileEntry(size, digest)
        for name, (size, digest) in HashCache(folder).hashes(release_files(folder)).items()
    }
    return Manifest(MANIFEST_SCHEMA, branch or folder_branch(folder), entries, quantization_summary(folder))


def write_manifest(folder: Path, branch: str | None = None) -> Manifest:
    m = build_manifest(folder, branch)
    m.write(folder / MANIFEST_FILE)
    return m


def sealed_changes(folder: Path) -> list[str]:
    """What changed in a branch's content since it was sealed (its manifest.json was written
    when it was built): each content file whose sha256 or presence differs, by name. The
    records written after verification (verify.json, the card, its plots) may change; an
    unreadable manifest is itself a change. Empty: the content is what was sealed."""
    path = folder / MANIFEST_FILE
    if path.is_symlink():  # never followed: its target is not the branch's
        return [f"{MANIFEST_FILE} is a symbolic link (to {os.readlink(path)}), not the manifest sealed"]
    if not path.is_file():
        return [f"{MANIFEST_FILE} is missing"]
    try:
        sealed = Manifest.load(path).files
    except ReleaseError as e:
        return [e.message]
    now = {n: d for n, (_s, d) in HashCache(folder).hashes(release_files(folder)).items()}
    changes = []
    for name in sorted(set(sealed) | set(now)):
        if name in WRITTEN_AFTER_VERIFY:
            continue
        if name not in now:
            changes.append(f"{name} was removed")
        elif name not in sealed:
            changes.append(f"{name} was added")
        elif now[name] != sealed[name].sha256:
            changes.append(f"{name} has another sha256 than the manifest sealed")
    return changes


def first_change(changes: list[str]) -> str:
    """The first of `sealed_changes`, with how many more there are."""
    return changes[0] + (f" (and {len(changes) - 1} more)" if len(changes) > 1 else "")


def require_sealed(folder: Path, branch: str) -> None:
    """Refuse a branch glmrel built (its provenance.json) whose content is no longer what it
    sealed: nothing may verify, describe or re-manifest weights that were changed afterwards."""
    if not (folder / "provenance.json").is_file():
        return
    changes = sealed_changes(folder)
    if changes:
        raise ReleaseError(
            f"{folder}: {first_change(changes)}; the branch is no longer what glmrel built and sealed",
            hint=f"rebuild it: `glmrel build-all` rebuilds a changed branch (or `glmrel quantize --branch {branch}`)",
        )


def require_built(folder: Path, branch: str) -> None:
    """A branch folder a later stage may record into: built (it has its config.json) and
    sealed (its content is what glmrel built, `require_sealed`)."""
    if not (folder / "config.json").is_file():
        raise ReleaseError(
            f"branch folder {folder} has no config.json", hint="build the release first (`glmrel build-all`)"
        )
    require_sealed(folder, branch)


def refresh_manifest(folder: Path, branch: str | None = None) -> Manifest:
    """The manifest again after records were written (verify.json, the card): only those may
    change. A built branch whose content changed since it was sealed is refused
    (`require_sealed`), so a refresh never re-approves changed weights."""
    require_sealed(folder, branch or folder_branch(folder))
    return write_manifest(folder, branch)


def folder_content_digest(folder: Path) -> str:
    """`content_digest` of a branch folder as it is now (what `verify` records)."""
    return content_digest({n: d for n, (_s, d) in HashCache(folder).hashes(release_files(folder)).items()})
