"""glmrel check: a good branch passes; each corruption fails with its own message, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from release.architecture import Glm4MoeArch
from release.check import check_branch
from release.cli import cli
from release.manifest import Manifest, build_manifest, write_manifest
from release.serving.rules import servable_tp, serve_verdicts
from tests.test_architecture import GLM47

pytestmark = pytest.mark.slow


@pytest.fixture()
def branch(demo_release, tmp_path) -> Path:
    """A private copy of the demo's GS64 branch that a test may corrupt."""
    src = demo_release["config"].output_dir / "W4A16_GS64"
    dst = tmp_path / "W4A16_GS64"
    shutil.copytree(src, dst)
    write_manifest(dst)  # copying changed mtimes; sizes and hashes are the same
    return dst


def run_check(path: Path, *extra: str):
    res = CliRunner().invoke(cli, ["check", str(path), *extra], catch_exceptions=False)
    assert "Traceback" not in res.output
    return res


def failures(path: Path, **kw) -> list[str]:
    report = check_branch(path, **kw)
    assert not report.passed
    return [f"[{i.check}] {i.message}" for i in report.failures]


def rewrite_header(shard: Path, edit) -> None:
    """Apply `edit(header_dict)` and write the header back at the same length (space padded)."""
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n, "edited header must not grow"
    shard.write_bytes(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n :])


def test_demo_branches_pass(demo_release):
    cfg = demo_release["config"]
    for b in cfg.branches:
        res = run_check(cfg.output_dir / b.name)
        assert res.exit_code == 0, res.output
        assert res.output.startswith(f"{cfg.output_dir / b.name}: PASSED")


def test_json_report(branch):
    res = run_check(branch, "--json")
    data = json.loads(res.output)
    assert data["passed"] and data["group_size"] == 64 and data["tensors"] == 383
    assert {c["check"] for c in data["checks"]} == {
        "manifest",
        "verification",
        "evaluation",
        "config",
        "headers",
        "inventory",
    }
    # a branch `glmrel eval` never scored: the one check that did not run says so
    assert data["skipped"] == ["evaluation: no eval.json: task recovery was not measured (`glmrel eval`)"]


