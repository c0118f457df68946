"""`glmrel eval`: lm-eval through vLLM on the base model and every branch, its records bound to
the branch's content, the recovery tables on the cards and the Hub's evaluation metadata.

vLLM and lm-eval live in their own environment (`make vllm-cpu-env`; `make eval` runs the real
thing on the demo). Here a stand-in for that environment's Python answers the version probe
and runs tests/data/fake_lm_eval_runner.py in place of lm_eval_run.py, with fixed scores: what
is tested is glmrel's side (the job it writes, when it runs, what it records, what check,
render and the card's metadata make of it), not lm-eval's numbers.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard

from release.check import check_branch
from release.cli import cli
from release.config import EvalSpec, EvalTask, load_config
from release.errors import ReleaseError
from release.evaluation import demo_tasks
from release.evaluation.records import recovery
from release.manifest import write_manifest

REPO = Path(__file__).resolve().parent.parent
FAKE_RUNNER = REPO / "tests" / "data" / "fake_lm_eval_runner.py"
BRANCHES = ("W4A16_GS32", "W4A16_GS64", "W4A16_GS128")


def fake_python(tmp_path: Path, probe: str = '{"lm_eval": "0.4.13", "vllm": "0.32.0", "torch": "2.13.0+cpu"}') -> Path:
    """A vLLM environment's Python as glmrel calls it: `-c PROBE` and `lm_eval_run.py JOB OUT`."""
    log = tmp_path / "fake-python.log"
    path = tmp_path / "fake-python"
    path.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{log}"\n'
        f'export FAKE_LM_EVAL_LOG="{log}"\n'
        f'if [ "$1" = "-c" ]; then echo \'{probe}\'; exit 0; fi\n'
        f'exec "{sys.executable}" "{FAKE_RUNNER}" "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def runs(tmp_path: Path) -> list[str]:
    """The model folders the stand-in scored, in order."""
    log = tmp_path / "fake-python.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [line.split()[1] for line in lines if line.startswith("scored ")]


def scored(tmp_path: Path) -> int:
    return len(runs(tmp_path))


def _eval(config: Path, python: Path, *args: str, env: dict | None = None):
    return CliRunner().invoke(cli, ["eval", "--config", str(config), "--python", str(python), *args], env=env or {})


def test_the_shipped_demo_tasks_are_what_the_generator_writes():
    """The demo's task data is written by release/evaluation/demo_tasks.py from the corpus'
    held-out split, not by hand: the files in the repo are exactly what it produces."""
    for name, text in demo_tasks.render().items():
        assert (demo_tasks.TASK_DIR / name).read_text() == text, (
            f"run `python -m release.evaluation.demo_tasks` ({name})"
        )
    docs = demo_tasks.build()
    mc = docs[demo_tasks.MC_FILE]
    assert len(mc) == demo_tasks.MC_ITEMS and all(len(d["choices"]) == demo_tasks.CHOICES for d in mc)
    assert all(d["choices"].count(d["choices"][d["gold"]]) == 1 for d in mc), "one right answer per question"
    assert {d["gold"] for d in mc} == set(range(demo_tasks.CHOICES)), "the right answer is not always in one place"


def test_recovery_is_branch_over_base_and_says_when_the_base_scored_zero():
    spec = EvalSpec(tasks=[EvalTask(name="a", metric="acc"), EvalTask(name="b", metric="exact_match,strict-match")])
    base = {
        "a": {"metrics": {"acc": {"value": 0.8, "stderr": 0.01}}},
        "b": {"metrics": {"exact_match,strict-match": {"value": 0.0, "stderr": 0.0}}},
    }
    branch = {
        "a": {"metrics": {"acc": {"value": 0.76, "stderr": 0.012}}, "samples": 100},
        "b": {"metrics": {"exact_match,strict-match": {"value": 0.1, "stderr": 0.03}}},
    }
    rows = recovery(spec, base, branch)
    assert rows[0]["recovery_pct"] == 95.0 and rows[0]["base_stderr"] == 0.01 and rows[0]["samples"] == 100
    assert rows[1]["recovery_pct"] is None, "no quotient over a zero base score"
    with pytest.raises(ReleaseError) as e:
        recovery(EvalSpec(tasks=[EvalTask(name="a", metric="acc_norm")]), base, branch)
    assert "reported: acc" in e.value.message and "acc_norm" in e.value.message and e.value.hint


def test_two_tasks_of_one_name_are_refused():
    with pytest.raises(ValueError, match="listed twice"):
        EvalSpec(tasks=[EvalTask(name="a", metric="acc"), EvalTask(name="a", metric="acc")])


