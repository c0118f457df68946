"""glmrel publish (git backend) against a real local bare repository."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import git
import pytest
from click.testing import CliRunner
from conftest import refs

import release.publish.git_remote as publish_mod
from release.cli import cli
from release.config import load_config
from release.errors import ReleaseError
from release.manifest import MANIFEST_FILE, release_files
from release.publish import apply_plan, plan_publish, verify_published

pytestmark = pytest.mark.slow
BRANCHES = ("W4A16_GS32", "W4A16_GS64", "W4A16_GS128")


def publish(config: Path, *extra: str):
    return CliRunner().invoke(
        cli, ["publish", "--config", str(config), "--changelog", "v1", *extra], catch_exceptions=False
    )


def clone_branch(remote: Path, name: str, dest: Path) -> None:
    """What a user gets: `git clone`, with git-lfs's filters where git-lfs is installed."""
    filters = publish_mod.LFS_FILTERS if publish_mod.git_lfs_available() else []
    subprocess.run(
        ["git", *filters, "clone", "-q", "--branch", name, "--single-branch", remote.resolve().as_uri(), str(dest)],
        check=True,
    )


@pytest.mark.parametrize("lfs", ["git-lfs", "plain"])
def test_publish_clones_back_byte_for_byte_with_tags(release_copy, tmp_path, monkeypatch, lfs):
    if lfs == "plain":
        monkeypatch.setenv("GLMREL_GIT_LFS", "0")
    elif not publish_mod.git_lfs_available():
        pytest.skip("git-lfs is not installed here (make git-lfs installs it); the plain-blob run covers the rest")
    res = publish(release_copy)
    assert res.exit_code == 0, res.output
    assert "all revisions verified" in res.output
    cfg = load_config(release_copy)
    remote = Path(cfg.publish_remote)
    for name in (*BRANCHES, "main"):
        clone = tmp_path / f"clone-{name}"
        clone_branch(remote, name, clone)
        attributes = clone / ".gitattributes"
        if lfs == "git-lfs":
            assert "*.safetensors filter=lfs" in attributes.read_text()
            attributes.unlink()
            if name != "main":
                blob = git.Repo(clone).git.cat_file("blob", "HEAD:model.safetensors")
                assert blob.startswith("version https://git-lfs.github.com/spec/v1"), "weights are LFS pointers in git"
                assert (remote / "lfs" / "objects").is_dir(), "the LFS objects reached the remote"
        else:
            assert not attributes.exists()
        published = {p.name: p.read_bytes() for p in clone.iterdir() if p.name != ".git"}
        folder = cfg.output_dir / name
        expected = {p.name: p.read_bytes() for p in release_files(folder)}
        if name != "main":
            expected[MANIFEST_FILE] = (folder / MANIFEST_FILE).read_bytes()
        assert published == expected, name
        assert not any(p.suffix == ".safetensors" for p in clone.iterdir()) if name == "main" else True
        commits = list(git.Repo(clone).iter_commits())
        assert len(commits) == 1 and not commits[0].parents, f"{name} must be an orphan branch with one commit"
        assert commits[0].message.startswith("tiny-GLM-4-MoE-W4A16 v1: First release")
    r = git.Repo(str(remote))
    assert r.tags["v1"].commit.hexsha == r.heads["main"].commit.hexsha
    for b in BRANCHES:
        assert r.tags[f"v1-{b}"].commit.hexsha == r.heads[b].commit.hexsha
        assert r.tags[f"v1-{b}"].tag is not None, "tags are annotated"


def test_second_publish_makes_no_commit(release_copy):
    assert publish(release_copy).exit_code == 0
    remote = Path(load_config(release_copy).publish_remote)
    before = refs(remote)
    res = publish(release_copy)
    assert res.exit_code == 0 and "nothing to do" in res.output
    assert refs(remote) == before


