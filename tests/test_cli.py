"""The CLI's contract: help everywhere, and one clear error (exit 1, nothing written) for bad input."""

import json
import shutil

import pytest
from click.testing import CliRunner

from release.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_every_command_has_help():
    res = run("--help")
    assert res.exit_code == 0
    for name, cmd in cli.commands.items():
        assert cmd.help and len(cmd.help.strip()) > 20, name
        sub = run(name, "--help")
        assert sub.exit_code == 0, (name, sub.output)
        assert sub.output.startswith(f"Usage: cli {name} [OPTIONS]"), (name, sub.output[:80])


def _assert_clean_failure(res, message, out_dir):
    assert res.exit_code == 1, res.output
    assert f"Error: {message}" in res.output
    assert "Hint:" in res.output
    assert "Traceback" not in res.output
    leftovers = list(out_dir.iterdir()) if out_dir.exists() else []
    assert leftovers == [], f"partial output left: {leftovers}"


@pytest.fixture()
def fake_model(tmp_path, demo_assets):
    """A copy of the demo model folder that a test may break."""
    d = tmp_path / "model"
    shutil.copytree(demo_assets.model, d)
    return d


def test_unknown_branch(write_config, tmp_path):
    res = run("quantize", "--config", write_config(), "--branch", "W4A16_GS16")
    _assert_clean_failure(res, "unknown branch 'W4A16_GS16'", tmp_path / "out")


def test_typo_in_config(write_config, tmp_path):
    res = run("quantize", "--config", write_config({"calibration.num_sample": 4}), "--branch", "W4A16_GS32")
    _assert_clean_failure(res, "invalid config", tmp_path / "out")
    assert "calibration.num_sample: unknown field (typo?)" in res.output


def test_missing_model_folder(write_config, tmp_path):
    res = run(
        "quantize", "--config", write_config({"base_model.path": str(tmp_path / "nope")}), "--branch", "W4A16_GS32"
    )
    _assert_clean_failure(res, f"base model folder {tmp_path / 'nope'} does not exist", tmp_path / "out")


def test_unreadable_model_folder(write_config, tmp_path):
    (tmp_path / "empty").mkdir()
    res = run(
        "quantize", "--config", write_config({"base_model.path": str(tmp_path / "empty")}), "--branch", "W4A16_GS32"
    )
    _assert_clean_failure(res, f"{tmp_path / 'empty'} has no config.json", tmp_path / "out")


def test_not_a_glm4_moe_model(write_config, fake_model, tmp_path):
    cfg = json.loads((fake_model / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (fake_model / "config.json").write_text(json.dumps(cfg))
    res = run("quantize", "--config", write_config({"base_model.path": str(fake_model)}), "--branch", "W4A16_GS32")
    _assert_clean_failure(
        res,
        f"{fake_model / 'config.json'} describes model_type='llama' ['LlamaForCausalLM'], not a GLM-4-MoE model",
        tmp_path / "out",
    )


def test_group_size_that_does_not_divide(write_config, fake_model, tmp_path):
    cfg = json.loads((fake_model / "config.json").read_text())
    cfg["moe_intermediate_size"] = 96
    (fake_model / "config.json").write_text(json.dumps(cfg))
    res = run("quantize", "--config", write_config({"base_model.path": str(fake_model)}), "--branch", "W4A16_GS64")
    _assert_clean_failure(
        res, "group_size 64 of branch W4A16_GS64 does not divide the input dimension 96", tmp_path / "out"
    )


def test_empty_calibration_file(write_config, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = run("quantize", "--config", write_config({"calibration.path": str(empty)}), "--branch", "W4A16_GS32")
    _assert_clean_failure(res, f"the calibration file {empty} is empty", tmp_path / "out")


def test_too_short_calibration_set(write_config, tmp_path, demo_assets):
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(demo_assets.calibration.read_text().splitlines()[:3]) + "\n")
    res = run("quantize", "--config", write_config({"calibration.path": str(short)}), "--branch", "W4A16_GS32")
    _assert_clean_failure(
        res, "the calibration set has 3 rows, fewer than calibration.num_samples=32", tmp_path / "out"
    )


def test_calibration_without_messages_column(write_config, tmp_path):
    bad = tmp_path / "text.jsonl"
    bad.write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(40)) + "\n")
    res = run("quantize", "--config", write_config({"calibration.path": str(bad)}), "--branch", "W4A16_GS32")
    _assert_clean_failure(res, "calibration data has no 'messages' column (columns: text)", tmp_path / "out")


