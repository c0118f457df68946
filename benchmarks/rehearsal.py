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
`build-all`, the tree's host RSS when each branch starts (loading its base model, or a side
branch of one pass reading its store).

The verification thresholds are the synthetic config's (max KL 2.0, top-1 0.3): random weights
make the rehearsal test the path, not the weights' quality.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from release.build_log import read_build_log
from release.owned import create_owned

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
    label: str,
    argv: list[str],
    env: dict[str, str],
    on_line: Any = None,
    preexec_fn: Any = None,
    deadline: float | None = None,
) -> tuple[int, list[str], Monitor, float]:
    """Run a command from the repo root, echo its output prefixed with `label`, and watch its
    process tree (`on_line(line, monitor, seconds)` sees each line). At `deadline` (a
    time.time()) its process group gets SIGTERM, so that a device call's time limit cuts the
    command and not the caller that records it. Returns (exit code, output lines, the stopped
    monitor, wall seconds)."""
    t0 = time.time()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
        preexec_fn=preexec_fn,
        start_new_session=deadline is not None,
    )
    mon = Monitor(proc.pid)
    timer = None
    if deadline is not None:

        def cut() -> None:
            if proc.poll() is None:
                print(f"  {label}| -- cut at the deadline: SIGTERM to its process group", flush=True)
                os.killpg(proc.pid, signal.SIGTERM)

        timer = threading.Timer(max(0.0, deadline - time.time()), cut)
        timer.start()
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        print(f"  {label}| {line}", end="", flush=True)
        if on_line is not None:
            on_line(line, mon, time.time() - t0)
    rc = proc.wait()
    if timer is not None:
        timer.cancel()
    mon.stop()
    return rc, lines, mon, time.time() - t0


def memory_figures(mon: Monitor) -> dict[str, Any]:
    """Peak host RSS (with and without file-backed pages) and GPU memory of a monitored run."""
    return {
        "peak_host_rss_gib": round(mon.peak_rss / 2**30, 2),
        "peak_host_anon_gib": round(mon.peak_anon / 2**30, 2),
        "peak_gpu_gib": [round(b / 2**30, 1) for b in mon.peak_gpu],
    }


GROUP_SIZES = (32, 64, 128)  # the release's three branches, W4A16_GS<g>


def branch_dir(work: Path, g: int) -> Path:
    return work / "branches" / f"W4A16_GS{g}"


# a branch starts loading its base model (a side branch of one pass: reading its store); a
# progress bar's carriage returns may precede it on the line
BRANCH_START = re.compile(r"\[([A-Za-z0-9_.-]+)\] (?:loading |from the pass's store)")


def stage(
    name: str, argv: list[str], work: Path, env: dict[str, str], records: list[dict], deadline: float | None = None
) -> dict[str, Any]:
    """Run one glmrel command, echo its output, record its figures; stop the rehearsal if it
    fails. A command cut at `deadline` is recorded as cut (with what it finished) and the
    rehearsal stops there, to go on in a later call."""
    branch_starts = []
    built = []

    def on_line(line: str, mon: Monitor, seconds: float) -> None:
        if m := BRANCH_START.search(line):
            branch_starts.append({"branch": m[1], "host_rss_gib": mon.tree_rss() / 2**30})
        if m := re.match(r"\[(\S+)\] (built in (\d+)s|up to date, skipped)", line):
            built.append({"branch": m[1], "built_s": int(m[3]) if m[3] else None, "at_s": round(seconds, 1)})

    argv0 = [sys.executable, "-m", "release.cli", *argv]
    rc, lines, mon, wall = run_monitored(name, argv0, env, on_line, deadline=deadline)
    cut = deadline is not None and time.time() >= deadline and rc != 0
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
    if built:
        rec["branches"] = built
    if cut:
        rec["cut_at_deadline"] = True
    records.append(rec)
    print(json.dumps(rec), flush=True)
    if cut:
        raise Cut(name)
    if rc != 0:
        raise SystemExit(f"stage {name} failed (exit {rc}):\n{''.join(lines[-20:])}")
    rec["output_tail"] = "".join(lines[-3:])
    return rec


class Cut(Exception):
    """A stage was stopped at the deadline; the rehearsal goes on in a later call."""


