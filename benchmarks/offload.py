"""Host RAM of `glmrel quantize` with the base model's weights offloaded to disk, against the
same branch calibrated with the whole model in RAM.

    python -m benchmarks.offload --preset glm47 --layers 5 --samples 16 --seq 2048 \\
        --cpu-gib 8 --work /tmp/off --json OUT.json

Builds a GLM-4.7-dims synthetic model (benchmarks/synthetic.py, random weights) once, then runs
`glmrel quantize --branch W4A16_GS128 --force` for each mode: `ram` (the config as it is) and
`offload` (`offload.cpu_gib: CPU_GIB`: the weights beyond it in safetensors files on disk). Per
mode: wall time, peak host RSS of the process tree (sampled every 0.2 s; also without its
file-backed pages, the memory-mapped safetensors the kernel can drop), peak GPU memory in
use (nvidia-smi), the peak size of the offload folder, and the branch's weight digest (the two
modes must give the same bits).

With `--enforce`, the offload run is put in a cgroup v2 whose `memory.max` is the model's size
on disk minus one GiB (or `--limit-gib`): it could not hold the model in RAM if it tried. Where the machine does
not let this process create a cgroup, the record says so and the cap is only measured. With
`--drop-caches` each mode starts with an empty page cache (the record says whether it could):
the model is read from disk, not from what the previous mode left cached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.rehearsal import REPO, Monitor, du, memory_figures, run_monitored
from release.build_log import read_build_log

PHASES = ("] loading", "AWQ W4A16", "lifecycle finalized", "resave_config", "Copied MTP", "built in")
CGROUP = Path("/sys/fs/cgroup/glmrel-offload-bench")


def _cgroup(limit: int) -> tuple[Path | None, str]:
    """A cgroup v2 with memory.max = limit, or (None, why not)."""
    try:
        CGROUP.mkdir(exist_ok=True)
        (CGROUP / "memory.max").write_text(str(limit))
        (CGROUP / "memory.swap.max").write_text("0") if (CGROUP / "memory.swap.max").exists() else None
        return CGROUP, f"cgroup v2 memory.max = {limit / 2**30:.1f} GiB"
    except OSError as e:
        return None, f"not enforced: cannot create a cgroup here ({e.strerror or e}); measured only"


def _drop_page_cache() -> str:
    """Write back and drop the kernel's page cache, so the next run reads the model from disk
    (where the machine lets this process: it needs root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "dropped"
    except OSError as e:
        return f"not dropped ({e.strerror or e})"


def _weights_digest(branch: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(branch.glob("model*.safetensors")):
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def run_mode(
    mode: str, config: Path, work: Path, branch: str, gpus: int, limit: tuple[Path | None, str] | None
) -> dict[str, Any]:
    # the offload lives in a sub-folder of the cache named for the process (.offload.partial-<pid>@<host>)
    folder = work / "branches" / ".glmrel-cache"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "release.cli", "quantize", "--config", str(config), "--branch", branch, "--force"]
    argv += ["--gpus", str(gpus)] if gpus > 1 else []
    cg = limit[0] if limit else None

    def enter_cgroup() -> None:  # in the child, before exec
        if cg is not None:
            (cg / "cgroup.procs").write_text(str(os.getpid()))

    peak_disk = [0]
    stop = threading.Event()

    def sample_disk() -> None:
        while not stop.wait(2.0):
            try:
                peak_disk[0] = max(peak_disk[0], du(folder) if folder.exists() else 0)
            except OSError:  # files come and go while it is walked
                pass

    marks = []  # when each phase starts, to read the RSS timeline by

    def on_line(line: str, _mon: Monitor, seconds: float) -> None:
        if any(k in line for k in PHASES):
            marks.append((round(seconds, 1), line.strip()[-90:]))

    threading.Thread(target=sample_disk, daemon=True).start()
    rc, lines, mon, wall = run_monitored(mode, argv, env, on_line, preexec_fn=enter_cgroup)
    stop.set()
    figures = memory_figures(mon)
    rec: dict[str, Any] = {
        "mode": mode,
        "gpus": gpus,
        "exit": rc,
        "wall_s": round(wall, 1),
        "peak_host_rss_gib": figures["peak_host_rss_gib"],
        "peak_host_anon_gib": figures["peak_host_anon_gib"],
        "rss_timeline_gib": mon.timeline,
        "phases": marks,
        "peak_gpu_gib": figures["peak_gpu_gib"],
        "peak_offload_folder_gib": round(peak_disk[0] / 2**30, 2),
        "memory_limit": limit[1] if limit else "none",
    }
    if cg is not None and (cg / "memory.peak").exists():
        rec["cgroup_memory_peak_gib"] = round(int((cg / "memory.peak").read_text()) / 2**30, 2)
    if rc != 0:
        rec["output_tail"] = "".join(lines[-30:])
        return rec
    out = work / "branches" / branch
    timings = read_build_log(out.parent, branch).get("quantize", {}).get("timings_s", {})
    phases = (
        "prepare",
        "calibration_data",
        "load",
        "oneshot",
        "save",
        "save_weights",
        "save_mtp",
        "seal",
        "peak_gpu_gib",
    )
    rec["timings_s"] = {k: timings.get(k) for k in phases}
    rec.update(engine_figures(timings))
    rec["weights_sha256"] = _weights_digest(out)
    return rec


def engine_figures(timings: dict[str, Any]) -> dict[str, Any]:
    """What the engine read and onloaded ahead in a build (its build log's `awq_engine`), so that a
    record says whether the offloaded weights went through onload-ahead's pinned stages, how many
    and how long the copies took, not only the build's wall (the spans' clock is not the record's).
    A side branch's engine sits under its calibration pass, as `engine_description` reads it."""
    engine = timings.get("awq_engine") or (timings.get("calibration_pass") or {}).get("awq_engine") or {}
    ahead = {k: v for k, v in (engine.get("onload_ahead_counts") or {}).items() if k != "spans"}
    return {"onload_ahead": ahead or None, "read_ahead": engine.get("read_ahead_counts")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="glm47")
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--cpu-gib", type=float, default=8.0, help="offload.cpu_gib of the offload mode")
    ap.add_argument("--modes", default="ram,offload")
    ap.add_argument("--gpus", type=int, default=1, help="quantize --gpus")
    ap.add_argument("--branch", default="W4A16_GS128")
    ap.add_argument("--device", default="cuda", help="where benchmarks.synthetic builds the model")
    ap.add_argument("--work", type=Path, default=Path("/tmp/glmrel-offload"))
    ap.add_argument("--reuse", action="store_true", help="reuse the synthetic model already in --work")
    ap.add_argument("--enforce", action="store_true", help="run the offload mode under a cgroup memory limit")
    ap.add_argument("--limit-gib", type=float, default=None, help="that limit (default: the model's size - 1 GiB)")
    ap.add_argument("--drop-caches", action="store_true", help="empty the page cache before each mode (root)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    work = a.work.resolve()
    config = work / "release.yaml"
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}, "runs": []}
    if a.json and a.json.exists():  # one report across calls (each mode may be its own call)
        report["runs"] = json.loads(a.json.read_text()).get("runs", [])
    if not (a.reuse and config.exists()):
        t0 = time.time()
        cmd = [sys.executable, "-m", "benchmarks.synthetic", "--preset", a.preset, "--out", str(work)]
        cmd += ["--layers", str(a.layers), "--device", a.device, "--samples", str(a.samples), "--seq", str(a.seq)]
        cmd += ["--group-size", a.branch.rsplit("GS", 1)[1]]
        subprocess.run(cmd, check=True, cwd=REPO)
        report["synthetic_build_s"] = round(time.time() - t0, 1)
    model_bytes = sum(f.stat().st_size for f in (work / "model").glob("*.safetensors"))
    report["model_gib"] = round(model_bytes / 2**30, 2)
    print(f"model: {report['model_gib']} GiB of safetensors in {work / 'model'}", flush=True)
    raw = yaml.safe_load(config.read_text())
    for mode in a.modes.split(","):
        raw.pop("offload", None)
        if a.drop_caches:  # each mode reads the model from disk, as a node whose RAM cannot cache it does
            report.setdefault("page_cache", {})[mode] = _drop_page_cache()
        limit = None
        if mode == "offload":
            raw["offload"] = {"cpu_gib": a.cpu_gib}
            if a.enforce:
                limit = _cgroup(int(a.limit_gib * 2**30) if a.limit_gib else model_bytes - 2**30)
                print(f"memory limit: {limit[1]}", flush=True)
        path = work / f"release-{mode}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        rec = run_mode(mode, path, work, a.branch, a.gpus, limit)
        rec["model_gib"] = report["model_gib"]
        report["runs"].append(rec)
        print(json.dumps(rec), flush=True)
        if a.json:
            a.json.write_text(json.dumps(report, indent=1) + "\n")
    # one process: the same bits in RAM and offloaded; ranks only to float rounding (sum order)
    digests = {r["mode"]: r.get("weights_sha256") for r in report["runs"] if r.get("exit") == 0 and r["gpus"] == 1}
    if len(set(digests.values())) > 1:
        print(f"WEIGHTS DIFFER between modes: {digests}", flush=True)
    elif len(digests) > 1:
        print("same weights in every mode", flush=True)


if __name__ == "__main__":
    main()
