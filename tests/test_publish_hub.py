"""glmrel publish (Hub backend) and check --remote, through the real HfApi client pointed at
the loopback Hub double in tests/hub_double.py."""

from __future__ import annotations

import shutil

import huggingface_hub.constants as hf_constants
import pytest
import yaml
from click.testing import CliRunner
from hub_double import HubDouble
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from release.cli import cli
from release.config import load_config
from release.errors import ReleaseError
from release.manifest import MANIFEST_FILE, release_files, write_manifest
from release.publish import apply_plan, plan_publish, verify_published

TOKEN = "hf_glmrel_test_token_never_printed"
REPO = "glmrel-test/tiny-glm4moe-W4A16"
BRANCHES = ("W4A16_GS32", "W4A16_GS64", "W4A16_GS128")


@pytest.fixture()
def hub(monkeypatch):
    """The double on loopback, HfApi pointed at it, a token in HF_TOKEN, Xet off."""
    with HubDouble(TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        yield server


def api(hub: HubDouble) -> HfApi:
    return HfApi(endpoint=hub.url, token=TOKEN)


# ---------------------------------------------------------------- the double is strict


def test_double_rejects_what_the_hub_rejects(hub, tmp_path):
    a = api(hub)
    a.create_repo(REPO)
    head = a.list_repo_refs(REPO).branches[0].target_commit
    small = CommitOperationAdd("notes.txt", b"hello\n")
    with pytest.raises(HfHubHTTPError) as e:
        a.create_commit(REPO, [small], commit_message="x", revision="no-such-branch")
    assert e.value.response.status_code == 404, "commits never create branches"
    a.create_commit(REPO, [CommitOperationAdd("a.txt", b"a\n")], commit_message="moves main")
    with pytest.raises(HfHubHTTPError) as e:
        a.create_commit(REPO, [small], commit_message="x", parent_commit=head)
    assert e.value.response.status_code == 412, "a stale parent_commit fails"
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * (10 * 1024 * 1024 + 1))
    op = CommitOperationAdd("big.txt", str(big))
    op._upload_mode = "regular"  # a client that skipped preupload: the Hub still refuses it
    from huggingface_hub._commit_api import _send_commit

    with pytest.raises(HfHubHTTPError) as e:
        _send_commit(
            operations=[op],
            files_to_copy={},
            commit_message="x",
            commit_description=None,
            repo_type="model",
            repo_id=REPO,
            headers={"authorization": f"Bearer {TOKEN}"},
            revision="main",
            endpoint=hub.url,
        )
    assert e.value.response.status_code == 400 and "10 MiB" in str(e.value)
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=hub.url, token="wrong").create_branch(REPO, branch="b")
    assert e.value.response.status_code == 401
    a.create_tag(REPO, tag="t1")
    with pytest.raises(HfHubHTTPError) as e:
        a.create_tag(REPO, tag="t1")
    assert e.value.response.status_code == 409


# ---------------------------------------------------------------- publish through it


@pytest.fixture()
def hub_release(release_copy, hub):
    """The demo build copied (so a test may change it) with publish_remote on the double."""
    raw = yaml.safe_load(release_copy.read_text())
    raw["publish_remote"] = f"hf://{REPO}"
    release_copy.write_text(yaml.safe_dump(raw, sort_keys=False))
    return release_copy


def publish(config, *extra):
    return CliRunner().invoke(cli, ["publish", "--config", str(config), "--changelog", "v1", *extra])


def expected_files(folder, name):
    files = {p.name: p.read_bytes() for p in release_files(folder)}
    if name != "main":
        files[MANIFEST_FILE] = (folder / MANIFEST_FILE).read_bytes()
    return files