@pytest.mark.slow
def test_eval_scores_the_base_once_binds_each_branch_and_fills_the_cards(release_copy, tmp_path):
    py = fake_python(tmp_path)
    res = _eval(release_copy, py)
    assert res.exit_code == 0, res.output
    cfg = load_config(release_copy)
    models = runs(tmp_path)
    assert len(models) == 4 and Path(models[0]).name != "W4A16_GS32", "the base first, once, then each branch"
    assert [Path(m).name for m in models[1:]] == list(BRANCHES)
    job_line = next(line for line in (tmp_path / "fake-python.log").read_text().splitlines() if "lm_eval_run" in line)
    assert job_line.split()[0].endswith("release/evaluation/lm_eval_run.py")
    base_record = json.loads((cfg.output_dir / "base-eval.json").read_text())
    assert base_record["tasks"]["glmrel_demo_next_line_mc"]["metrics"]["acc"]["value"] == 0.5
    for name in BRANCHES:
        folder = cfg.output_dir / name
        record = json.loads((folder / "eval.json").read_text())
        assert record["branch"] == name and record["versions"] == {
            "lm_eval": "0.4.13",
            "vllm": "0.32.0",
            "torch": "2.13.0+cpu",
        }
        assert (
            record["how"]["model_args"]["dtype"] == "bfloat16"
            and "gpu_memory_utilization" not in record["how"]["model_args"]
        )
        assert str(cfg.output_dir) not in json.dumps(record), "no path of this machine in a published record"
        mc, gen = record["recovery"]
        assert (mc["base"], mc["branch"], mc["recovery_pct"]) == (0.5, 0.45, 90.0)
        assert gen["recovery_pct"] is None
        report = check_branch(folder)
        assert report.passed, report.to_text()
        assert any(i.check == "evaluation" and "90.0%" in i.message for i in report.items if i.ok and not i.skipped)
        card = (folder / "README.md").read_text()
        assert (
            "## Task recovery" in card
            and "| glmrel_demo_next_line_mc | acc | 0 | 40 | 0.5000 ± 0.0790 | 0.4500 ± 0.0790 | 90.0% |" in card
        )
        assert "n/a (the base scored 0)" in card and "say nothing about quality" in card
        # the Hub's evaluation metadata, parsed back by huggingface_hub
        results = ModelCard(card).data.eval_results
        assert [(r.dataset_name, r.metric_type, r.metric_value) for r in results] == [
            ("glmrel_demo_next_line_mc", "acc", 0.45),
            ("glmrel_demo_rest_of_line", "exact_match", 0.0417),
        ]
        assert results[0].dataset_args == {"num_few_shot": 0} and results[0].source_url.endswith(
            f"/blob/{name}/eval.json"
        )
        assert "lm-eval 0.4.13 through vLLM 0.32.0" in results[0].source_name
    landing = (cfg.output_dir / "main" / "README.md").read_text()
    assert (
        "| glmrel_demo_next_line_mc | acc | 0 | 0.5000 | 0.4500 (90.0%) | 0.4500 (90.0%) | 0.4500 (90.0%) |" in landing
    )
    assert "| 0.0000 | 0.0417 (n/a: base 0) |" in landing
    assert "model-index" not in landing, "the landing page holds no weights to score"

    # nothing scored twice: the same content and settings are up to date
    before = scored(tmp_path)
    res = _eval(release_copy, py)
    assert res.exit_code == 0 and scored(tmp_path) == before and res.output.count("up to date") == 3
    # a changed setting (a sample limit) scores the base and every branch again
    raw = yaml.safe_load(release_copy.read_text())
    raw["eval"]["tasks"][0]["limit"] = 10
    release_copy.write_text(yaml.safe_dump(raw, sort_keys=False))
    res = _eval(release_copy, py, "--branch", "W4A16_GS64")
    assert res.exit_code == 0, res.output
    assert [Path(m).name for m in runs(tmp_path)[-2:]][1] == "W4A16_GS64" and scored(tmp_path) == before + 2
    assert json.loads((cfg.output_dir / "W4A16_GS64" / "eval.json").read_text())["recovery"][0]["samples"] == 10


