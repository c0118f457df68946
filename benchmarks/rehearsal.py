"""Dress rehearsal of a release: the real CLI path on a GLM-4.7-dims synthetic model.

    python -m benchmarks.rehearsal --preset glm47 --layers 2 --samples 16 --seq 2048 --gpus 1 \\
        --work /tmp/reh --json OUT.json

Builds a synthetic GLM-4-MoE (benchmarks/synthetic.py; random weights) and runs, each as its
own `glmrel` process: `build-all` (three branches: quantize, then one streaming verify of all
three, render, manifest, check), `check` of every branch, `publish` to a local bare git repo and
to the Hub double (tests/hub_double.py, on loopback), and a second `publish` to each (which must
do nothing). Per stage it records wall time, the peak host RSS of the whole process tree (all
ranks together, sampled every 0.2 s), the peak GPU memory in use on every GPU (nvidia-smi, the
driver's view: every process included), and the disk the work folder holds after it; during
`build-all`, the tree's host RSS when each branch starts loading its base model.

The verification thresholds are the synthetic config's (max KL 2.0, top-1 0.3): random weights
make the rehearsal test the path, not the weights' quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
TOKEN = "hf_rehearsal_token"


class Monitor:
    """Peak RSS of a process tree and peak GPU memory in use, sampled on a thread."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.peak_rss = 0
        self.peak_anon = 0  # RSS less file-backed pages (mapped safetensors): memory nothing can reclaim
        self.timeline: list[tuple[float, float, float]] = []  # (s, RSS GiB, anonymous GiB), every 2 s
        self._t0 = time.time()
        self.peak_gpu: list[int] = []
        self._stop = threading.Event()
        self._gpu_at = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def tree_rss(self) -> int:
        return self.tree_memory()[0]

    def tree_memory(self) -> tuple[int, int]:
        """(RSS, anonymous RSS) of the process tree, in bytes."""
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return 0, 0
        rss = anon = 0
        for p in procs:
            try:
                m = p.memory_info()
            except psutil.Error:
                continue
            rss += m.rss
            anon += m.rss - getattr(m, "shared", 0)
        return rss, anon

    def _gpu(self) -> list[int]:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            return [int(x) << 20 for x in out.split()]
        except (OSError, subprocess.SubprocessError, ValueError):
            return []

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            rss, anon = self.tree_memory()
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            t = time.time() - self._t0
            if not self.timeline or t - self.timeline[-1][0] >= 2.0:
                self.timeline.append((round(t, 1), round(rss / 2**30, 2), round(anon / 2**30, 2)))
            if time.time() - self._gpu_at > 1.0:
                self._gpu_at = time.time()
                used = self._gpu()
                self.peak_gpu = [max(a, b) for a, b in zip(used, self.peak_gpu)] if self.peak_gpu else used

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def du(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def run_monitored(
    label: str, argv: list[str], env: dict[str, str], on_line: Any = None, preexec_fn: Any = None
) -> tuple[int, list[str], Monitor, float]:
    """Run a command from the repo root, echo its output prefixed with `label`, and watch its
    process tree (`on_line(line, monitor, seconds)` sees each line). Returns (exit code, output
    lines, the stopped monitor, wall seconds)."""
    t0 = time.time()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO, preexec_fn=preexec_fn
    )
    mon = Monitor(proc.pid)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        print(f"  {label}| {line}", end="", flush=True)
        if on_line is not None:
            on_line(line, mon, time.time() - t0)
    rc = proc.wait()
    mon.stop()
    return rc, lines, mon, time.time() - t0


def memory_figures(mon: Monitor) -> dict[str, Any]:
    """Peak host RSS (with and without file-backed pages) and GPU memory of a monitored run."""
    return {
        "peak_host_rss_gib": round(mon.peak_rss / 2**30, 2),
        "peak_host_anon_gib": round(mon.peak_anon / 2**30, 2),
        "peak_gpu_gib": [round(b / 2**30, 1) for b in mon.peak_gpu],
    }


def stage(name: str, argv: list[str], work: Path, env: dict[str, str], records: list[dict]) -> dict[str, Any]:
    """Run one glmrel command, echo its output, record its figures; stop the rehearsal if it fails."""
    branch_starts = []

    def on_line(line: str, mon: Monitor, _seconds: float) -> None:
        if "] loading " in line:  # a branch starts loading its base model
            branch_starts.append({"branch": line.split("]")[0].strip("[ "), "host_rss_gib": mon.tree_rss() / 2**30})

    rc, lines, mon, wall = run_monitored(name, [sys.executable, "-m", "release.cli", *argv], env, on_line)
    rec = {
        "stage": name,
        "argv": argv,
        "exit": rc,
        "wall_s": round(wall, 1),
        **memory_figures(mon),
        "disk_gib": round(du(work) / 2**30, 2),
    }
    if branch_starts:
        rec["host_rss_at_branch_start_gib"] = [
            {**b, "host_rss_gib": round(b["host_rss_gib"], 2)} for b in branch_starts
        ]
    records.append(rec)
    print(json.dumps(rec), flush=True)
    if rc != 0:
        raise SystemExit(f"stage {name} failed (exit {rc}):\n{''.join(lines[-20:])}")
    rec["output_tail"] = "".join(lines[-3:])
    return rec