def test_missing_chat_template(write_config, fake_model, tmp_path):
    (fake_model / "chat_template.jinja").unlink()
    tc = json.loads((fake_model / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (fake_model / "tokenizer_config.json").write_text(json.dumps(tc))
    res = run("quantize", "--config", write_config({"base_model.path": str(fake_model)}), "--branch", "W4A16_GS32")
    _assert_clean_failure(res, "the base model's tokenizer has no chat template", tmp_path / "out")


def test_debug_variable_shows_the_traceback(write_config, monkeypatch):
    from release.errors import ReleaseError

    monkeypatch.setenv("GLMREL_DEBUG", "1")
    with pytest.raises(ReleaseError):
        CliRunner().invoke(
            cli, ["quantize", "--config", str(write_config()), "--branch", "nope"], catch_exceptions=False
        )


def test_quantize_gpus_beyond_the_machine_is_refused(write_config):
    res = CliRunner().invoke(
        cli, ["quantize", "--config", str(write_config()), "--branch", "W4A16_GS64", "--gpus", "2"]
    )
    assert res.exit_code == 1
    assert "--gpus 2 asks for more GPUs than this machine has" in res.output
    assert "Hint:" in res.output


def test_quantize_gpus_needs_a_sample_per_gpu(write_config):
    cfg = write_config({"calibration.num_samples": 1})
    res = CliRunner().invoke(cli, ["quantize", "--config", str(cfg), "--branch", "W4A16_GS64", "--gpus", "2"])
    assert res.exit_code == 1
    assert "--gpus 2 needs at least one calibration sample per GPU; calibration.num_samples is 1" in res.output
    assert "Hint: raise calibration.num_samples to 2 or more" in res.output


def test_rank_partition_covers_every_sample_once(monkeypatch):
    from release.build import distributed

    for n, world in ((12, 2), (13, 4), (512, 8), (3, 3)):
        spans = []
        for r in range(world):
            monkeypatch.setenv("TORCHELASTIC_RUN_ID", "t")
            monkeypatch.setenv("WORLD_SIZE", str(world))
            monkeypatch.setenv("RANK", str(r))
            spans.append(distributed.partition(n))
        assert [i for a, b in spans for i in range(a, b)] == list(range(n)), (n, world, spans)
        assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


def test_quantize_gpus_must_be_positive(write_config):
    res = CliRunner().invoke(
        cli, ["quantize", "--config", str(write_config()), "--branch", "W4A16_GS64", "--gpus", "0"]
    )
    assert res.exit_code == 2 and "--gpus" in res.output


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"messages": "just a string"}] * 40, "line 1: messages is a str, not a list of messages"),
        (
            [GOOD] * 5 + [{"messages": [{"role": "user", "content": 7}]}] + [GOOD] * 34,
            "line 6: messages message 0's content is a int",
        ),
        (
            [GOOD] * 3 + [{"messages": [{"content": "no role"}]}] + [GOOD] * 36,
            "line 4: messages message 0's role is missing",
        ),
        ([GOOD] * 2 + [{"messages": []}] + [GOOD] * 37, "line 3: messages is an empty list"),
        ([GOOD] * 9 + ['{"messages": [ oops'] + [GOOD] * 30, "line 10 is not valid JSON"),
        ([GOOD] * 4 + ["[1, 2]"] + [GOOD] * 35, "line 5: the line is a list, not an object"),
    ],
)
def test_bad_calibration_rows_are_named(write_config, tmp_path, rows, message):
    """Garbage calibration rows never reach a build: the first bad row is named, with what was expected."""
    bad = _jsonl(tmp_path / "bad.jsonl", rows)
    res = run("build-all", "--config", write_config({"calibration.path": str(bad)}))
    _assert_clean_failure(res, f"calibration file {bad} {message}", tmp_path / "out")
    assert "role" in res.output.split("Hint:", 1)[1]


def test_bad_rows_in_a_parquet_file_are_named(write_config, tmp_path):
    import datasets

    bad = tmp_path / "calib.parquet"
    datasets.Dataset.from_list([GOOD] * 3 + [{"messages": [{"role": "user", "content": None}]}] * 37).to_parquet(
        str(bad)
    )
    res = run("quantize", "--config", write_config({"calibration.path": str(bad)}), "--branch", "W4A16_GS32")
    _assert_clean_failure(
        res, "calibration row 3 of calib.parquet: messages message 0's content is a NoneType", tmp_path / "out"
    )


def test_invalid_yaml_config_has_a_hint(tmp_path):
    bad = tmp_path / "release.yaml"
    bad.write_text("name: x\nbranches:\n  - name: W4A16_GS32\n   group_size: 32\n")
    res = run("build-all", "--config", bad)
    assert res.exit_code == 1 and f"Error: config {bad} is not valid YAML (line 4, column" in res.output
    assert "Hint: fix the YAML at that line" in res.output