@pytest.mark.slow
def test_check_and_render_refuse_an_eval_record_of_other_content(release_copy, tmp_path):
    assert _eval(release_copy, fake_python(tmp_path)).exit_code == 0
    cfg = load_config(release_copy)
    folder = cfg.output_dir / "W4A16_GS64"
    path = folder / "eval.json"
    good = path.read_text()
    tampered = json.loads(good)
    tampered["content_sha256"] = "0" * 64
    path.write_text(json.dumps(tampered))
    write_manifest(folder, "W4A16_GS64")
    report = check_branch(folder)
    assert not report.passed and "scored other content" in report.failures[0].message
    res = CliRunner().invoke(cli, ["render", "--config", str(release_copy)])
    assert res.exit_code == 1 and "scored other content" in res.output and "Hint: run `glmrel eval" in res.output
    # a recovery that is not its own scores' quotient (an edited table) is refused too
    tampered = json.loads(good)
    tampered["recovery"][0]["recovery_pct"] = 100.0
    path.write_text(json.dumps(tampered))
    write_manifest(folder, "W4A16_GS64")
    report = check_branch(folder)
    assert not report.passed and "is not branch / base" in report.failures[0].message
    path.write_text("{not json")
    write_manifest(folder, "W4A16_GS64")
    assert "not a JSON object" in check_branch(folder).failures[0].message
    path.write_text(good)
    write_manifest(folder, "W4A16_GS64")
    assert check_branch(folder).passed


@pytest.mark.slow
def test_a_branch_never_scored_says_so_and_carries_no_metadata(release_copy):
    cfg = load_config(release_copy)
    res = CliRunner().invoke(cli, ["render", "--config", str(release_copy)])
    assert res.exit_code == 0, res.output
    card = (cfg.output_dir / "W4A16_GS32" / "README.md").read_text()
    assert "Task recovery: not measured for this branch" in card and "| task | metric |" not in card
    assert ModelCard(card).data.eval_results is None
    report = check_branch(cfg.output_dir / "W4A16_GS32")
    assert report.passed and any(i.check == "evaluation" for i in report.skipped)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, expect",
    [
        ("no-lm-eval", "has no lm_eval"),
        ("runner-fails", "lm-eval through vLLM failed"),
        ("unknown-metric", "reported no metric 'acc'"),
        ("no-tasks", "lists no tasks"),
        ("link-in-tasks", "not a regular file"),
    ],
)
def test_eval_errors_name_the_fix_and_write_nothing(release_copy, tmp_path, case, expect):
    cfg = load_config(release_copy)
    py = (
        fake_python(tmp_path, probe='{"vllm": "0.32.0", "torch": "2.13.0"}')
        if case == "no-lm-eval"
        else fake_python(tmp_path)
    )
    env = {"FAKE_LM_EVAL_FAIL": "1"} if case == "runner-fails" else {}
    if case == "unknown-metric":
        env["FAKE_LM_EVAL_METRIC"] = "acc_norm"
    raw = yaml.safe_load(release_copy.read_text())
    if case == "no-tasks":
        raw["eval"]["tasks"] = []
    if case == "link-in-tasks":
        tasks = tmp_path / "tasks"
        tasks.mkdir()
        for f in Path(raw["eval"]["include_path"]).iterdir():
            (tasks / f.name).write_bytes(f.read_bytes())
        os.symlink("/etc/passwd", tasks / "passwd.json")
        raw["eval"]["include_path"] = str(tasks)
    release_copy.write_text(yaml.safe_dump(raw, sort_keys=False))
    before = {p: p.read_bytes() for p in cfg.output_dir.glob("W4A16_*/*") if p.is_file()}
    res = _eval(release_copy, py, env=env)
    assert res.exit_code == 1 and expect in res.output and "Hint:" in res.output, res.output
    assert "Traceback" not in res.output.split("Error:")[0]
    assert not list(cfg.output_dir.glob("W4A16_*/eval.json")), "no record of a run that failed"
    after = {p: p.read_bytes() for p in cfg.output_dir.glob("W4A16_*/*") if p.is_file()}
    assert after == before, "nothing in a branch changed"


