"""Release integrity (issue 15): publish exactly what was built, checked and verified —
nothing else, nothing twice. Each test is one reproduction: a bad case ends with one
`Error:` + `Hint:`, a non-zero exit, and nothing published or half-written."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SMALL_CALIBRATION, refs

from release.build.pipeline import build_all
from release.cli import cli
from release.config import load_config
from release.errors import ReleaseError
from release.manifest import CACHE_DIR, MANIFEST_FILE, write_manifest
from release.owned import create_owned

pytestmark = pytest.mark.slow
BRANCHES = ("W4A16_GS32", "W4A16_GS64", "W4A16_GS128")


def run(*args: str):
    return CliRunner().invoke(cli, [*args])


def publish(config: Path, *extra: str):
    return run("publish", "--config", str(config), "--changelog", "v1", *extra)


def refused(res, *needles: str) -> None:
    """One clear error: exit 1, `Error:` naming the problem, a `Hint:`, no traceback."""
    assert res.exit_code == 1, res.output
    assert "Error: " in res.output and "Hint: " in res.output, res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in res.output, res.output


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".publish-cache.git" not in p.parts and ".glmrel-cache" not in p.parts
    }


# ---------------------------------------------------------------- 1. nothing twice


def test_build_all_and_publish_again_change_nothing(release_copy):
    """The reproduction: a second `make demo` (build-all, then publish) must be a no-op.
    The manifest holds content only, records are rewritten only when their bytes change."""
    cfg = load_config(release_copy)
    assert publish(release_copy).exit_code == 0
    remote = Path(cfg.publish_remote)
    before_refs, before_files = refs(remote), snapshot(cfg.output_dir)
    manifest = json.loads((cfg.output_dir / "W4A16_GS32" / MANIFEST_FILE).read_text())
    assert all(set(e) == {"size", "sha256"} for e in manifest["files"].values()), "content only, no mtimes"

    result = build_all(cfg, echo=lambda s: None)
    assert all(b.skipped for b in result.builds)
    assert snapshot(cfg.output_dir) == before_files, "no byte and no mtime changed"
    res = publish(release_copy)
    assert res.exit_code == 0 and "nothing to do" in res.output, res.output
    assert refs(remote) == before_refs


def test_build_all_reads_each_weight_file_it_wrote_once(demo_release):
    """A fresh build-all hashes each weight file once, when its branch is sealed (in its
    .partial folder); the swap into the branch's name carries those hashes, so verify and the
    last check read none again (before, verify's "still sealed?" re-read every weight file:
    31 s of a 3-layer GLM-4.7-dims build on an H200). No cache is left under a .partial's name."""
    cfg = demo_release["config"]
    branch_of = re.compile(r"^\.?(?P<branch>[^.]+)(\.partial-.*)?$")
    reads = Counter(
        (branch_of.match(p.parent.name)["branch"], p.name) for p in demo_release["hashed"] if p.suffix == ".safetensors"
    )
    shards = {(b.name, p.name) for b in cfg.branches for p in (cfg.output_dir / b.name).glob("*.safetensors")}
    assert len(shards) >= len(cfg.branches) and set(reads) == shards, (sorted(reads), sorted(shards))
    assert set(reads.values()) == {1}, reads
    caches = {p.stem for p in (cfg.output_dir / CACHE_DIR / "hashes").glob("*.json")}
    assert not [c for c in caches if ".partial-" in c], caches
    assert {b.name for b in cfg.branches} <= caches
    assert not list((cfg.output_dir / CACHE_DIR / "hashes").glob(".clock-*")), "the clock's probe files are gone"