def rehearse(a: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    from hub_double import HubDouble

    work = a.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()
    # in a child process: this one never holds GPU memory, so the stages' GPU peaks are theirs
    synthetic = [sys.executable, "-m", "benchmarks.synthetic", "--preset", a.preset, "--out", str(work)]
    synthetic += ["--layers", str(a.layers), "--device", a.device, "--samples", str(a.samples), "--seq", str(a.seq)]
    synthetic += [x for g in (32, 64, 128) for x in ("--group-size", str(g))]
    subprocess.run(synthetic, check=True, cwd=REPO)
    config = work / "release.yaml"
    build_s = time.time() - t0
    raw = yaml.safe_load(config.read_text())
    changelog = work / "changelog.yaml"
    changelog.write_text(
        yaml.safe_dump([{"version": "v1", "summary": "Rehearsal.", "changes": ["Three group sizes."]}])
    )
    raw.update(changelog=str(changelog), publish_remote=str(work / "remote.git"), hub_repo="glmrel-rehearsal/glm47")
    # random weights: the rehearsal tests the path (every stage runs and every record is written),
    # not the weights' quality, so verify's thresholds only catch a branch that is not finite
    raw["verify"].update(max_kl=1000.0, min_top1=0.0)
    config.write_text(
        "# Dress rehearsal (benchmarks/rehearsal.py) on a random-weight model: verify's thresholds\n"
        "# are set so that the rehearsal tests the path, not the quality of random weights.\n"
        + yaml.safe_dump(raw, sort_keys=False)
    )
    records: list[dict] = []

    def save() -> None:
        if a.json:
            a.json.write_text(
                json.dumps({"args": vars(a) | {"work": str(work), "json": str(a.json)}, "stages": records}, indent=1)
            )

    with HubDouble(TOKEN) as hub:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": TOKEN,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "GLMREL_GIT_LFS": os.environ.get("GLMREL_GIT_LFS", "1"),
        }
        gpus = ["--gpus", str(a.gpus)] if a.gpus > 1 else []
        stage("build-all", ["build-all", "--config", str(config), *gpus], work, env, records)
        save()
        for g in (32, 64, 128):
            stage(f"check GS{g}", ["check", str(work / "branches" / f"W4A16_GS{g}")], work, env, records)
        save()
        publish = ["publish", "--config", str(config), "--changelog", "v1"]
        remotes = {"git": [], "hub": ["--remote", "hf://glmrel-rehearsal/glm47"]}
        for name in a.publish.split(","):
            stage(f"publish {name}", [*publish, *remotes[name]], work, env, records)
            save()
            stage(f"publish {name} again", [*publish, *remotes[name]], work, env, records)
            save()
    verify = {g: json.loads((work / "branches" / f"W4A16_GS{g}" / "verify.json").read_text()) for g in (32, 64, 128)}
    prov = json.loads((work / "branches" / "W4A16_GS64" / "provenance.json").read_text())
    return {
        "preset": a.preset,
        "layers": a.layers,
        "samples": a.samples,
        "seq": a.seq,
        "gpus": a.gpus,
        "synthetic_build_s": round(build_s, 1),
        "stages": records,
        "verify": {
            g: {k: v[k] for k in ("mean_kl", "top1_agreement", "seconds", "method", "layers", "passed")}
            for g, v in verify.items()
        },
        "quantize_timings_s_gs64": prov.get("timings_s", {}),
        "libraries": prov.get("libraries"),
        "gpu": prov.get("timings_s", {}).get("gpu"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="glm47")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--device", default="cuda", help="where benchmarks.synthetic builds the model")
    ap.add_argument("--work", type=Path, default=Path("/tmp/glmrel-rehearsal"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--publish",
        default="git,hub",
        help="remotes to publish to, in order: git (a local bare repo), hub (the Hub double on loopback)",
    )
    a = ap.parse_args()
    report = rehearse(a)
    text = json.dumps(report, indent=1)
    if a.json:
        a.json.write_text(text + "\n")
    for r in report["stages"]:
        print(
            f"{r['stage']:20} {r['wall_s']:8.1f} s  host {r['peak_host_rss_gib']:6.1f} GiB  "
            f"GPU {r['peak_gpu_gib']} GiB  disk {r['disk_gib']:.1f} GiB"
        )


if __name__ == "__main__":
    main()
