"""Shared fixtures: an isolated Hugging Face home, the tiny demo model, and one demo build per session."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from release.numerics import REPRODUCIBLE_CPU_ENV

# Before anything imports torch: the demo's reproducible CPU numerics (release/numerics.py),
# so the demo weights the tests build are the same bits on every x86 machine.
os.environ.update(REPRODUCIBLE_CPU_ENV)
# `make test` runs two workers (pytest-xdist) on CI's two cores. OpenMP's threads spin while
# they wait, so two processes' torch threads on two cores spin against each other: measured
# here, one small build took 31 s alone and 181 s beside another; with idle threads sleeping,
# 42 s for the two together. The wait policy changes no result, only what an idle thread does.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


@pytest.fixture(autouse=True, scope="session")
def _isolated_hf_home(tmp_path_factory):
    """Keep tests off the user's Hub cache and token, and off the network."""
    home = tmp_path_factory.mktemp("hf_home")
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    os.environ.pop("HF_TOKEN", None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def demo_assets():
    from release.tiny import ensure_demo_assets

    return ensure_demo_assets(log=lambda s: None)


def demo_raw_config(assets) -> dict:
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["base_model"]["path"] = str(assets.model)
    raw["calibration"]["path"] = str(assets.calibration)
    raw["verify"]["heldout"] = str(assets.heldout)
    raw["recipe"] = str(REPO / "recipes" / "glm4moe_awq_w4a16.yaml.j2")
    raw["changelog"] = str(REPO / "releases" / "demo-changelog.yaml")
    raw["eval"]["include_path"] = str(REPO / "release" / "data" / "eval")
    return raw


@pytest.fixture()
def write_config(tmp_path, demo_assets):
    """Write a demo-based config into tmp_path, with nested overrides; returns its path."""

    def _write(overrides: dict | None = None, name: str = "release.yaml", output_dir: Path | None = None) -> Path:
        raw = demo_raw_config(demo_assets)
        raw["output_dir"] = str(output_dir or tmp_path / "out")
        raw["publish_remote"] = str(tmp_path / "remote.git")
        for key, value in (overrides or {}).items():
            node = raw
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            if value is _DELETE:
                node.pop(last, None)
            else:
                node[last] = copy.deepcopy(value)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return _write


_DELETE = object()


@pytest.fixture()
def DELETE():
    return _DELETE


# what the rebuild tests calibrate on (tests/test_trust.py, test_integrity.py): a release's
# bytes are compared with a rebuild's, which a small calibration shows as well as the demo's
SMALL_CALIBRATION = {"num_samples": 4, "max_seq_length": 64}


def release_config(root: Path, raw: dict) -> Path:
    """The release config `raw` written to `root/release.yaml`, its output in `root/out` and its
    remote at `root/remote.git`; returns the config's path."""
    raw = {**raw, "output_dir": str(root / "out"), "publish_remote": str(root / "remote.git")}
    path = root / "release.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _demo_release_config(root: Path, assets) -> Path:
    return release_config(root, demo_raw_config(assets))


def copy_release(out: Path, root: Path, raw: dict) -> Path:
    """A built release's folder `out` copied to `root/out` (a publish's cache left behind),
    with the config `raw` of its own there (a fresh remote path); returns the config's path."""
    shutil.copytree(out, root / "out", ignore=shutil.ignore_patterns(".publish-cache.git"))
    return release_config(root, raw)


def _copy_demo_release(out: Path, root: Path, assets) -> Path:
    return copy_release(out, root, demo_raw_config(assets))


def _build_demo_release(root: Path, assets) -> None:
    """Build the demo release into `root` and record what the build did (`built.pickle`,
    written last: a build that failed leaves none, and the next caller builds again)."""
    import pickle

    import release.manifest as manifest_mod
    from release.build.pipeline import build_all
    from release.config import load_config

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cfg = load_config(_demo_release_config(root, assets))
    logs: list[str] = []
    hashed: list[Path] = []
    real_hash_files = manifest_mod.hash_files

    def counted(paths: list[Path], workers: int | None = None) -> dict[Path, str]:
        hashed.extend(paths)
        return real_hash_files(paths, workers)

    manifest_mod.hash_files = counted
    try:
        result = build_all(cfg, echo=logs.append)
    finally:
        manifest_mod.hash_files = real_hash_files
    out = cfg.output_dir
    # within the release: relative to it, so each worker's copy names its own files
    record = {
        "result": result,
        "logs": logs,
        "hashed": [str(p.relative_to(out) if p.is_relative_to(out) else p) for p in hashed],
    }
    (root / "built.pickle.tmp").write_bytes(pickle.dumps(record))
    (root / "built.pickle.tmp").rename(root / "built.pickle")


@pytest.fixture(scope="session")
def demo_release(tmp_path_factory, demo_assets):
    """The demo release (three branches, verified), built once for the whole run, with every
    file the build hashed (`hashed`: the paths handed to manifest.hash_files). Under `make
    test`'s two workers (pytest-xdist) the first worker that asks builds it, in a folder of the
    run both workers share, while the other waits; each worker then gets a copy of its own (the
    workers' tests run at the same time and some write into the release). One build instead of
    two: on a 2-core AMD EPYC (session 40) `make test` took 745 s, against 864 s with a build
    per worker (one run each)."""
    import fcntl
    import pickle

    from release.config import load_config

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "demo_release_built"
    with open(f"{shared}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "built.pickle").exists():
            _build_demo_release(shared, demo_assets)
    built = pickle.loads((shared / "built.pickle").read_bytes())
    path = _copy_demo_release(shared / "out", tmp_path_factory.mktemp("demo_release"), demo_assets)
    cfg = load_config(path)
    hashed = [cfg.output_dir / rel for rel in built["hashed"]]
    return {"config_path": path, "config": cfg, "result": built["result"], "logs": built["logs"], "hashed": hashed}


@pytest.fixture()
def release_copy(demo_release, tmp_path, demo_assets):
    """The demo build copied (so a test may change it), with a fresh remote path."""
    return _copy_demo_release(demo_release["config"].output_dir, tmp_path, demo_assets)


def refs(remote: Path) -> dict[str, str]:
    out = subprocess.run(
        ["git", "--git-dir", str(remote), "for-each-ref", "--format=%(refname) %(objectname)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split() for line in out.splitlines())