def git_publish_room(work: Path) -> tuple[int, int]:
    """(bytes a git publish of the three branches needs, bytes free under `work`).

    The git backend writes every published byte into its cache repository, the push copies it
    into the bare remote, and the check clones each branch back (one at a time) before
    deleting the clone: about twice the branches plus the largest of them.
    """
    sizes = [du(branch_dir(work, g)) for g in GROUP_SIZES]
    return 2 * sum(sizes) + max(sizes), shutil.disk_usage(work).free


def args_record(a: argparse.Namespace) -> dict[str, Any]:
    """The command line's arguments as JSON can hold them (paths such as --pass-store as text)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}


def prepare(a: argparse.Namespace, work: Path) -> tuple[Path, float]:
    """Build the synthetic model and the rehearsal's release config in a fresh `work`."""
    create_owned(work, "the rehearsal")  # a --work folder glmrel did not make is refused, never emptied
    t0 = time.time()
    # in a child process: this one never holds GPU memory, so the stages' GPU peaks are theirs
    synthetic = [sys.executable, "-m", "benchmarks.synthetic", "--preset", a.preset, "--out", str(work)]
    synthetic += ["--layers", str(a.layers), "--device", a.device, "--samples", str(a.samples), "--seq", str(a.seq)]
    synthetic += [x for g in GROUP_SIZES for x in ("--group-size", str(g))]
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
    return config, build_s


def publish_stages(
    a: argparse.Namespace, config: Path, work: Path, env: dict[str, str], records: list[dict], save: Any
) -> None:
    """`publish` to each remote twice (the second must do nothing); a git publish the disk
    cannot hold is recorded as skipped, with the figures."""
    publish = ["publish", "--config", str(config), "--changelog", "v1"]
    remotes = {"git": [], "hub": ["--remote", "hf://glmrel-rehearsal/glm47"]}
    for name in a.publish.split(","):
        if name == "git":
            need, free = git_publish_room(work)
            if need > free:
                records.append(
                    {
                        "stage": "publish git",
                        "skipped": f"needs about {need / 2**30:.0f} GiB of disk (its cache repository and the bare"
                        f" remote each hold every published byte, and a branch is cloned back), {free / 2**30:.0f}"
                        " GiB free",
                    }
                )
                print(json.dumps(records[-1]), flush=True)
                save()
                continue
        stage(f"publish {name}", [*publish, *remotes[name]], work, env, records)
        save()
        stage(f"publish {name} again", [*publish, *remotes[name]], work, env, records)
        save()


STAGES = ("model", "build", "check", "publish")


