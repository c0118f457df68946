"""Trust, second round: glmrel deletes only what it created, never seals changed weights again,
names every bad input with Error + Hint, and keeps --json to one JSON document."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from release.build import quantize
from release.build.room import check_room, size_text
from release.cli import cli
from release.config import check_release_refs, load_config
from release.errors import ReleaseError
from release.manifest import MANIFEST_FILE, content_digest, release_files, sealed_changes, sha256_file, write_manifest
from release.owned import MARKER, create_owned, made_by_glmrel, remove_owned, require_replaceable

REPO = Path(__file__).resolve().parent.parent


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def refused(res, *needles: str) -> None:
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output and "Error: " in res.output, res.output
    for n in needles:
        assert n in res.output, res.output


def users_folder(root: Path) -> Path:
    folder = root / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    (folder / "sub" / "data.csv").write_text("1,2,3")
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- never delete what glmrel did not make


def test_a_folder_glmrel_did_not_create_is_refused_or_left_never_emptied(tmp_path):
    mine = users_folder(tmp_path)
    before = tree(mine)
    with pytest.raises(ReleaseError) as e:
        create_owned(mine, "the offloaded base weights")
    assert "glmrel did not create it" in e.value.message and "move" in (e.value.hint or "")
    warnings: list[str] = []
    assert remove_owned(mine, warnings.append) is False
    assert warnings == [f"warning: left {mine} in place: glmrel did not create it"]
    with pytest.raises(ReleaseError, match="glmrel did not create"):
        require_replaceable(mine, "W4A16_GS32")
    link = tmp_path / "link"
    link.symlink_to(mine)
    assert remove_owned(link) is False and not made_by_glmrel(link)
    assert tree(mine) == before
    ours = create_owned(tmp_path / "work", "a test")
    assert (ours / MARKER).is_file() and remove_owned(ours) and not ours.exists()


def test_a_stale_looking_folder_without_glmrels_marker_is_left(tmp_path):
    """`.W4A16_GS32.partial-<dead pid>@<this host>` that glmrel did not create is not removed."""
    import socket

    fake = tmp_path / f".W4A16_GS32.partial-999999@{socket.gethostname()}"
    fake.mkdir()
    (fake / "keep.txt").write_text("not glmrel's")
    said: list[str] = []
    assert quantize.remove_stale_partials(tmp_path, "W4A16_GS32", said.append) == []
    assert (fake / "keep.txt").is_file() and "glmrel did not create it" in said[0]
    real = tmp_path / f".W4A16_GS32.partial-999998@{socket.gethostname()}"
    create_owned(real, "a killed build")
    assert quantize.remove_stale_partials(tmp_path, "W4A16_GS32", said.append) == [real]


def test_the_offload_and_pass_store_are_sub_folders_of_what_the_config_names(write_config, tmp_path):
    mine = users_folder(tmp_path)
    cfg = load_config(write_config({"offload.cpu_gib": 0.01, "offload.folder": str(mine)}))
    folder = quantize.offload_folder(cfg)
    assert folder.parent == mine and folder.name.startswith(".offload.partial-")
    create_owned(folder, "the offloaded base weights")
    quantize.forget_offload(folder)
    assert not folder.exists() and tree(mine) == {"sub/data.csv": b"1,2,3", "thesis.tex": b"years of work"}


def test_a_branch_folder_glmrel_did_not_make_is_refused_before_any_work(write_config, tmp_path):
    out = tmp_path / "out"
    mine = out / "W4A16_GS128"
    mine.mkdir(parents=True)
    (mine / "notes.md").write_text("my own branch")
    res = run("quantize", "--config", str(write_config()), "--branch", "W4A16_GS128", "--force")
    refused(res, f"{mine} is a folder glmrel did not create; building W4A16_GS128 would replace it")
    assert (mine / "notes.md").read_text() == "my own branch"
    assert "loading" not in res.output, "refused before the model was loaded"


def test_output_dir_that_is_a_file_is_refused_before_any_work(write_config, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    res = run("build-all", "--config", str(write_config()))
    refused(res, f"output_dir {out} is a file, not a folder")
    assert "loading" not in res.output and out.read_text() == "a file"


# ---------------------------------------------------------------- never seal changed weights again


def test_a_byte_flipped_with_its_mtime_restored_is_still_a_change(tmp_path):
    folder = tmp_path / "W4A16_GS64"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    (folder / "README.md").write_text("card")
    write_manifest(folder)
    assert sealed_changes(folder) == []
    path = folder / "model.safetensors"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    with path.open("r+b") as f:  # in place: same inode and size
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sealed_changes(folder) == ["model.safetensors has another sha256 than the manifest sealed"]
    (folder / "README.md").write_text("a re-rendered card")  # written after verification: may change
    (folder / "extra.bin").write_bytes(b"x")
    assert sealed_changes(folder) == [
        "extra.bin was added",
        "model.safetensors has another sha256 than the manifest sealed",
    ]


def test_a_manifest_replaced_by_a_link_is_named_a_link_and_not_followed(tmp_path):
    """A sealed branch whose manifest.json became a link (even to the very manifest sealed) is a
    change: the link is named as such, its target never read as the branch's seal."""
    folder = tmp_path / "W4A16_GS64"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    write_manifest(folder)
    outside = tmp_path / "manifest.json"
    (folder / MANIFEST_FILE).rename(outside)
    (folder / MANIFEST_FILE).symlink_to(outside)
    assert sealed_changes(folder) == [f"manifest.json is a symbolic link (to {outside}), not the manifest sealed"]


