"""glmrel's AWQ calibration against stock llm-compressor oneshot, side by side.

Builds a random-init GLM-4-MoE (benchmarks/synthetic.py: `tiny` for CI, `glm47` for
GLM-4.7's real per-layer dimensions at any depth), then, for each sample count and each
engine, runs `glmrel quantize`'s calibration (release.quantize.calibrate: same recipe, same
data, MoE-aware) in a fresh subprocess so peak host memory is that run's alone. Prints per
layer: calibration-forward time, AWQ smoothing time, peak GPU and peak host memory, then
the stock/glmrel time ratio per layer, and how peak memory moves with the sample count.

  python -m benchmarks.scale --preset tiny --samples 4,8 --seq 128           # CPU, CI
  python -m benchmarks.scale --preset glm47 --layers 2 --samples 16,64 --seq 2048 --device cuda

`--json FILE` also writes every record. Nothing here asserts a speed: the figures are
printed for people (and the README) to read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("stock", "glmrel")


def run_one(release_yaml: Path, engine: str, samples: int, seq: int) -> dict:
    """One calibration in this process; returns its records (no branch is saved)."""
    import yaml

    from release.config import load_config
    from release.quantize import calibrate, prepare_branch

    raw = yaml.safe_load(release_yaml.read_text())
    raw["calibration"].update(num_samples=samples, max_seq_length=seq)
    raw.setdefault("awq", {})["engine"] = engine
    path = release_yaml.with_name(f".bench-{engine}-{samples}.yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(path)
    branch = cfg.branches[0]
    base_dir, arch, recipe_text, _fp = prepare_branch(cfg, branch)
    t = time.time()
    run = calibrate(cfg, branch, base_dir, arch, recipe_text, echo=lambda s: print(s, file=sys.stderr))
    import resource

    import torch

    return {
        "engine": engine,
        "samples": samples,
        "seq": seq,
        "tokens": run.calibration.total_tokens,
        "dense_layers": len(arch.dense_layers),
        "oneshot_s": run.timings["oneshot"],
        "wall_s": round(time.time() - t, 1),
        "peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_gpu_gib": round(run.stats.peak_gpu_gib, 2),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "layers": [vars(r) for r in run.stats.layers],
        "expert_tokens_seen": run.stats.tokens_seen,
        "expert_tokens_kept": run.stats.tokens_kept,
    }


def table(records: list[dict]) -> str:
    out = []
    out.append("| engine | samples | layer | kind | calibrate s | smooth s | total s | peak GPU GiB | peak host GiB |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        for i, layer in enumerate(r["layers"]):
            kind = "dense" if i < r["dense_layers"] else "MoE"
            total = layer["calib_s"] + layer["smooth_s"]
            out.append(
                f"| {r['engine']} | {r['samples']} | {i} | {kind} | {layer['calib_s']:.1f} | {layer['smooth_s']:.1f} "
                f"| {total:.1f} | {layer['peak_gpu_gib']:.2f} | {layer['peak_host_gib']:.2f} |"
            )
    out.append("")
    out.append("| samples | layer | kind | stock s | glmrel s | stock / glmrel |")
    out.append("| --- | --- | --- | --- | --- | --- |")
    by = {(r["engine"], r["samples"]): r for r in records}
    for n in sorted({r["samples"] for r in records}):
        s, g = by.get(("stock", n)), by.get(("glmrel", n))
        if not (s and g):
            continue
        for i, (ls, lg) in enumerate(zip(s["layers"], g["layers"])):
            ts, tg = ls["calib_s"] + ls["smooth_s"], lg["calib_s"] + lg["smooth_s"]
            kind = "dense" if i < s["dense_layers"] else "MoE"
            out.append(f"| {n} | {i} | {kind} | {ts:.1f} | {tg:.1f} | {ts / tg:.2f}x |")
    out.append("")
    out.append("| engine | samples | tokens | oneshot s | peak GPU GiB | peak host GiB (process) |")
    out.append("| --- | --- | --- | --- | --- | --- |")
    for r in sorted(records, key=lambda r: (r["engine"], r["samples"])):
        out.append(
            f"| {r['engine']} | {r['samples']} | {r['tokens']} | {r['oneshot_s']:.1f} | {r['peak_gpu_gib']:.2f} "
            f"| {r['peak_host_gib']:.2f} |"
        )
    ns = sorted({r["samples"] for r in records})
    if len(ns) > 1:
        out.append("")
        for e in ENGINES:
            lo, hi = by.get((e, ns[0])), by.get((e, ns[-1]))
            if lo and hi:
                dn = ns[-1] - ns[0]
                out.append(
                    f"{e}: per extra sample, peak GPU {(hi['peak_gpu_gib'] - lo['peak_gpu_gib']) / dn * 1024:+.1f} MiB, "
                    f"peak host {(hi['peak_host_gib'] - lo['peak_host_gib']) / dn * 1024:+.1f} MiB"
                )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="benchmarks.synthetic preset (tiny, medium, glm47)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--samples", default="4,8", help="comma-separated sample counts")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cpu", help="where the random model is initialised")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--work", type=Path, default=Path("out/bench-scale"))
    ap.add_argument("--json", type=Path, default=None, help="also write the records here")
    ap.add_argument("--run-one", nargs=4, metavar=("RELEASE_YAML", "ENGINE", "SAMPLES", "SEQ"), help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.run_one:
        yaml_path, engine, n, seq = a.run_one
        print("RECORD " + json.dumps(run_one(Path(yaml_path), engine, int(n), int(seq))), flush=True)
        return

    from benchmarks.synthetic import build

    samples = [int(x) for x in a.samples.split(",")]
    work = a.work / f"{a.preset}-{a.layers or 'default'}"
    release_yaml = work / "release.yaml"
    if not release_yaml.is_file():
        build(a.preset, work, a.layers, a.device, [a.group_size], max(samples), a.seq)
    records = []
    for n in samples:
        for engine in a.engines.split(","):
            t = time.time()
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.scale", "--run-one", str(release_yaml), engine, str(n), str(a.seq)],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RECORD ")]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"{engine} with {n} samples failed (exit {proc.returncode})")
            rec = json.loads(lines[-1][len("RECORD ") :])
            records.append(rec)
            if a.json:  # after every run, so a run cut short still leaves its records
                a.json.parent.mkdir(parents=True, exist_ok=True)
                a.json.write_text(json.dumps(records, indent=1) + "\n")
            print(
                f"{engine:6} N={n:<4} oneshot {rec['oneshot_s']:.1f}s  peak GPU {rec['peak_gpu_gib']:.2f} GiB  "
                f"peak host {rec['peak_host_gib']:.2f} GiB  ({time.time() - t:.0f}s with load)",
                flush=True,
            )
    print()
    print(table(records))


if __name__ == "__main__":
    main()