def test_a_publish_with_nothing_changed_reads_nothing_again(release_copy, monkeypatch):
    """Issue 28's no-op publish: no weight file is hashed again (the hash cache vouches for each:
    same size, mtime, inode and ctime) and no branch is cloned back (each head passed its full
    read-back before); --rehash reads both again. A changed file is hashed and refused."""
    import release.check.sources as check_mod
    import release.manifest as manifest_mod

    assert publish(release_copy).exit_code == 0
    remote = Path(load_config(release_copy).publish_remote)
    before = refs(remote)
    hashed: list[str] = []
    cloned: list[str] = []
    real_hash_files, real_sha, real_read_back = (
        manifest_mod.hash_files,
        check_mod.sha256_file,
        publish_mod.GitRemote.check_revision,
    )

    def hash_files(files):
        hashed.extend(p.name for p in files)
        return real_hash_files(files)

    def sha256_file(path):
        hashed.append(Path(path).name)
        return real_sha(path)

    def check_revision(self, name, head, group_size):
        cloned.append(name)
        return real_read_back(self, name, head, group_size)

    monkeypatch.setattr(manifest_mod, "hash_files", hash_files)
    monkeypatch.setattr(check_mod, "sha256_file", sha256_file)
    monkeypatch.setattr(publish_mod.GitRemote, "check_revision", check_revision)
    res = publish(release_copy)
    assert res.exit_code == 0 and "nothing to do" in res.output and refs(remote) == before
    assert not [n for n in hashed if n.endswith(".safetensors")], hashed
    assert cloned == [] and res.output.count("passed its full read-back before") == len(BRANCHES)
    res = publish(release_copy, "--rehash")
    assert res.exit_code == 0 and "nothing to do" in res.output
    assert cloned == list(BRANCHES)
    assert {"model.safetensors", "model-mtp-4.safetensors"} <= set(hashed)
    # a byte flipped with its mtime put back: the new ctime makes it hashed again, and refused
    weights = load_config(release_copy).output_dir / "W4A16_GS64" / "model.safetensors"
    st = weights.stat()
    with weights.open("r+b") as f:
        f.seek(st.st_size - 1)
        last = f.read(1)
        f.seek(st.st_size - 1)
        f.write(bytes([last[0] ^ 1]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    hashed.clear()
    res = CliRunner().invoke(cli, ["publish", "--config", str(release_copy), "--changelog", "v1"])
    assert res.exit_code != 0 and "W4A16_GS64 fails check" in res.output and "model.safetensors" in res.output
    assert refs(remote) == before


def test_dry_run_writes_nothing(release_copy, tmp_path):
    res = publish(release_copy, "--dry-run")
    assert res.exit_code == 0
    folder = load_config(release_copy).output_dir / "W4A16_GS32"
    # every file of the branch, its manifest, and with git-lfs the .gitattributes that says so
    n = len(release_files(folder)) + 1 + publish_mod.git_lfs_available()
    assert n >= 16
    assert "create repository" in res.output and f"W4A16_GS32: create orphan branch; {n} to add" in res.output
    assert not (tmp_path / "remote.git").exists()


def test_interrupted_publish_moves_nothing_and_resumes(release_copy, monkeypatch):
    """Branches and tags go in one atomic push: a publish cut during it leaves no branch or
    tag on the remote, and the same command then publishes everything."""
    cfg = load_config(release_copy)
    real_push = publish_mod.GitRemote.push_atomic

    def cut(self, refspecs, leases, expected):
        raise KeyboardInterrupt("connection lost")

    monkeypatch.setattr(publish_mod.GitRemote, "push_atomic", cut)
    plan, backend = plan_publish(cfg, "v1")
    with pytest.raises(KeyboardInterrupt):
        apply_plan(plan, backend, echo=lambda s: None)
    monkeypatch.setattr(publish_mod.GitRemote, "push_atomic", real_push)
    assert refs(Path(cfg.publish_remote)) == {}
    plan, backend = plan_publish(cfg, "v1")
    assert not any(b.up_to_date for b in plan.branches)
    apply_plan(plan, backend, echo=lambda s: None)
    assert all(r.passed for r in verify_published(cfg, backend, "v1"))


def test_a_push_the_remote_refuses_reports_its_message_and_moves_nothing(release_copy):
    cfg = load_config(release_copy)
    remote = Path(cfg.publish_remote)
    git.Repo.init(remote, bare=True, initial_branch="main")
    hook = remote / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'releases are frozen until Monday (ticket OPS-42)' >&2\nexit 1\n")
    hook.chmod(0o755)
    res = publish(release_copy)
    assert res.exit_code == 1
    assert "refused the push (pre-receive hook declined)" in res.output, res.output
    assert "releases are frozen until Monday (ticket OPS-42)" in res.output
    assert "moved since the plan" not in res.output and "someone else published" not in res.output
    assert refs(remote) == {}, "atomic: no branch and no tag"


@pytest.mark.parametrize(
    "remote",
    ["--receive-pack=touch pwned", "-oProxyCommand=touch pwned", "ext::sh -c touch% pwned", "gopher://host/x", ""],
)
def test_a_remote_git_would_read_as_an_option_or_a_command_is_refused_up_front(release_copy, tmp_path, remote):
    before = sorted(p.name for p in Path.cwd().iterdir())
    res = CliRunner().invoke(cli, ["publish", "--config", str(release_copy), "--changelog", "v1", f"--remote={remote}"])
    assert res.exit_code == 1 and "Error: remote " in res.output and "nothing was published" in res.output
    assert "Traceback" not in res.output and "moved since the plan" not in res.output
    assert sorted(p.name for p in Path.cwd().iterdir()) == before, "no folder named after the option"
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_remote_that_moved_since_the_plan(release_copy, tmp_path):
    cfg = load_config(release_copy)
    plan, backend = plan_publish(cfg, "v1")
    # another publisher creates the branch after our plan was made
    other = tmp_path / "other"
    git.Repo.init(other, initial_branch="W4A16_GS32")
    (other / "x.txt").write_text("x")
    r = git.Repo(other)
    r.index.add(["x.txt"])
    r.index.commit("someone else")
    git.Repo.init(cfg.publish_remote, bare=True, initial_branch="main")
    r.git.push(cfg.publish_remote, "W4A16_GS32:refs/heads/W4A16_GS32")
    plan.create_repo = False
    with pytest.raises(ReleaseError) as e:
        apply_plan(plan, backend, echo=lambda s: None)
    assert "the remote's branch W4A16_GS32 moved since the plan" in e.value.message
    assert refs(Path(cfg.publish_remote))["refs/heads/W4A16_GS32"] == r.head.commit.hexsha, "their commit was kept"


def test_tag_at_a_different_commit_is_never_moved(release_copy):
    cfg = load_config(release_copy)
    assert publish(release_copy).exit_code == 0
    card = cfg.output_dir / "W4A16_GS64" / "README.md"
    card.write_text(card.read_text() + "\nA later fix to the card.\n")
    from release.manifest import write_manifest

    write_manifest(cfg.output_dir / "W4A16_GS64")
    before = refs(Path(cfg.publish_remote))
    res = CliRunner().invoke(cli, ["publish", "--config", str(release_copy), "--changelog", "v1"])
    assert res.exit_code == 1
    assert "Error: tag v1-W4A16_GS64 already exists on the remote" in res.output
    assert "published tags never move" in res.output
    assert refs(Path(cfg.publish_remote)) == before, "nothing was pushed"


def test_branch_failing_check_is_refused(release_copy):
    cfg = load_config(release_copy)
    (cfg.output_dir / "W4A16_GS32" / "config.json").write_text("{}")
    res = CliRunner().invoke(cli, ["publish", "--config", str(release_copy), "--changelog", "v1"])
    assert res.exit_code == 1 and "Error: branch W4A16_GS32 fails check" in res.output
    assert not Path(cfg.publish_remote).exists()


def test_unknown_version_is_refused(release_copy):
    res = CliRunner().invoke(cli, ["publish", "--config", str(release_copy), "--changelog", "v7"])
    assert res.exit_code == 1 and "has no version 'v7'" in res.output
