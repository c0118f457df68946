"""An installed wheel works outside the checkout: it carries the templates and recipes
(pyproject `data-files`, found by release/paths.py) and renders the same cards."""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

import pytest
from test_render import BRANCHES, GOLDEN, recorded_release  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_installed_wheel_renders_the_cards(recorded_release, tmp_path):  # noqa: F811
    script = Path(sys.prefix) / "bin" / "glmrel"
    had_script = script.exists()
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("glmrel-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        # --ignore-installed: without it pip first uninstalls this environment's (editable) glmrel
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", "--prefix", str(venv)]
        + [str(wheel)],
        check=True,
        capture_output=True,
    )
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the dependencies from this environment, after the venv's own site-packages (a plain path:
    # this environment's editable install of glmrel is not activated)
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    stages = (
        "release.build, release.verify, release.check, release.serving, release.publish, release.awq, "
        "release.evaluation.harness, release.evaluation.demo_tasks"
    )
    where = subprocess.run(
        [
            str(python),
            "-c",
            f"import {stages}; import release.render as r; print(r.__file__); print(r.DEFAULT_TEMPLATES);"
            " from release.evaluation.demo_tasks import TASK_DIR, render;"
            " assert all((TASK_DIR / n).read_text() == t for n, t in render().items()), 'demo tasks not in the wheel'",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=True,
    ).stdout.split()
    assert where[0].startswith(str(venv)), f"glmrel imported from {where[0]}, not the installed wheel"
    assert where[1] == str(venv / "share" / "glmrel" / "templates")
    assert (venv / "share" / "glmrel" / "recipes" / "glm4moe_awq_w4a16.yaml.j2").is_file()
    res = subprocess.run(
        [str(python), "-m", "release.cli", "render", "--config", str(recorded_release)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = recorded_release.parent / "out"
    for name in (*BRANCHES, "main"):
        assert (out / name / "README.md").read_text() == (GOLDEN / f"{name}.md").read_text(), name
    if had_script:
        assert script.exists(), "this environment's own glmrel install is untouched"