@pytest.mark.slow
def test_hub_publish_end_to_end(hub_release, hub):
    cfg = load_config(hub_release)
    res = publish(hub_release, "--dry-run")
    assert res.exit_code == 0, res.output
    assert f"publish v1 -> hf://{REPO} (hub)" in res.output
    n = len(release_files(cfg.output_dir / "W4A16_GS32")) + 1  # and its manifest
    assert n >= 16 and f"W4A16_GS32: create branch from the initial commit; {n} to add" in res.output
    assert REPO not in hub.state.repos, "a dry run writes nothing"

    res = publish(hub_release)
    assert res.exit_code == 0, res.output
    assert "all revisions verified" in res.output
    assert "checked on the Hub (`check --remote`)" in res.output
    assert TOKEN not in res.output

    repo = hub.state.repos[REPO]
    attrs = hub.files(REPO, "main")[".gitattributes"]
    init = next(c for c in repo.commits.values() if c.parent is None)
    for name in (*BRANCHES, "main"):
        published = hub.files(REPO, name)
        assert published.pop(".gitattributes") == attrs
        assert published == expected_files(cfg.output_dir / name, name), name
        head = repo.commits[repo.branches[name]]
        assert head.parent == init.oid, f"{name} is one commit on the repo's initial commit"
        assert head.title.startswith("tiny-GLM-4-MoE-W4A16 v1: First release")
        assert "MoE-aware AWQ calibration" in head.message, "the changelog entry is the commit description"
    assert (
        "README.md" not in hub.files(REPO, "W4A16_GS64")
        or hub.files(REPO, "W4A16_GS64")["README.md"] != (cfg.output_dir / "main" / "README.md").read_bytes()
    ), "quant branches do not inherit the landing page"
    assert repo.tags["v1"][0] == repo.branches["main"]
    for b in BRANCHES:
        assert repo.tags[f"v1-{b}"][0] == repo.branches[b]
    tree = {f.path: f for f in api(hub).list_repo_tree(REPO, revision="W4A16_GS64")}
    assert tree["model.safetensors"].lfs is not None, "weights are LFS objects"
    assert tree["config.json"].lfs is None

    commits, uploads = hub.state.commits_made, len(hub.state.lfs_uploads)
    res = publish(hub_release)
    assert res.exit_code == 0 and "nothing to do" in res.output, res.output
    assert (hub.state.commits_made, len(hub.state.lfs_uploads)) == (commits, uploads), "a second run does nothing"

    for rev in ("W4A16_GS32", "v1-W4A16_GS128"):
        res = CliRunner().invoke(cli, ["check", "--remote", REPO, "--revision", rev])
        assert res.exit_code == 0, res.output
        assert "PASSED" in res.output


@pytest.mark.slow
def test_hub_changed_card_uploads_only_that_file(hub_release, hub):
    cfg = load_config(hub_release)
    plan, backend = plan_publish(cfg, "v1")
    # publish v1 without tags so a later change is still publishable under v1
    plan.tags = []
    apply_plan(plan, backend, echo=lambda s: None)
    card = cfg.output_dir / "W4A16_GS64" / "README.md"
    card.write_text(card.read_text() + "\nA later fix to the card.\n")
    write_manifest(cfg.output_dir / "W4A16_GS64")
    uploads = len(hub.state.lfs_uploads)
    plan, backend = plan_publish(cfg, "v1")
    changed = {b.name: [c.path for c in b.changes] for b in plan.branches if not b.up_to_date}
    assert changed == {"W4A16_GS64": ["README.md", MANIFEST_FILE]}
    before = hub.state.repos[REPO].branches["W4A16_GS64"]
    apply_plan(plan, backend, echo=lambda s: None)
    assert len(hub.state.lfs_uploads) == uploads, "no weight is uploaded again"
    repo = hub.state.repos[REPO]
    assert repo.commits[repo.branches["W4A16_GS64"]].parent == before
    assert all(r.passed for r in verify_published(cfg, backend, "v1"))


