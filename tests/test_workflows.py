"""The CI workflows parse, and every command they run exists (make targets, glmrel subcommands)."""

import re
import shlex
from pathlib import Path

import yaml

from release.cli import cli

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))


def _run_lines():
    for wf in WORKFLOWS:
        data = yaml.safe_load(wf.read_text())
        for job_name, job in data["jobs"].items():
            assert job.get("runs-on"), f"{wf.name}:{job_name} has no runs-on"
            assert job.get("timeout-minutes"), f"{wf.name}:{job_name} has no timeout"
            for step in job["steps"]:
                if "run" in step:
                    for line in step["run"].splitlines():
                        yield wf.name, job_name, line.strip()


def test_workflows_parse_with_least_privilege():
    assert WORKFLOWS
    for wf in WORKFLOWS:
        data = yaml.safe_load(wf.read_text())
        assert data["permissions"] == {"contents": "read"}
        # yaml reads the bare key `on` as True
        assert data.get("on") or data.get(True)


def test_workflow_commands_exist():
    targets = set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), flags=re.M))
    seen = set()
    for wf, job, line in _run_lines():
        words = shlex.split(line)
        if words[0] == "make":
            assert set(words[1:]) <= targets, f"{wf}:{job}: unknown make target in {line!r}"
            seen.add("make")
        elif words[0] == "glmrel":
            assert words[1] in cli.commands, f"{wf}:{job}: unknown glmrel command in {line!r}"
            seen.add("glmrel")
        elif words[:2] == ["python", "-m"] and words[2] != "pip":
            module = words[2].replace(".", "/")
            assert (REPO / f"{module}.py").is_file(), f"{wf}:{job}: no module {words[2]}"
    assert seen == {"make", "glmrel"}


def test_light_job_installs_no_heavy_dependencies():
    import tomllib

    core = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in core if re.match(r"(torch|llmcompressor|transformers|compressed-tensors)\b", d)]