def test_sealing_reads_each_weight_file_once_and_refuses_one_changed_since(release_copy, monkeypatch):
    """build-all's last step (manifest, then check) trusts the hashes of the files it built, as
    publish does: a branch sealed again reads no weight file (size, mtime, inode and ctime
    unchanged), and its seconds go to the build log. A shard whose byte changed with its mtime
    set back is still hashed (its ctime moved) and refused, never sealed again."""
    import release.check.sources as check_mod
    import release.manifest as manifest_mod
    from release.build.pipeline import seal_branch
    from release.build_log import read_build_log

    cfg = load_config(release_copy)
    folder = cfg.output_dir / "W4A16_GS64"
    assert seal_branch(cfg, folder.name, folder).passed  # the copy's new inodes are hashed once here
    hashed: list[str] = []
    real_hash_files, real_sha = manifest_mod.hash_files, check_mod.sha256_file
    monkeypatch.setattr(
        manifest_mod, "hash_files", lambda files: hashed.extend(p.name for p in files) or real_hash_files(files)
    )
    monkeypatch.setattr(check_mod, "sha256_file", lambda p: hashed.append(Path(p).name) or real_sha(p))
    report = seal_branch(cfg, folder.name, folder)
    assert report.passed and not [n for n in hashed if n.endswith(".safetensors")], hashed
    seal = read_build_log(cfg.output_dir, folder.name)["seal"]
    assert seal["passed"] and seal["seconds"] >= 0

    shard = folder / "model.safetensors"
    st = shard.stat()
    with open(shard, "r+b") as f:
        f.seek(st.st_size - 1)
        last = f.read(1)
        f.seek(st.st_size - 1)
        f.write(bytes([last[0] ^ 1]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ReleaseError) as e:
        seal_branch(cfg, folder.name, folder)
    assert "model.safetensors" in str(e.value) and e.value.hint, str(e.value)
    assert "model.safetensors" in hashed


# ---------------------------------------------------------------- 2. nothing from outside the release


@pytest.mark.parametrize("where", ["main", "W4A16_GS64"])
def test_a_symlink_is_never_published(release_copy, where):
    cfg = load_config(release_copy)
    link = cfg.output_dir / where / "x.txt"
    link.symlink_to("/etc/passwd")
    for extra in ((), ("--dry-run",)):
        res = publish(release_copy, *extra)
        refused(res, "x.txt", "symbolic link")
    assert not Path(cfg.publish_remote).exists(), "nothing was published"


def test_a_symlink_is_refused_on_a_remote_that_exists(release_copy):
    """Publish once, then slip a link into main: the plan refuses, no ref moves."""
    cfg = load_config(release_copy)
    assert publish(release_copy).exit_code == 0
    before = refs(Path(cfg.publish_remote))
    (cfg.output_dir / "main" / "passwd.md").symlink_to("/etc/passwd")
    refused(publish(release_copy), "passwd.md", "symbolic link")
    assert refs(Path(cfg.publish_remote)) == before


def test_sub_folders_and_other_entries_are_refused(release_copy):
    cfg = load_config(release_copy)
    sub = cfg.output_dir / "W4A16_GS32" / "extra"
    sub.mkdir()
    (sub / "notes.txt").write_text("x")
    check = run("check", str(cfg.output_dir / "W4A16_GS32"))
    assert check.exit_code == 1 and "extra/ is a sub-folder" in check.output
    refused(publish(release_copy, "--dry-run"), "sub-folder")
    shutil.rmtree(sub)
    os.mkfifo(cfg.output_dir / "W4A16_GS32" / "pipe")
    refused(publish(release_copy, "--dry-run"), "pipe", "not a regular file")


def test_the_landing_page_holds_its_card_and_images_only(release_copy):
    cfg = load_config(release_copy)
    shutil.copy(cfg.output_dir / "W4A16_GS64" / "config.json", cfg.output_dir / "main" / "config.json")
    refused(publish(release_copy, "--dry-run"), "config.json may not be published on main")
    (cfg.output_dir / "main" / "config.json").unlink()
    (cfg.output_dir / "main" / "README.md").unlink()
    refused(publish(release_copy, "--dry-run"), "main/README.md is missing", "glmrel render")


def test_a_file_changed_after_the_check_is_not_published(release_copy, monkeypatch):
    """Between the plan (which checked the files) and the push, a file is rewritten: the
    git backend stores what it hashed, and a file whose bytes differ from the checked
    manifest is refused."""
    from release.publish import git_remote

    cfg = load_config(release_copy)
    gen = cfg.output_dir / "W4A16_GS64" / "generation_config.json"
    real = git_remote.file_digests

    def rewritten_first(p):
        if p == gen:
            gen.write_text(gen.read_text() + " ")
        return real(p)

    monkeypatch.setattr(git_remote, "file_digests", rewritten_first)
    refused(publish(release_copy), "generation_config.json changed after it was checked")
    assert "refs/heads/W4A16_GS64" not in refs(Path(cfg.publish_remote)) if Path(cfg.publish_remote).exists() else True


# ---------------------------------------------------------------- 3. only verified content


def test_an_unverified_branch_is_refused(release_copy):
    """What a build-all killed during GS64's calibration leaves: GS32 without verify.json."""
    cfg = load_config(release_copy)
    (cfg.output_dir / "W4A16_GS32" / "verify.json").unlink()
    assert run("render", "--config", str(release_copy)).exit_code == 0
    check = run("check", str(cfg.output_dir / "W4A16_GS32"))
    assert check.exit_code == 1 and "never verified" in check.output
    refused(publish(release_copy, "--dry-run"), "W4A16_GS32 fails check", "never verified")
    assert not Path(cfg.publish_remote).exists()


def test_a_failed_verification_is_refused(release_copy):
    cfg = load_config(release_copy)
    path = cfg.output_dir / "W4A16_GS64" / "verify.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "passed": False, "failures": ["mean KL 0.9 exceeds verify.max_kl 0.02"]}))
    assert run("render", "--config", str(release_copy)).exit_code == 0
    check = run("check", str(cfg.output_dir / "W4A16_GS64"))
    assert check.exit_code == 1 and "records a FAILED verification (mean KL 0.9" in check.output
    refused(publish(release_copy), "W4A16_GS64 fails check", "FAILED verification")
    assert not Path(cfg.publish_remote).exists()


def test_a_verification_of_other_content_is_refused(release_copy):
    """Weights changed after verify (and the manifest rewritten to match): the verify record
    names the digest of what it measured, and that is no longer this content."""
    cfg = load_config(release_copy)
    folder = cfg.output_dir / "W4A16_GS128"
    weights = bytearray((folder / "model-mtp-4.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (folder / "model-mtp-4.safetensors").write_bytes(bytes(weights))
    write_manifest(folder)
    check = run("check", str(folder))
    assert check.exit_code == 1 and "verify.json is about other content" in check.output
    refused(publish(release_copy, "--dry-run"), "W4A16_GS128 fails check", "changed after it was verified")


# ---------------------------------------------------------------- 4. no leaked temporary folders


def test_partials_of_dead_processes_are_removed(release_copy):
    cfg = load_config(release_copy)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = cfg.output_dir / f".W4A16_GS32.partial-{dead.pid}@{host}"
    legacy = cfg.output_dir / f".W4A16_GS32.old-{dead.pid}"
    alive = cfg.output_dir / f".W4A16_GS32.partial-{os.getppid()}@{host}"
    elsewhere = cfg.output_dir / f".W4A16_GS32.partial-{dead.pid}@another-host"
    for folder in (stale, legacy, alive, elsewhere):
        create_owned(folder, "a build")  # as glmrel makes them (a folder without the marker is left: test_trust)
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    res = run("quantize", "--config", str(release_copy), "--branch", "W4A16_GS32")
    assert res.exit_code == 0, res.output
    assert f"removed {stale.name}" in res.output and f"left by process {dead.pid}, which is gone" in res.output
    assert f"removed {legacy.name}" in res.output
    assert not stale.exists() and not legacy.exists()
    assert alive.exists() and f"leaving {alive.name}: process {os.getppid()} is still running" in res.output
    assert elsewhere.exists() and "belongs to a process on another-host" in res.output
    assert "up to date, skipped" in res.output


def test_a_killed_quantize_leaves_a_partial_that_the_next_run_removes(release_copy):
    """The reproduction: SIGKILL `quantize --force` once its partial folder holds the weights.
    The killed run calibrates on 4 samples of 64 tokens (its own config, the same output folder):
    the partial is named and placed by the folder and the branch, not by the data, so it is the
    same partial in a twentieth of the demo's calibration (68 s of the suite before, on a 2-core
    AMD EPYC). The next run is the release's own config, whose branch is up to date."""
    import signal
    import time

    import yaml

    cfg = load_config(release_copy)
    small = yaml.safe_load(release_copy.read_text())
    small["calibration"].update(SMALL_CALIBRATION)
    killed = release_copy.with_name("small.yaml")
    killed.write_text(yaml.safe_dump(small, sort_keys=False))

    def quantize(config: Path) -> list[str]:
        return [sys.executable, "-m", "release.cli", "quantize", "--config", str(config), "--branch", "W4A16_GS64"]

    proc = subprocess.Popen([*quantize(killed), "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while not list(cfg.output_dir.glob(".W4A16_GS64.partial-*/model.safetensors")):
            assert proc.poll() is None and time.time() < deadline, "quantize ended before writing its partial"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (partial,) = cfg.output_dir.glob(".W4A16_GS64.partial-*")
    assert partial.name == f".W4A16_GS64.partial-{proc.pid}@{socket.gethostname()}"
    res = subprocess.run(quantize(release_copy), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"removed {partial.name}" in res.stdout and f"left by process {proc.pid}, which is gone" in res.stdout
    assert not partial.exists()
    assert "up to date, skipped" in res.stdout, "the published branch was never touched"


# ---------------------------------------------------------------- 6. remotes that fail


def test_a_git_remote_created_by_someone_else_meanwhile(tmp_path, monkeypatch):
    """Two publishers start against a path that does not exist yet; the loser's `git init`
    fails with "File exists". A repository that exists afterwards is fine."""
    import git

    from release.publish import GitRemote

    url = tmp_path / "remote.git"
    remote = GitRemote(str(url), tmp_path / "cache")
    git.Repo.init(url, bare=True, initial_branch="main")  # the other publisher won the race

    def loses(*args, **kwargs):
        raise git.GitCommandError(["git", "init", "--bare", str(url)], 128, b"fatal: cannot mkdir: File exists")

    monkeypatch.setattr(git.Repo, "init", loses)
    remote.create()  # no error: the repository exists
    monkeypatch.undo()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ReleaseError) as e:  # a real failure stays one: a path under a regular file
        GitRemote(str(tmp_path / "a-file" / "r.git"), tmp_path / "c2").create()
    assert e.value.message.startswith(f"cannot create the git repository {tmp_path / 'a-file' / 'r.git'}")
    assert "writable" in (e.value.hint or "")


# ---------------------------------------------------------------- 8. one JSON document on stdout


def test_build_all_and_publish_json_are_one_document(release_copy):
    cfg = load_config(release_copy)
    res = CliRunner().invoke(cli, ["build-all", "--config", str(release_copy), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["passed"] and [b["branch"] for b in doc["branches"]] == list(BRANCHES)
    assert "verify" not in res.stdout.split("{", 1)[0]
    res = CliRunner().invoke(cli, ["publish", "--config", str(release_copy), "--changelog", "v1", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["published"] and all(r["passed"] for r in doc["read_back"])
    assert {b["name"] for b in doc["plan"]["branches"]} == {*BRANCHES, "main"}
    # a tag that would have to move: the plan is still shown (with the conflict), then refused
    card = cfg.output_dir / "W4A16_GS64" / "README.md"
    card.write_text(card.read_text() + "\nA later fix to the card.\n")
    write_manifest(cfg.output_dir / "W4A16_GS64")
    res = CliRunner().invoke(cli, ["publish", "--config", str(release_copy), "--changelog", "v1", "--json"])
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert not doc["published"]
    conflict = [t for t in doc["plan"]["tags"] if t["action"] == "conflict"]
    assert [t["name"] for t in conflict] == ["v1-W4A16_GS64"]
    assert "published tags never move" in res.stderr
    text = publish(release_copy)
    assert "tag v1-W4A16_GS64 -> W4A16_GS64: REFUSED" in text.output and "change README.md" in text.output