def test_changelog_change_parsed_as_a_mapping_is_an_error(write_config, tmp_path):
    log = tmp_path / "changelog.yaml"
    log.write_text(
        "- version: v1\n  summary: First.\n  changes:\n    - Fine line.\n    - MoE-aware AWQ: all experts.\n"
    )
    res = run("render", "--config", write_config({"changelog": str(log)}))
    assert res.exit_code == 1
    assert "v1: changes.1 is a mapping ('MoE-aware AWQ': ...), not a string" in res.output
    assert "Hint: each entry is {version, summary, changes: [strings]}; quote a change" in res.output


def test_nothing_imports_the_cli():
    """The CLI is the top of the house: modules and benchmarks import what they need from the
    modules below it, never from release.cli."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    pattern = re.compile(r"^\s*(from release\.cli import|from \.cli import|import release\.cli)", re.M)
    offenders = [
        str(p.relative_to(repo))
        for folder in ("release", "benchmarks")
        for p in (repo / folder).rglob("*.py")
        if pattern.search(p.read_text())
    ]
    assert offenders == []


def test_a_torchrun_rank_starts_the_worker_not_the_cli(tmp_path, monkeypatch):
    """`--gpus N` launches `python -m release.build.worker` on each rank (not the CLI with --force),
    and a rank's error ends as the CLI's do: Error and Hint on stderr, exit 1, no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    from release.build import distributed

    seen = {}
    with monkeypatch.context() as m:  # subprocess.run is the module's own: patched only for the launch
        m.delenv("PYTHONFAULTHANDLER", raising=False)
        m.setattr(distributed.subprocess, "run", lambda cmd, env: seen.update(cmd=cmd, env=env) or _Done())
        distributed.launch(2, Path("c.yaml"), "W4A16_GS64")
    assert seen["cmd"][-6:] == ["-m", "release.build.worker", "--config", "c.yaml", "--branch", "W4A16_GS64"]
    assert "--nproc-per-node=2" in seen["cmd"]
    # a rank that dies by a signal leaves its threads' Python stacks in its log
    assert seen["env"]["PYTHONFAULTHANDLER"] == "1" and seen["env"]["PYTHONUNBUFFERED"] == "1"

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "release.build.worker",
            "--config",
            str(tmp_path / "missing.yaml"),
            "--branch",
            "W4A16_GS64",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("Error: ") and "missing.yaml" in proc.stderr and "\nHint: " in proc.stderr


class _Done:
    returncode = 0


def test_a_calibration_file_that_is_not_utf8_names_its_first_bad_byte(write_config, tmp_path):
    """Binary bytes in the calibration file: the file, the offset and the byte, with the fix, as
    a config or a manifest that is not UTF-8 (errors.not_utf8)."""
    bad = tmp_path / "binary.jsonl"
    bad.write_bytes(json.dumps(GOOD).encode() + b"\n" + b"\xba\xe8\xff\x00" * 25)
    res = run("build-all", "--config", write_config({"calibration.path": str(bad)}))
    offset = len(json.dumps(GOOD)) + 1
    _assert_clean_failure(
        res, f"calibration file {bad} is not UTF-8 text (byte {offset} is b'\\xba')", tmp_path / "out"
    )
    assert "Hint: write the .jsonl file as UTF-8" in res.output


def test_a_changelog_or_recipe_that_is_not_utf8_is_named_with_its_fix(write_config, tmp_path):
    """Binary bytes in the release changelog (render, publish) or the recipe template
    (quantize): one Error naming the file and a Hint, exit 1; both ended in "unexpected
    UnicodeDecodeError" before."""
    junk = bytes([0xBA, 0xE8, 0xFF, 0x00]) * 25
    log = tmp_path / "changelog.yaml"
    log.write_bytes(junk)
    res = run("render", "--config", write_config({"changelog": str(log)}))
    assert res.exit_code == 1 and "unexpected" not in res.output
    assert f"Error: cannot read changelog {log}: 'utf-8' codec can't decode byte 0xba" in res.output
    assert "Hint: the release changelog is a UTF-8 YAML list" in res.output

    from release.architecture import Glm4MoeArch
    from release.build.recipe import render_recipe
    from release.config import AwqSpec, BranchSpec
    from release.errors import ReleaseError
    from tests.test_architecture import GLM47

    recipe = tmp_path / "recipe.yaml.j2"
    for content, problem in ((junk, "cannot read recipe template"), (b"{% if %}", "failed to render")):
        recipe.write_bytes(content)
        with pytest.raises(ReleaseError, match=problem) as e:
            render_recipe(recipe, Glm4MoeArch.from_config(GLM47), BranchSpec(name="B", group_size=64), AwqSpec())
        assert "recipes/glm4moe_awq_w4a16.yaml.j2" in e.value.hint