def test_check_does_not_import_torch(branch):
    code = (
        "import sys; from click.testing import CliRunner; from release.cli import cli;"
        f"r = CliRunner().invoke(cli, ['check', {str(branch)!r}, '--no-hash']);"
        "assert r.exit_code == 0, r.output;"
        "heavy = [m for m in ('torch', 'llmcompressor', 'transformers', 'compressed_tensors') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_truncated_shard(branch):
    shard = branch / "model.safetensors"
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    msgs = failures(branch, no_hash=True)
    assert any(
        "[headers] model.safetensors: tensor" in m and "truncated shard or out-of-range offsets" in m for m in msgs
    )
    assert any("[manifest] file model.safetensors is" in m for m in msgs)


def test_header_length_past_end_of_file(branch):
    shard = branch / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[:8] = (len(raw) + 10).to_bytes(8, "little")
    shard.write_bytes(bytes(raw))
    assert any("header length" in m and "runs past the end of the file" in m for m in failures(branch))


def test_absurdly_large_header(branch):
    shard = branch / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[:8] = (1 << 40).to_bytes(8, "little")
    shard.write_bytes(bytes(raw))
    assert any("is absurdly large" in m for m in failures(branch))


def test_header_not_json(branch):
    shard = branch / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[8:20] = b"this is not "
    shard.write_bytes(bytes(raw))
    assert any("header is not valid safetensors JSON" in m for m in failures(branch))


def test_overlapping_offsets(branch):
    def edit(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = h[names[0]], h[names[1]]
        size = b["data_offsets"][1] - b["data_offsets"][0]
        start = a["data_offsets"][0]
        b["data_offsets"] = [start, start + size]

    rewrite_header(branch / "model.safetensors", edit)
    assert any("overlap" in m for m in failures(branch, no_hash=True))


def test_out_of_range_offsets(branch):
    def edit(h):
        name = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        b, e = h[name]["data_offsets"]
        h[name]["data_offsets"] = [b + 50_000_000, e + 50_000_000]  # past the ~10 MB data region, same digits

    rewrite_header(branch / "model.safetensors", edit)
    assert any("ends at byte" in m and "out-of-range" in m for m in failures(branch, no_hash=True))


def test_wrong_dtype_and_shape(branch):
    name = "model.layers.1.mlp.experts.0.up_proj.weight_scale"

    def edit(h):
        t = h[name]
        assert t["dtype"] == "F32"
        t["dtype"], t["shape"] = "F16", [t["shape"][0], t["shape"][1] * 2]  # same bytes, wrong tensor

    rewrite_header(branch / "model.safetensors", edit)
    msgs = failures(branch, no_hash=True)
    assert f"[inventory] tensor {name} is F16[128, 8], expected F32[128, 4]" in msgs


def test_file_changed_after_manifest(branch):
    p = branch / "tokenizer.json"
    data = bytearray(p.read_bytes())
    data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\t")
    p.write_bytes(bytes(data))
    msgs = failures(branch)
    assert (
        "[manifest] file tokenizer.json has a different sha256 than the manifest (changed after the manifest was written)"
        in msgs
    )
    assert run_check(branch, "--no-hash").exit_code == 0  # same size: only the hash can tell


def test_index_naming_a_shard_outside_the_folder(branch):
    idx = branch / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = "../elsewhere.safetensors"
    idx.write_text(json.dumps(data))
    write_manifest(branch)
    msgs = failures(branch)
    assert (
        "[files] model.safetensors.index.json names shard '../elsewhere.safetensors' outside the branch folder" in msgs
    )


def test_symlink_pointing_out(branch, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    os.symlink(outside, branch / "notes.txt")
    msgs = failures(branch)
    assert f"[files] notes.txt is a symbolic link (to {outside}); a branch holds regular files only" in msgs


def test_linked_config_files_are_refused_once_and_never_followed(branch, tmp_path):
    """config.json and tokenizer_config.json replaced by links to files outside the branch (the
    same bytes): each is one failure, not also "missing", and neither target is read: no config
    check runs on the outside file, and its chat template does not count as the branch's."""
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        shutil.move(branch / name, outside / name)
        os.symlink(outside / name, branch / name)
    tok = json.loads((outside / "tokenizer_config.json").read_text())
    tok["chat_template"] = "{{ messages }}"
    (outside / "tokenizer_config.json").write_text(json.dumps(tok))
    (branch / "chat_template.jinja").unlink(missing_ok=True)
    report = check_branch(branch, no_hash=True)
    msgs = [f"[{i.check}] {i.message}" for i in report.failures]
    for name in ("config.json", "tokenizer_config.json"):
        said = [m for m in msgs if m.startswith(f"[files] {name} ")]
        assert said == [f"[files] {name} is a symbolic link (to {outside / name}); a branch holds regular files only"]
    assert not any("is missing" in m for m in msgs), msgs
    assert "[files] no chat template (chat_template.jinja or tokenizer_config.json's chat_template)" in msgs
    assert not [i for i in report.items if i.check == "config"], "the linked config.json was read"


def test_symlinked_shard_is_one_failure_not_a_flood(branch, tmp_path):
    """A shard replaced by a link (even to its own bytes) is refused once; the tensors the index
    maps to it are said not to be checked, once, instead of missing one line each."""
    real = tmp_path / "elsewhere.safetensors"
    shutil.move(branch / "model.safetensors", real)
    os.symlink(real, branch / "model.safetensors")
    msgs = failures(branch, no_hash=True)
    assert msgs[0] == (
        f"[files] model.safetensors is a symbolic link (to {real}); a branch holds regular files only"
    ), msgs
    assert not any("maps tensor" in m or "missing tensor" in m or "which is missing" in m for m in msgs), msgs
    report = check_branch(branch, no_hash=True)
    skipped = [i.message for i in report.skipped if i.check == "inventory"]
    assert len(skipped) == 1 and skipped[0].endswith(
        "tensors model.safetensors.index.json maps to model.safetensors: not checked, it is not a regular file of the branch"
    ), skipped
    assert msgs == msgs[:1], "the link is the one failure: not also missing from the manifest or the index"


def test_a_linked_single_shard_without_index_is_one_failure(branch, tmp_path):
    """A branch of one shard and no index (as small third-party branches are): the shard a link,
    said once, and its tensors not checked, never 'no weights' and a line per tensor."""
    index = json.loads((branch / "model.safetensors.index.json").read_text())["weight_map"]
    (branch / "model-mtp-4.safetensors").unlink()
    (branch / "model.safetensors.index.json").unlink()
    real = tmp_path / "elsewhere.safetensors"
    shutil.move(branch / "model.safetensors", real)
    os.symlink(real, branch / "model.safetensors")
    assert index
    report = check_branch(branch, no_hash=True)
    msgs = [f"[{i.check}] {i.message}" for i in report.failures]
    assert any(m.startswith("[files] model.safetensors is a symbolic link") for m in msgs), msgs
    assert not any("no *.safetensors" in m or "missing tensor" in m for m in msgs), msgs
    assert [i.message for i in report.skipped if i.check == "inventory"] == [
        "the tensors: not checked, the only shard model.safetensors could not be read"
    ]


def test_unreadable_or_missing_shard_header_lists_its_tensors_once(branch):
    shard = branch / "model-mtp-4.safetensors"
    shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])
    report = check_branch(branch, no_hash=True)
    msgs = [f"[{i.check}] {i.message}" for i in report.failures]
    assert any(m.startswith("[headers] model-mtp-4.safetensors: header length") for m in msgs), msgs
    assert not any("maps tensor" in m or "missing tensor" in m or "MTP layer is missing" in m for m in msgs), msgs
    assert [i.message.split(" ", 1)[1] for i in report.skipped if i.check == "inventory"] == [
        "tensors model.safetensors.index.json maps to model-mtp-4.safetensors: not checked, its header cannot be read"
    ]
    # the shard that was read is still checked tensor by tensor
    assert any(i.check == "inventory" and i.ok and "of the shards that were read" in i.message for i in report.items)
    shard.unlink()
    msgs = failures(branch, no_hash=True)
    assert "[files] model.safetensors.index.json names shard model-mtp-4.safetensors which is missing" in msgs
    assert not any("maps tensor" in m or "missing tensor" in m for m in msgs), msgs


def test_linked_branch_folder_is_named_a_link(branch, tmp_path):
    link = tmp_path / "b4"
    os.symlink(branch, link)
    res = CliRunner().invoke(cli, ["check", str(link)])
    assert res.exit_code == 1, res.output
    assert f"Error: {link} is a symbolic link (to {branch}), not a branch folder" in res.output
    assert "Hint: pass the branch folder itself" in res.output


def test_config_without_quantization_config(branch):
    cfg = json.loads((branch / "config.json").read_text())
    del cfg["quantization_config"]
    (branch / "config.json").write_text(json.dumps(cfg))
    write_manifest(branch)
    msgs = failures(branch)
    assert "[config] config.json has no quantization_config (is this an unquantized checkpoint?)" in msgs


def test_group_size_that_does_not_match_the_branch(branch):
    assert "[config] config_groups.group_0.weights.group_size is 64, but the branch is GS32" in failures(
        branch, group_size=32
    )


def test_missing_and_stray_shards(branch):
    (branch / "model-mtp-4.safetensors").rename(branch / "stray.safetensors")
    msgs = failures(branch)
    assert "[files] model.safetensors.index.json names shard model-mtp-4.safetensors which is missing" in msgs
    assert "[files] shard stray.safetensors is not referenced by model.safetensors.index.json (stray shard)" in msgs


def test_dropped_mtp_layer_is_caught(branch):
    (branch / "model-mtp-4.safetensors").unlink()
    idx = branch / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if not k.startswith("model.layers.4.")}
    idx.write_text(json.dumps(data))
    write_manifest(branch)
    msgs = failures(branch)
    assert msgs[0].startswith("[inventory] the MTP layer is missing: none of its ")
    assert "tensors (model.layers.4.*) is in the branch" in msgs[0]
    assert not any("missing tensor model.layers.4." in m for m in msgs), "one summary, not a line a tensor"