def test_a_change_in_the_same_clock_tick_as_the_hash_is_still_a_change(tmp_path, monkeypatch):
    """Where timestamps are coarse (a jiffy on older kernels), a byte changed in the same tick
    as the hash keeps size, mtime, inode and ctime: the hash cache must not vouch for the old
    bytes. Here the filesystem's clock stands still at one tick, so the file's ctime is the time
    the hash started: its entry is not kept (git's "racily clean"), and the change is found.
    Once the clock has moved past the file's ctime, its hash is kept and trusted."""
    from types import SimpleNamespace

    from release.manifest import HashCache

    tick = 1_700_000_000_000_000_000
    clock = [tick]
    real_lstat = Path.lstat

    def coarse_lstat(self):
        st = real_lstat(self)
        return SimpleNamespace(
            st_mode=st.st_mode,
            st_dev=st.st_dev,
            st_ino=st.st_ino,
            st_size=st.st_size,
            st_mtime_ns=tick,
            st_ctime_ns=tick,
        )

    monkeypatch.setattr(Path, "lstat", coarse_lstat)
    monkeypatch.setattr(HashCache, "_clock", lambda self, folder, newest: clock[0])
    folder = tmp_path / "W4A16_GS64"
    folder.mkdir()
    path = folder / "model.safetensors"
    path.write_bytes(b"\0" * 4096)
    write_manifest(folder)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    with path.open("r+b") as f:  # in place, in the same tick: nothing in the stat moves
        f.write(data)
    assert sealed_changes(folder) == ["model.safetensors has another sha256 than the manifest sealed"]
    clock[0] = tick + 1  # the clock moved on: the file's ctime is older than the hash
    files = [path]
    assert HashCache(folder).hashes_and_read(files)[1] == files, "hashed: no entry was kept in the tick"
    assert HashCache(folder).hashes_and_read(files)[1] == [], "kept once its ctime was older than the hash"


def test_the_hash_clock_is_the_filesystems_and_waits_for_it_to_pass_the_files(tmp_path):
    """The time a hash starts is read from the filesystem (a probe's ctime, beside the cache),
    after its clock passed the newest ctime of the files to read: a file written just before it
    is hashed (a build's seal) is still trusted after. A clock that does not get there in
    CLOCK_WAIT_S is returned as it is (those files' hashes are then not kept); no probe is left."""
    import time

    from release.manifest import CACHE_DIR, CLOCK_WAIT_S, HashCache

    folder = tmp_path / "W4A16_GS64"
    folder.mkdir()
    path = folder / "model.safetensors"
    path.write_bytes(b"x")
    written = path.lstat().st_ctime_ns
    cache = HashCache(folder)
    assert cache._clock(folder, written) > written
    t = time.monotonic()
    never = written + 10**15  # a ctime the clock will not pass
    assert cache._clock(folder, never) < never and time.monotonic() - t < CLOCK_WAIT_S + 1
    assert HashCache(folder).hashes_and_read([path])[1] == [path]
    assert HashCache(folder).hashes_and_read([path])[1] == [], "written just before the hash, and kept"
    assert not list((tmp_path / CACHE_DIR).rglob(".clock-*"))