def test_a_variant_is_a_name_and_config_overrides(tmp_path):
    from release.evaluation.ablation import parse_variant, variant_config

    assert parse_variant("no-moe-aware:calibration.moe_calibrate_all_experts=false") == (
        "no-moe-aware",
        {"calibration.moe_calibrate_all_experts": False},
    )
    assert parse_variant("g:awq.n_grid=10,awq.duo_scaling=false") == ("g", {"awq.n_grid": 10, "awq.duo_scaling": False})
    for bad in ("no-colon", "x:novalue", "x:Bad.Key=1", "release:awq.n_grid=2", ":awq.n_grid=2", "x:a.b=1,a.b=2"):
        with pytest.raises(ReleaseError) as e:
            parse_variant(bad)
        assert e.value.hint
    config = REPO / "configs" / "demo.yaml"
    path, text = variant_config(config, "W4A16_GS64", "g", {"awq.n_grid": 10}, tmp_path)
    assert path == tmp_path / "g" / "release.yaml" and not path.parent.exists(), "checked, not written"
    path.parent.mkdir()
    path.write_text(text)
    cfg = load_config(path)
    assert [b.name for b in cfg.branches] == ["W4A16_GS64"] and cfg.awq.n_grid == 10
    assert cfg.output_dir == tmp_path / "g" / "out" and cfg.publish_remote is None and cfg.changelog is None
    assert cfg.calibration.path == (REPO / ".cache" / "demo" / "calibration.jsonl").resolve(), (
        "paths stay the release's"
    )
    assert cfg.verify.min_top1 == 0.0, "a variant is measured, not gated"
    with pytest.raises(ReleaseError) as e:
        variant_config(config, "W4A16_GS64", "typo", {"awq.n_gird": 10}, tmp_path)
    assert "variant typo" in e.value.message and "n_gird" in e.value.message
    with pytest.raises(ReleaseError):
        variant_config(config, "W4A16_GS99", "g", {}, tmp_path)


def test_the_ablation_table_reads_side_by_side():
    from release.evaluation.ablation import table

    row = {"task": "t", "branch": 0.4, "recovery_pct": 80.0}
    text = table(
        [
            {"variant": "release", "overrides": {}, "mean_kl": 0.0005, "top1": 0.97, "recovery": [row]},
            {
                "variant": "rtn",
                "overrides": {"awq.n_grid": 1},
                "mean_kl": 0.002,
                "top1": 0.93,
                "recovery": [{**row, "recovery_pct": None}],
            },
        ]
    )
    assert "| release | (the release's) | 0.000500 | 0.9700 | 0.4000 (80.0%) |" in text
    assert "| rtn | awq.n_grid=1 | 0.002000 | 0.9300 | 0.4000 (n/a) |" in text


@pytest.mark.slow
def test_ablate_refuses_a_bad_variant_before_building_anything(release_copy, tmp_path):
    work = tmp_path / "ablation"
    res = CliRunner().invoke(
        cli,
        ["ablate", "--config", str(release_copy), "--branch", "W4A16_GS64", "--work", str(work)]
        + ["--variant", "ok:awq.n_grid=4", "--variant", "bad:awq.n_gird=4", "--python", str(fake_python(tmp_path))],
    )
    assert res.exit_code == 1 and "variant bad" in res.output and "Hint:" in res.output
    assert not work.exists(), "nothing was written, not even the good variant's config"
    assert scored(tmp_path) == 0


def test_ablate_without_a_vllm_environment_writes_nothing(release_copy, tmp_path):
    """The vLLM environment is looked for before any variant's config is written under --work:
    a refused run leaves no half-made ablation behind."""
    work = tmp_path / "ablation"
    res = CliRunner().invoke(
        cli,
        ["ablate", "--config", str(release_copy), "--branch", "W4A16_GS64", "--work", str(work)]
        + ["--variant", "ok:awq.n_grid=4", "--python", str(tmp_path / "no-such-python")],
    )
    assert res.exit_code == 1 and f"no vLLM environment at {tmp_path / 'no-such-python'}" in res.output
    assert "Hint: `make vllm-cpu-env` builds one" in res.output
    assert not work.exists()


@pytest.mark.slow
def test_a_rebuild_to_the_same_content_keeps_its_eval_record_and_no_other(release_copy, tmp_path):
    """`build-all --force` swaps a fresh folder in: the eval.json of the old one comes along
    only when it names the new folder's very content, and only as a regular file."""
    import shutil

    from release.build.branch_folder import carry_evaluation
    from release.manifest import folder_content_digest

    cfg = load_config(release_copy)
    old = cfg.output_dir / "W4A16_GS64"
    new = tmp_path / "rebuilt"
    shutil.copytree(old, new)
    record = {"schema": 1, "content_sha256": folder_content_digest(new), "recovery": []}
    (old / "eval.json").write_text(json.dumps(record))
    assert carry_evaluation(old, new) and json.loads((new / "eval.json").read_text()) == record
    (new / "eval.json").unlink()
    (old / "eval.json").write_text(json.dumps({**record, "content_sha256": "f" * 64}))
    assert not carry_evaluation(old, new) and not (new / "eval.json").exists()
    (old / "eval.json").unlink()
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(record))
    os.symlink(outside, old / "eval.json")
    assert not carry_evaluation(old, new) and not (new / "eval.json").exists()