def test_leftover_dense_weight_and_fused_experts(branch):
    def edit(h):
        h["model.layers.1.self_attn.q_proj.weight"] = h.pop("model.layers.1.self_attn.q_norm.weight")
        h["model.layers.2.mlp.experts.down_proj_x"] = h.pop("model.layers.2.self_attn.k_norm.weight")  # same length

    rewrite_header(branch / "model.safetensors", edit)
    idx = branch / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["model.layers.1.self_attn.q_proj.weight"] = data["weight_map"].pop(
        "model.layers.1.self_attn.q_norm.weight"
    )
    data["weight_map"]["model.layers.2.mlp.experts.down_proj_x"] = data["weight_map"].pop(
        "model.layers.2.self_attn.k_norm.weight"
    )
    idx.write_text(json.dumps(data))
    msgs = failures(branch, no_hash=True)
    assert (
        "[inventory] tensor model.layers.1.self_attn.q_proj.weight is a dense weight left beside the packed one of a quantized module"
        in msgs
    )
    assert any("model.layers.2.mlp.experts.down_proj_x is a fused expert tensor" in m for m in msgs)


def test_not_a_folder_is_a_clean_error(tmp_path):
    res = CliRunner().invoke(cli, ["check", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "Error:" in res.output and "Hint:" in res.output


# ---------------------------------------------------------------- manifests


def test_manifest_reuses_hashes_of_unchanged_files(branch, monkeypatch):
    import release.manifest as manifest_mod

    first = Manifest.load(branch / "manifest.json")
    hashed: list[str] = []
    real = manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    (branch / "recipe.yaml").write_text((branch / "recipe.yaml").read_text() + "# edited\n")
    second = build_manifest(branch)
    assert hashed == ["recipe.yaml"]
    assert second.files["model.safetensors"] == first.files["model.safetensors"]
    assert second.files["recipe.yaml"].sha256 != first.files["recipe.yaml"].sha256


# ---------------------------------------------------------------- vLLM rules at GLM-4.7 size


def test_glm47_group_checks_at_tp8():
    """(1536 / 8) = 192 inputs per rank for the routed experts and the shared expert's down_proj:
    whole groups of 32 and 64, not of 128 (vLLM 0.33.0 refuses both layers at GS128)."""
    arch = Glm4MoeArch.from_config(GLM47)
    for gs in (32, 64, 128):
        v = next(
            x for x in serve_verdicts(arch, gs) if x.tp == 8 and not x.expert_parallel and x.target.startswith("Hopper")
        )
        layers = {layer.layer: layer for layer in v.layers}
        assert v.servable == (gs != 128)
        if gs == 128:
            assert "192 % group size 128" in layers["routed experts"].rule
            assert "enable expert parallelism" in layers["routed experts"].rule
            assert "Consider reducing tensor_parallel_size" in layers["shared_experts down_proj"].rule
        else:  # Machete takes no group 32 (nor 192 inputs at group 64 with out % 128 ok): Humming on SM90
            assert layers["shared_experts down_proj"].kernel == ("Machete" if gs == 64 else "Humming")


def test_a_refused_tensor_parallel_size_gets_a_layout_on_the_same_gpus():
    from release.serving.rules import serving_layout

    arch = Glm4MoeArch.from_config(GLM47)
    assert serving_layout(serve_verdicts(arch, 128), 8) == (4, 2)  # TP8 refused: TP4 x PP2
    assert serving_layout(serve_verdicts(arch, 64), 8) == (8, 1)
    assert serving_layout(serve_verdicts(arch, 64), 16) == (8, 2)


def test_glm47_servable_sizes_follow_vllm_rules():
    arch = Glm4MoeArch.from_config(GLM47)
    for target in ("Hopper SM90 (H100/H200)", "Ampere SM80 (A100)"):
        sizes = {gs: servable_tp(serve_verdicts(arch, gs), target=target) for gs in (32, 64, 128)}
        # vLLM 0.33.0: Marlin pads tiles, Humming and TritonW4A16 take any group that fits, so only
        # whole groups per rank decide: 1536 / TP inputs per rank (96 at TP16)
        assert sizes == {32: [1, 2, 4, 8, 16], 64: [1, 2, 4, 8], 128: [1, 2, 4]}, target
        ep = {gs: servable_tp(serve_verdicts(arch, gs), target=target, expert_parallel=True) for gs in (32, 64, 128)}
        assert ep == sizes  # EP keeps experts whole, but the shared expert stays tensor-parallel


def test_committed_manifests_pass_and_a_mislabelled_one_fails(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    committed = sorted((repo / "manifests" / "demo").glob("*.json"))
    assert len(committed) == 3
    assert CliRunner().invoke(cli, ["check-manifest", *map(str, committed)]).exit_code == 0
    data = json.loads((repo / "manifests" / "demo" / "W4A16_GS64.json").read_text())
    data["branch"] = "W4A16_GS32"
    bad = tmp_path / "W4A16_GS32.json"
    bad.write_text(json.dumps(data))
    res = CliRunner().invoke(cli, ["check-manifest", str(bad)])
    assert res.exit_code == 1
    assert "[quantization] group_size is 64, but the branch is GS32" in res.output


def test_check_manifest_refuses_a_linked_manifest_and_entries_outside_the_branch(tmp_path):
    """CI's light job reads the committed manifests: one that is a link is refused unread (it
    would have CI read whatever it points to), and an entry that names a path (../../etc/passwd)
    or a hidden file is said to be no file of the branch."""
    repo = Path(__file__).resolve().parent.parent
    outside = tmp_path / "outside.json"
    outside.write_text((repo / "manifests" / "demo" / "W4A16_GS64.json").read_text())
    link = tmp_path / "W4A16_GS64.json"
    link.symlink_to(outside)
    res = CliRunner().invoke(cli, ["check-manifest", str(link)])
    assert res.exit_code == 1
    assert f"[manifest] {link} is a symbolic link (to {outside}); commit the manifest file itself" in res.output
    assert "[quantization]" not in res.output, "the link's target was read"
    data = json.loads(outside.read_text())
    entry = data["files"].pop("README.md")
    data["files"]["../../etc/passwd"] = entry
    data["files"][".hidden"] = entry
    bad = tmp_path / "bad" / "W4A16_GS64.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps(data))
    res = CliRunner().invoke(cli, ["check-manifest", str(bad)])
    assert res.exit_code == 1
    for name in ("../../etc/passwd", ".hidden"):
        assert f"[manifest] entry {name!r} is not a file of the branch folder (a path or a hidden name)" in res.output


def test_check_manifest_names_an_unreadable_manifest_and_its_fix(tmp_path):
    """A manifest that is binary, broken JSON, missing, a folder or a FIFO: one FAIL line each
    that names the problem and the fix, exit 1, and no hang on the FIFO (it is never opened).
    Binary bytes used to end in "unexpected UnicodeDecodeError"."""
    import os

    binary = tmp_path / "binary.json"
    binary.write_bytes(bytes([0xBA, 0x00, 0xFF]) * 20)
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema":\n')
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    cases = {
        binary: "is not UTF-8 text (byte 0 is b'\\xba'); rebuild it with `glmrel manifest BRANCH_FOLDER`",
        broken: "is not valid JSON (line 2, column 1: Expecting value); rebuild it with",
        tmp_path / "nope.json": "does not exist; write it with `glmrel manifest BRANCH_FOLDER`",
        folder: "is a folder, not a manifest file; pass the manifest's JSON file",
        fifo: "is not a regular file; rebuild it with",
    }
    for path, expected in cases.items():
        res = CliRunner().invoke(cli, ["check-manifest", str(path)])
        assert res.exit_code == 1, res.output
        assert f"FAIL [manifest] manifest {path} {expected}" in res.output, res.output
        assert "unexpected" not in res.output


def test_fused_experts_are_diagnosed_before_the_missing_tensors(branch):
    """Experts stored fused (transformers' in-memory layout): one diagnosis first, then a
    count of the per-expert tensors it explains, not 50 lines of symptoms."""
    import torch
    from safetensors.torch import load_file, save_file

    shard = branch / "model.safetensors"
    sd = load_file(shard)
    for layer in (1, 2, 3):
        p = f"model.layers.{layer}.mlp.experts."
        for k in [k for k in sd if k.startswith(p)]:
            del sd[k]
        sd[p + "gate_up_proj"] = torch.zeros(8, 256, 256, dtype=torch.float32)
        sd[p + "down_proj"] = torch.zeros(8, 256, 128, dtype=torch.float32)
    save_file(sd, shard, metadata={"format": "pt"})
    idx = branch / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if v != "model.safetensors"}
    data["weight_map"].update({k: "model.safetensors" for k in sd})
    idx.write_text(json.dumps(data))
    write_manifest(branch)
    report = check_branch(branch)
    first = report.failures[0]
    assert first.check == "inventory" and first.message.startswith("the routed experts are stored fused (6 tensors")
    assert any(f.message.startswith("missing 216 per-expert tensors (mlp.experts.{e}.*)") for f in report.failures)
    assert not any(f.message.startswith("missing tensor model.layers.1.mlp.experts.") for f in report.failures)
    assert len(report.failures) < 20


def test_a_config_group_size_that_disagrees_with_the_scales(demo_release, tmp_path):
    """The folder name gives no group size: the config says 256, the scales say 128. Said
    first, 256 flagged as unsupported, and the inventory read at the scales' group size."""
    dst = tmp_path / "someones-branch"
    shutil.copytree(demo_release["config"].output_dir / "W4A16_GS128", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 256
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    write_manifest(dst)
    report = check_branch(dst)
    msgs = [f.message for f in report.failures]
    assert msgs[0].startswith("config.json says group_size 256, the scales say 128")
    assert msgs[1].startswith("group_size 256 is not one glmrel builds and checks (-1, 32, 64, 128)")
    assert not any("weight_scale is" in m for m in msgs), "no shape mismatch lines"
    assert report.group_size == 128


def _strip_records(folder: Path) -> None:
    for name in ("recipe.yaml", "provenance.json", "manifest.json", "verify.json"):
        (folder / name).unlink()


def test_a_third_party_branch_is_checked_for_what_applies(branch):
    _strip_records(branch)
    res = run_check(branch)
    assert res.exit_code == 1
    assert "FAIL [records] none of glmrel's records" in res.output.splitlines()[1]
    assert "--third-party" in res.output
    res = run_check(branch, "--third-party")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].endswith("PASSED (1287 tensors in 2 shards)") or "PASSED" in lines[0]
    for skipped in (
        "skip [records] skipped:",
        "skip [manifest] skipped:",
        "skip [verification] skipped:",
        "skip [evaluation] skipped:",
    ):
        assert any(skipped in line for line in lines), (skipped, res.output)
    doc = json.loads(run_check(branch, "--third-party", "--json").output)
    assert doc["passed"] and len(doc["skipped"]) == 4


def test_binary_bytes_in_a_branch_record_are_named_not_unexpected(branch, demo_assets, tmp_path):
    """Bytes that are not UTF-8 where a JSON record belongs (the index, the base's config, a
    branch record render reads, the held-out texts): each named as unreadable, with a hint, or
    taken as absent where an absent record is already handled (rebuilt, re-verified); never
    "unexpected UnicodeDecodeError", which check's index reading raised."""
    from release.build.branch_folder import branch_is_current, recorded_pass
    from release.build.pipeline import _verification_of_this_content
    from release.errors import ReleaseError
    from release.layout import INDEX_FILE as INDEX
    from release.manifest import quantization_summary
    from release.render import _read_json

    junk = bytes([0xBA, 0xE8, 0xFF, 0x00]) * 25
    (branch / INDEX).write_bytes(junk)
    res = run_check(branch)
    assert res.exit_code == 1 and "unexpected" not in res.output
    assert f"FAIL [files] {INDEX} is unreadable or has no weight_map (UnicodeDecodeError: " in res.output

    for name in ("provenance.json", "verify.json", "config.json"):
        (branch / name).write_bytes(junk)
    assert recorded_pass(branch) is None and branch_is_current(branch, "any") is False
    assert _verification_of_this_content(branch) is None and quantization_summary(branch) == {}
    with pytest.raises(ReleaseError, match="verify.json is not readable JSON") as e:
        _read_json(branch, "verify.json")
    assert "build-all --force" in e.value.hint
    with pytest.raises(ReleaseError, match="config.json is not readable JSON") as e:
        Glm4MoeArch.from_dir(branch)
    assert e.value.hint

    from release.config import load_config
    from release.verify.branch import load_heldout

    heldout = tmp_path / "heldout.json"
    heldout.write_bytes(junk)
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")
    cfg = cfg.model_copy(update={"verify": cfg.verify.model_copy(update={"heldout": heldout})})
    with pytest.raises(ReleaseError, match="is not a readable JSON list") as e:
        load_heldout(cfg)
    assert "UTF-8 JSON list" in e.value.hint