@pytest.fixture(scope="module")
def small_release(tmp_path_factory, demo_assets) -> Path:
    """The demo release calibrated on 4 samples of 64 tokens, built once for this module's
    rebuild tests (each rebuilds a copy): a rebuild's bytes are compared with this build's, so
    the demo's own calibration (a pass of about 75 s on a 2-core AMD EPYC, per rebuild) adds
    nothing to what they check. Returns its output folder."""
    from conftest import SMALL_CALIBRATION, demo_raw_config, release_config

    from release.build.pipeline import build_all

    raw = demo_raw_config(demo_assets)
    raw["calibration"].update(SMALL_CALIBRATION)
    cfg = load_config(release_config(tmp_path_factory.mktemp("small_release"), raw))
    build_all(cfg, echo=lambda s: None)
    return cfg.output_dir


def small_copy(small_release: Path, root: Path) -> Path:
    """`small_release` copied into `root` with a config of its own there; returns the config."""
    from conftest import copy_release

    return copy_release(small_release, root, yaml.safe_load((small_release.parent / "release.yaml").read_text()))


@pytest.mark.slow
def test_changed_weights_are_rebuilt_never_approved_again(small_release, tmp_path):
    """A byte flipped in a built branch: verify, render and manifest refuse it by name, and
    build-all rebuilds that branch (not 'up to date'), to the same bytes as before."""
    from release.build.pipeline import build_all

    release_copy = small_copy(small_release, tmp_path)
    cfg = load_config(release_copy)
    folder = cfg.output_dir / "W4A16_GS64"
    original = tree(small_release / "W4A16_GS64")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    manifest_before = (folder / MANIFEST_FILE).read_bytes()
    for args in (
        ("verify", "--config", str(release_copy), "--branch", "W4A16_GS64"),
        ("render", "--config", str(release_copy)),
        ("manifest", str(folder)),
    ):
        refused(run(*args), "model.safetensors has another sha256 than the manifest sealed", "glmrel build-all")
    assert (folder / MANIFEST_FILE).read_bytes() == manifest_before, "nothing re-sealed"
    checked = run("check", str(folder))  # a report, not an error: FAILED, naming the file
    assert (
        checked.exit_code == 1 and "file model.safetensors has a different sha256 than the manifest" in checked.output
    )
    logs: list[str] = []
    result = build_all(cfg, echo=logs.append)
    outcome = {b.branch: b.skipped for b in result.builds}
    assert outcome == {"W4A16_GS32": True, "W4A16_GS64": False, "W4A16_GS128": True}
    assert (
        "[W4A16_GS64] model.safetensors has another sha256 than the manifest sealed since it was built: "
        "rebuilding it" in logs
    )
    rebuilt = tree(folder)
    if rebuilt.get("verify.json") != original.get("verify.json"):  # name the fields, to tell why
        now, before = (json.loads(t["verify.json"]) for t in (rebuilt, original))
        differ = {k: (before.get(k), now.get(k)) for k in sorted(set(now) | set(before)) if now.get(k) != before.get(k)}
        files = [json.loads(t["manifest.json"])["files"] for t in (original, rebuilt)]
        entries = {
            n: (files[0].get(n), files[1].get(n))
            for n in set(files[0]) | set(files[1])
            if files[0].get(n) != files[1].get(n)
        }
        fresh = [
            content_digest({f.name: sha256_file(f) for f in release_files(d)})
            for d in (small_release / "W4A16_GS64", folder)
        ]
        pytest.fail(
            f"verify.json of the same weights differs after the rebuild: {differ}; manifest: {entries}; "
            f"hashed afresh (original, rebuilt): {fresh}"
        )
    assert rebuilt == original, "the rebuilt branch is the same bytes as the first build"
    assert run("check", str(folder)).exit_code == 0


# ---------------------------------------------------------------- versions, names and remotes