@pytest.mark.slow
def test_hub_interrupted_publish_resumes_without_reuploading(hub_release, hub):
    cfg = load_config(hub_release)
    hub.state.fail_uploads_after = 2
    res = publish(hub_release)
    assert res.exit_code == 1
    assert "publishing W4A16_GS32 stopped before its commit" in res.output
    assert "run the same `glmrel publish` again" in res.output
    repo = hub.state.repos[REPO]
    init = repo.branches["main"]
    assert repo.branches.get("W4A16_GS32") in (None, init), "no partial branch looks complete"
    assert not repo.tags
    done = list(hub.state.lfs_uploads)
    assert len(done) == 2
    hub.state.fail_uploads_after = None
    res = publish(hub_release)
    assert res.exit_code == 0, res.output
    assert len(hub.state.lfs_uploads) == len(set(hub.state.lfs_uploads)), "no LFS object was uploaded twice"
    assert set(done) <= set(hub.state.lfs_uploads)
    assert all(r.passed for r in verify_published(cfg, plan_publish(cfg, "v1")[1], "v1"))


@pytest.mark.slow
def test_hub_concurrent_publisher_fails_loudly(hub_release, hub):
    cfg = load_config(hub_release)
    assert publish(hub_release).exit_code == 0
    card = cfg.output_dir / "main" / "README.md"
    card.write_text(card.read_text() + "\nEdited.\n")
    with pytest.raises(ReleaseError, match="tag v1 already exists"):
        plan_publish(cfg, "v1")[0].refuse_conflicts()
    # someone else commits to main between our plan and our commit
    raw = yaml.safe_load(hub_release.read_text())
    log = yaml.safe_load(open(raw["changelog"]).read())
    log.append({"version": "v2", "summary": "Card fix.", "changes": ["Edited the landing page."]})
    changelog = hub_release.parent / "changelog.yaml"
    changelog.write_text(yaml.safe_dump(log, sort_keys=False))
    raw["changelog"] = str(changelog)
    hub_release.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(hub_release)
    plan, backend = plan_publish(cfg, "v2")
    api(hub).create_commit(REPO, [CommitOperationAdd("NOTICE", b"someone else\n")], commit_message="other")
    theirs = hub.state.repos[REPO].branches["main"]
    with pytest.raises(ReleaseError) as e:
        apply_plan(plan, backend, echo=lambda s: None)
    assert "the remote's branch main moved since the plan" in e.value.message
    assert hub.state.repos[REPO].branches["main"] == theirs, "their commit was kept"
    assert "v2" not in hub.state.repos[REPO].tags