def rehearse(a: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    from hub_double import HubDouble

    started = time.time()
    deadline = started + a.deadline if a.deadline else None
    work = a.work.resolve()
    stages = a.stages.split(",")
    if unknown := set(stages) - set(STAGES):
        raise SystemExit(f"--stages: unknown {sorted(unknown)}; choose from {','.join(STAGES)}")
    config = work / "release.yaml"
    records: list[dict] = []
    build_s = None
    if "model" in stages:
        config, build_s = prepare(a, work)
    else:
        # a later device call on the same machine goes on where an earlier one stopped
        if not config.is_file():
            raise SystemExit(f"--stages {a.stages}: {work} holds no rehearsal; run the model stage first")
        if "build" not in stages and not (work / "branches").is_dir():
            raise SystemExit(f"--stages {a.stages}: {work} holds no built release; run the build stage first")
        if a.json and a.json.exists():
            before = json.loads(a.json.read_text())
            records = before.get("stages", [])
            build_s = before.get("synthetic_build_s")

    def save() -> None:
        if a.json:
            args = args_record(a)
            a.json.write_text(json.dumps({"args": args, "synthetic_build_s": build_s, "stages": records}, indent=1))

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
        gpus += ["--separate"] if a.separate else []
        if a.pass_store is not None:
            import yaml

            raw = yaml.safe_load(config.read_text())
            raw.setdefault("offload", {})["pass_store"] = str(a.pass_store)
            config.write_text(yaml.safe_dump(raw, sort_keys=False))
        try:
            if "build" in stages:
                # build-all skips the branches an earlier, cut call finished
                name = (
                    "build-all (resumed)" if any(r["stage"].startswith("build-all") for r in records) else "build-all"
                )
                stage(name, ["build-all", "--config", str(config), *gpus], work, env, records, deadline)
                save()
            if "check" in stages:
                for g in GROUP_SIZES:
                    stage(f"check GS{g}", ["check", str(branch_dir(work, g))], work, env, records)
                save()
            if "publish" in stages:
                publish_stages(a, config, work, env, records, save)
        except Cut as e:
            save()
            raise SystemExit(
                f"cut at the deadline in {e}: go on with --stages build,... (build-all skips the finished branches)"
            ) from None
    if not all((branch_dir(work, g) / "verify.json").is_file() for g in GROUP_SIZES):
        # `--stages model`: the model and its config, to build from by hand (a profiler's run)
        print(f"no built release in {work} (stages {a.stages}): the model and its config only", flush=True)
        return {"preset": a.preset, "layers": a.layers, "synthetic_build_s": build_s, "stages": records}
    logs = {g: read_build_log(branch_dir(work, g).parent, branch_dir(work, g).name) for g in GROUP_SIZES}
    verify = {g: json.loads((branch_dir(work, g) / "verify.json").read_text()) for g in GROUP_SIZES}
    for g in GROUP_SIZES:  # how long verify took is in the build log, not in the branch
        verify[g]["seconds"] = logs[g].get("verify", {}).get("seconds")
    prov = json.loads((branch_dir(work, 64) / "provenance.json").read_text())
    built = logs[64].get("quantize", {})
    from release.build.branch_folder import resolve_base_model
    from release.config import load_config

    base = resolve_base_model(load_config(config))
    return {
        "preset": a.preset,
        "layers": a.layers,
        "samples": a.samples,
        "seq": a.seq,
        "gpus": a.gpus,
        "synthetic_build_s": None if build_s is None else round(build_s, 1),
        "stages": records,
        "verify": {
            g: {k: v[k] for k in ("mean_kl", "top1_agreement", "seconds", "method", "layers", "passed")}
            for g, v in verify.items()
        },
        "quantize_timings_s_gs64": built.get("timings_s", {}),
        # every branch's: in one pass the first saves as a build would, the others finish from stores
        "quantize_timings_s": {g: logs[g].get("quantize", {}).get("timings_s", {}) for g in GROUP_SIZES},
        # build-all's last step per branch (manifest, then the check that trusts the build's hashes)
        "seal_s": {g: logs[g].get("seal", {}).get("seconds") for g in GROUP_SIZES},
        "base_model_gib": round(sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**30, 2),
        "libraries": prov.get("libraries"),
        "gpu": built.get("timings_s", {}).get("gpu"),
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
    ap.add_argument("--separate", action="store_true", help="build-all --separate: a calibration pass per branch")
    ap.add_argument(
        "--pass-store",
        type=Path,
        default=None,
        help="offload.pass_store for one GPU's single pass (e.g. /dev/shm/glmrel: a device's disk holds the "
        "branches, not the side branches' stores too)",
    )
    ap.add_argument(
        "--publish",
        default="git,hub",
        help="remotes to publish to, in order: git (a local bare repo), hub (the Hub double on loopback)",
    )
    ap.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="model (the synthetic model and its config), build (build-all), check, publish; without model, goes"
        " on in --work where an earlier call stopped and appends to its --json",
    )
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds from the start: build-all still running then is stopped and recorded as cut (a device call"
        " is limited to 10 minutes); run again with --stages build,check,publish to go on",
    )
    a = ap.parse_args()
    report = rehearse(a)
    text = json.dumps(report, indent=1)
    if a.json:
        a.json.write_text(text + "\n")
    for r in report["stages"]:
        if "skipped" in r:
            print(f"{r['stage']:20} skipped: {r['skipped']}")
            continue
        print(
            f"{r['stage']:20} {r['wall_s']:8.1f} s  host {r['peak_host_rss_gib']:6.1f} GiB  "
            f"GPU {r['peak_gpu_gib']} GiB  disk {r['disk_gib']:.1f} GiB"
        )


if __name__ == "__main__":
    main()