@pytest.mark.parametrize(
    "version, why",
    [
        ("v1..2", "may not contain '..'"),
        ("v1.lock", "may not end with '.lock'"),
        ("main", "is a name git or the Hub reserves"),
        ("HEAD", "is a name git or the Hub reserves"),
        ("W4A16_GS32", "is the name of a branch of this release"),
        ("v1-W4A16_GS32", "its tag would be version v1's tag for W4A16_GS32"),
    ],
)
def test_a_version_that_would_make_a_bad_or_clashing_ref_is_refused_before_anything(
    write_config, tmp_path, version, why
):
    changelog = tmp_path / "changelog.yaml"
    changelog.write_text(yaml.safe_dump([{"version": version, "summary": "s", "changes": []}]))
    config = write_config({"changelog": str(changelog)})
    for args in (("render",), ("publish", "--dry-run"), ("publish",)):
        extra = () if args == ("render",) else ("--changelog", version)
        refused(run(*args, "--config", str(config), *extra), why)
    assert not (tmp_path / "remote.git").exists(), "nothing was created or pushed"


def test_release_refs_accept_ordinary_versions():
    for v in ("v1", "v2", "v1.1", "2026-12", "v1-rc1"):
        check_release_refs(v, ["W4A16_GS32", "W4A16_GS64", "W4A16_GS128"])


def test_a_branch_named_like_a_reserved_ref_is_a_config_error(write_config):
    from release.config import load_config as load

    for name in ("HEAD", "W4A16..GS32", "x.lock"):
        with pytest.raises(ReleaseError, match="branch name"):
            load(write_config({"branches": [{"name": name, "group_size": 64}]}))


# ---------------------------------------------------------------- Error + Hint, never a traceback


@pytest.mark.parametrize("repo", ["../../etc", "a/b/c", "", "hf://"])
def test_check_remote_with_a_bad_repo_id(repo):
    refused(run("check", "--remote", repo, "--revision", "main"), "is not a Hub repo id of the form owner/name")


def test_check_group_size_zero_is_a_usage_error(tmp_path):
    res = run("check", str(tmp_path), "--group-size", "0")
    assert res.exit_code == 2 and "Invalid value for '--group-size'" in res.output and "Traceback" not in res.output