def test_hub_publish_without_token_is_refused(write_config, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    cfg = load_config(write_config())
    from release.publish import open_remote

    with pytest.raises(ReleaseError) as e:
        open_remote(f"hf://{REPO}", tmp_path / "cache")
    assert "no Hugging Face token" in e.value.message and "HF_TOKEN" in (e.value.hint or "")
    assert cfg  # the config itself is fine


@pytest.mark.parametrize("bad", ["hf://justaname", "hf://a/b/c", "hf://owner/", "hf://../x", "hf://o/n.git"])
def test_hub_repo_id_must_be_owner_name(bad, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    from release.publish import open_remote

    with pytest.raises(ReleaseError) as e:
        open_remote(bad, tmp_path / "cache")
    assert "is not a Hub repo id of the form owner/name" in e.value.message


def test_check_remote_errors(hub):
    res = CliRunner().invoke(cli, ["check", "--remote", "nobody/nothing", "--revision", "main"])
    assert res.exit_code == 1 and "repository nobody/nothing was not found" in res.output
    api(hub).create_repo(REPO)
    res = CliRunner().invoke(cli, ["check", "--remote", REPO, "--revision", "W4A16_GS64"])
    assert res.exit_code == 1 and f"{REPO} has no revision W4A16_GS64" in res.output
    res = CliRunner().invoke(cli, ["check", "--remote", REPO])
    assert res.exit_code == 1 and "--remote needs --revision" in res.output
    res = CliRunner().invoke(cli, ["check"])
    assert res.exit_code == 1 and "exactly one of PATH or --remote" in res.output


@pytest.mark.slow
def test_check_remote_catches_a_tampered_revision(hub_release, hub):
    assert publish(hub_release).exit_code == 0
    folder = load_config(hub_release).output_dir / "W4A16_GS64"
    config = (folder / "config.json").read_bytes()
    assert b'"group_size": 64' in config
    weights = bytearray((folder / "model-mtp-4.safetensors").read_bytes())
    weights[-1] ^= 0xFF  # same size, header intact: only the LFS sha256 can tell
    a = api(hub)
    a.create_branch(REPO, branch="tampered", revision="W4A16_GS64")
    a.create_commit(
        REPO,
        [
            CommitOperationAdd("config.json", config.replace(b'"group_size": 64', b'"group_size": 32')),
            CommitOperationAdd("model-mtp-4.safetensors", bytes(weights)),
        ],
        commit_message="x",
        revision="tampered",
    )
    res = CliRunner().invoke(cli, ["check", "--remote", REPO, "--revision", "tampered", "--group-size", "64"])
    assert res.exit_code == 1
    assert "file config.json has a different sha256 than the manifest" in res.output
    assert "file model-mtp-4.safetensors has a different sha256 than the manifest" in res.output
    assert "group_size" in res.output


@pytest.mark.slow
def test_a_wrong_token_is_one_clear_error(hub_release, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_never_printed")
    res = publish(hub_release)
    assert res.exit_code == 1
    assert "Error: the Hub rejected the token (401 Unauthorized) while creating the repo" in res.output
    assert "Hint: set HF_TOKEN to a valid token" in res.output
    assert "hf_wrong_token_never_printed" not in res.output and "Traceback" not in res.output
    assert REPO not in hub.state.repos


@pytest.mark.slow
def test_an_unreachable_hub_is_one_clear_error(hub_release, monkeypatch):
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    res = publish(hub_release, "--dry-run")
    assert res.exit_code == 1
    assert "Error: cannot reach the Hub at" in res.output and "ConnectError" in res.output
    assert "Hint: check the network, any proxy, and HF_ENDPOINT" in res.output
    assert TOKEN not in res.output and "Traceback" not in res.output


@pytest.mark.slow
def test_check_remote_third_party_branch(hub, demo_release, tmp_path):
    """Someone else's branch on the Hub (no glmrel records): every check that applies, the rest skipped."""
    folder = tmp_path / "W4A16_GS128"
    shutil.copytree(demo_release["config"].output_dir / "W4A16_GS128", folder)
    for name in ("recipe.yaml", "provenance.json", "manifest.json", "verify.json"):
        (folder / name).unlink()
    a = api(hub)
    a.create_repo("someone/GLM-4.7_Compressed-Tensors")
    a.create_branch("someone/GLM-4.7_Compressed-Tensors", branch="W4A16_GS128")
    a.upload_folder(repo_id="someone/GLM-4.7_Compressed-Tensors", folder_path=folder, revision="W4A16_GS128")
    args = ["check", "--remote", "someone/GLM-4.7_Compressed-Tensors", "--revision", "W4A16_GS128"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "--third-party" in res.output
    res = CliRunner().invoke(cli, [*args, "--third-party"])
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output.splitlines()[0]
    assert res.output.count("skipped:") == 4


@pytest.mark.slow
def test_a_symlink_is_never_uploaded_to_the_hub(hub_release, hub):
    (load_config(hub_release).output_dir / "main" / "x.txt").symlink_to("/etc/passwd")
    res = publish(hub_release)
    assert res.exit_code == 1 and "x.txt" in res.output and "symbolic link" in res.output and "Hint:" in res.output
    assert REPO not in hub.state.repos, "nothing was published"