def test_config_that_is_not_utf8_or_is_a_folder(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    refused(run("build-all", "--config", str(bad)), "is not UTF-8 text")
    refused(run("build-all", "--config", str(tmp_path)), f"config {tmp_path} is a folder, not a file")
    refused(run("build-all", "--config", os.devnull), f"config file {os.devnull} is not a regular file")
    refused(run("build-all", "--config", str(tmp_path / "none.yaml")), "does not exist")


def test_manifest_export_under_a_file_writes_nothing(tmp_path):
    folder = tmp_path / "branch"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    refused(run("manifest", str(folder), "--export", str(blocker / "sub")), "--export", "cannot be written")
    assert not (folder / MANIFEST_FILE).exists()


def test_room_refusal_names_sizes_in_a_unit_that_shows_them(tmp_path):
    assert [size_text(n) for n in (512, 3 << 10, 5 << 20, 7 << 30)] == ["512 bytes", "3.0 KiB", "5.0 MiB", "7.0 GiB"]
    with pytest.raises(ReleaseError) as e:
        check_room("building X", [(tmp_path, 1 << 60, "X")], hint="free space")
    assert "1024.0 PiB" not in e.value.message and "TiB" in e.value.message and "0.0 GiB" not in e.value.message


def test_a_full_disk_during_a_build_is_named(write_config, monkeypatch):
    from safetensors import SafetensorError

    cfg = load_config(write_config())

    def full(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise SafetensorError("Error while serializing: IoError(No space left on device)") from e

    monkeypatch.setattr(quantize, "_build_branches", full)
    with pytest.raises(ReleaseError) as e:
        quantize.build_branches(cfg, ["W4A16_GS64"], 1, None)
    assert "the disk filled up while building" in e.value.message and "free space" in (e.value.hint or "")


def test_a_truncated_store_file_is_named(tmp_path):
    import torch
    from safetensors.torch import save_file

    from release.layout import TensorFiles

    path = tmp_path / "layer-1.safetensors"
    save_file({"w": torch.zeros(64)}, str(path))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ReleaseError) as e:
        TensorFiles.of([path])
    assert f"{path} cannot be read as safetensors" in e.value.message


def test_an_unforeseen_exception_is_one_error_line_not_a_traceback(monkeypatch, tmp_path):
    import release.check as check_mod

    def boom(*a, **k):
        raise KeyError("surprise")

    monkeypatch.setattr(check_mod, "check_branch", boom)
    res = run("check", str(tmp_path))
    refused(res, "Error: unexpected KeyError: 'surprise'", "GLMREL_DEBUG=1")


def test_rehearsal_records_its_arguments_with_paths(tmp_path):
    """`--pass-store DIR` (a Path) once made the rehearsal's JSON record fail to write."""
    import argparse

    from benchmarks.rehearsal import args_record

    a = argparse.Namespace(pass_store=tmp_path / "store", json=tmp_path / "r.json", samples=8)
    assert json.loads(json.dumps(args_record(a))) == {
        "pass_store": str(tmp_path / "store"),
        "json": str(tmp_path / "r.json"),
        "samples": 8,
    }


# ---------------------------------------------------------------- --json: one document, always


@pytest.mark.parametrize(
    "args",
    [
        ("check", "/nonexistent/W4A16_GS64", "--json"),
        ("check", "--remote", "../../etc", "--revision", "main", "--json"),
        ("publish", "--changelog", "v1", "--json"),
        ("build-all", "--json"),
    ],
)
def test_json_refusals_print_one_json_document_with_the_error(write_config, tmp_path, args):
    config = write_config({"output_dir": str(tmp_path / "nothing-built")})
    if args[0] in ("publish", "build-all"):
        args = (*args, "--config", str(config))
        if args[0] == "build-all":
            (tmp_path / "nothing-built").write_text("a file")  # refused before any work
    res = CliRunner().invoke(cli, list(args))
    assert res.exit_code != 0
    doc = json.loads(res.stdout)
    assert doc["ok"] is False and doc["error"] and "hint" in doc


@pytest.mark.slow
def test_build_all_json_is_one_document_and_the_console_is_glmrels(demo_assets, tmp_path):
    """A real build under --json: stdout is one JSON document (llm-compressor's logger wrote
    300+ lines there), the libraries' logs are in the log file, and the console says what the
    MTP load report means instead of listing its 46 tensors (8 experts) as UNEXPECTED."""
    from conftest import SMALL_CALIBRATION, demo_raw_config, release_config

    raw = demo_raw_config(demo_assets)
    raw["branches"] = [b for b in raw["branches"] if b["group_size"] == 128]
    raw["calibration"].update(SMALL_CALIBRATION)
    config = release_config(tmp_path, raw)
    proc = subprocess.run(
        [sys.executable, "-m", "release.cli", "build-all", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True and doc["passed"] is True and [b["branch"] for b in doc["branches"]] == ["W4A16_GS128"]
    assert "UNEXPECTED" not in proc.stderr and "No accelerator available" not in proc.stderr
    assert "MTP layer (46 tensors under model.layers.4.*) is not part of transformers' model class" in proc.stderr
    assert "[W4A16_GS128] layer 4/4:" in proc.stderr
    log = tmp_path / "out" / ".glmrel-cache" / "logs" / "build-all.log"
    assert "No accelerator available" in log.read_text() and "LOAD REPORT" in log.read_text()
    assert len(proc.stderr.splitlines()) < 40, proc.stderr


@pytest.mark.parametrize(
    "command", [("build-all",), ("quantize", "--branch", "W4A16_GS32"), ("verify", "--branch", "W4A16_GS32"), ("eval",)]
)
def test_a_command_refused_before_any_work_leaves_no_output_dir(demo_assets, tmp_path, command):
    """A fresh clone's first mistake (the base model not built yet): the command says so with
    a hint and exits 1, and the output_dir it would have logged into is not left behind (the
    libraries' log was empty, so it and the folders made for it are removed)."""
    from conftest import demo_raw_config

    raw = demo_raw_config(demo_assets)
    raw["base_model"]["path"] = str(tmp_path / "no-model")
    raw.update(output_dir=str(tmp_path / "out" / "demo"), publish_remote=str(tmp_path / "remote.git"))
    config = tmp_path / "release.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "release.cli", *command, "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"Error: base model folder {tmp_path / 'no-model'} does not exist" in proc.stderr
    assert "Hint: set base_model.path" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists(), sorted(str(p) for p in (tmp_path / "out").rglob("*"))


# ---------------------------------------------------------------- the same inputs, the same bytes


def published_tree(output_dir: Path) -> dict[str, bytes]:
    """Every file a publish ships: each branch folder's and main/'s, hidden entries left out."""
    out = {}
    for folder in sorted(p for p in output_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out.update(
            {
                f"{folder.name}/{p.name}": p.read_bytes()
                for p in sorted(folder.iterdir())
                if p.is_file() and not p.name.startswith(".")
            }
        )
    return out


@pytest.mark.slow
def test_a_forced_rebuild_gives_byte_identical_published_files(small_release, tmp_path):
    """build-all --force with unchanged inputs: every published file (weights, config, records,
    cards, manifests, plots) is the same bytes; what differs from run to run (timings, host,
    process) is in the local build log only."""
    from release.build.pipeline import build_all
    from release.build_log import read_build_log

    cfg = load_config(small_copy(small_release, tmp_path))
    first = published_tree(cfg.output_dir)
    pid_first = read_build_log(cfg.output_dir, "W4A16_GS32")["quantize"]["finished_unix"]
    result = build_all(cfg, force=True, echo=lambda s: None)
    assert not any(b.skipped for b in result.builds)
    second = published_tree(cfg.output_dir)
    assert sorted(first) == sorted(second) and len(first) > 40
    changed = [name for name in first if first[name] != second[name]]
    assert changed == [], f"a forced rebuild changed {changed}"
    assert read_build_log(cfg.output_dir, "W4A16_GS32")["quantize"]["finished_unix"] >= pid_first


def test_a_damaged_or_edited_hash_cache_is_never_trusted_nor_a_traceback(tmp_path):
    """The hash cache is glmrel's own file, but a disk or a hand can damage it: an entry not
    shaped as the cache writes it is dropped and the file hashed again, whatever it holds."""
    import json

    from release.manifest import HashCache, sha256_file

    folder = tmp_path / "W4A16_GS64"
    folder.mkdir()
    path = folder / "model.safetensors"
    path.write_bytes(b"weights")
    cache = HashCache.file_of(folder)
    cache.parent.mkdir(parents=True)
    st = path.lstat()
    key = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
    for damaged in (
        "[1, 2",
        "[]",
        "5",
        json.dumps({path.name: 5}),
        json.dumps({path.name: "abc"}),
        json.dumps({path.name: [*key, "not a sha256"]}),
        json.dumps({path.name: [*map(str, key), "0" * 64]}),
        json.dumps({path.name: [*key[:3], "0" * 64]}),
    ):
        cache.write_text(damaged)
        hashes, read = HashCache(folder).hashes_and_read([path])
        assert read == [path], damaged
        assert hashes == {path.name: (7, sha256_file(path))}, damaged


def test_an_atomic_write_never_writes_through_a_planted_link(tmp_path):
    import os

    from release.manifest import write_if_changed

    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    target = tmp_path / "rel" / "provenance.json"
    target.parent.mkdir()
    os.symlink(outside, target.with_name(f".{target.name}.tmp-{os.getpid()}"))
    assert write_if_changed(target, "{}")
    assert outside.read_text() == "keep" and target.read_text() == "{}" and not target.is_symlink()


def test_manifest_export_never_replaces_a_link_or_a_folder(tmp_path):
    folder = tmp_path / "W4A16_GS64"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    export = tmp_path / "exported"
    export.mkdir()
    theirs = tmp_path / "theirs.json"
    theirs.write_text("their file")
    (export / "W4A16_GS64.json").symlink_to(theirs)
    refused(run("manifest", str(folder), "--export", str(export)), "is a link", "move")
    assert (export / "W4A16_GS64.json").is_symlink() and theirs.read_text() == "their file"
    assert not (folder / MANIFEST_FILE).exists()
    (export / "W4A16_GS64.json").unlink()
    (export / "W4A16_GS64.json").mkdir()
    refused(run("manifest", str(folder), "--export", str(export)), "is a folder")
    assert not (folder / MANIFEST_FILE).exists() and sorted(p.name for p in export.iterdir()) == ["W4A16_GS64.json"]


def test_manifest_of_dot_names_the_folder_it_is_in(tmp_path, monkeypatch):
    folder = tmp_path / "W4A16_GS64"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.chdir(folder)
    res = run("manifest", ".", "--export", str(tmp_path / "exported"))
    assert res.exit_code == 0, res.output
    assert json.loads((folder / MANIFEST_FILE).read_text())["branch"] == "W4A16_GS64"
    assert [p.name for p in (tmp_path / "exported").iterdir()] == ["W4A16_GS64.json"]
