"""One calibration pass for all branches against one pass per branch, on a release config.

Builds every branch of the config twice into two folders under --work: once as `build-all`
does on one GPU (one pass; the first branch's smoothed layers propagate, the others are
smoothed beside it: release/awq/side.py) and once with `--separate` (a pass per branch).
Then, per branch: how many saved tensors differ between the two builds and in which decoder
layers, and both builds' quality against the base model (`glmrel verify`'s streamed KL and
top-1 agreement on the config's held-out texts), with the one-pass KL's difference from the
separate build's in percent. Prints a table; `--json` also writes the record.

  python -m benchmarks.single_pass                                  # the demo release (CPU, ~90 s)
  python -m benchmarks.single_pass --samples 8 --seq 64             # smaller calibration, faster
  # GLM-4.7 layer dims on a GPU (random weights: no verify; each build hashed, then deleted)
  python -m benchmarks.synthetic --preset glm47 --layers 2 --device cuda --out out/syn \
      --group-size 32 --group-size 64 --group-size 128 --samples 256 --seq 2048
  python -m benchmarks.single_pass --config out/syn/release.yaml --no-verify --drop --json out/sp.json

Each build is `build_branches` as `build-all` runs it (load, calibration, save, records): the
one-pass wall time against the separate one is the figure the README quotes.

Nothing here asserts: tests/test_single_pass.py checks the recorded figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from release.build_log import read_build_log
from release.numerics import REPRODUCIBLE_CPU_ENV

os.environ.update(REPRODUCIBLE_CPU_ENV)  # before torch: the demo's reproducible CPU numerics

import yaml  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def variant_config(
    source: Path, output_dir: Path, samples: int | None, seq: int | None, pass_store: Path | None = None
) -> Path:
    """`source` with its relative paths made absolute, its output in `output_dir` and,
    when given, another calibration size; written beside the output."""
    from release.config import resolve_paths

    raw = resolve_paths(yaml.safe_load(source.read_text()), source.resolve().parent)
    raw["output_dir"] = str(output_dir)
    if samples is not None:
        raw["calibration"]["num_samples"] = samples
    if seq is not None:
        raw["calibration"]["max_seq_length"] = seq
    if pass_store is not None:
        raw.setdefault("offload", {})["pass_store"] = str(pass_store)
    path = output_dir.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def tensor_hashes(folder: Path) -> dict[str, str]:
    """Every saved tensor of a branch by name: a digest of its dtype, shape and bytes."""
    import hashlib

    import torch
    from safetensors import safe_open

    out: dict[str, str] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                d = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=16)
                d.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
                out[k] = d.hexdigest()
    return out


def tensor_differences(x: dict[str, str], y: dict[str, str]) -> dict[str, Any]:
    """Two builds of one branch, by their tensor hashes: how many, how many differ, in which layers."""
    if x.keys() != y.keys():
        return {"tensors": len(x), "same_names": False, "differ": None, "layers": None}
    differ = sorted(k for k in x if x[k] != y[k])
    layers = sorted({int(k.split(".")[2]) for k in differ if k.startswith("model.layers.")})
    return {"tensors": len(x), "same_names": True, "differ": len(differ), "layers": layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    ap.add_argument("--work", type=Path, default=REPO / "out" / "bench-single-pass")
    ap.add_argument("--samples", type=int, default=None, help="calibration samples (default: the config's)")
    ap.add_argument("--seq", type=int, default=None, help="calibration sequence length (default: the config's)")
    ap.add_argument("--no-verify", action="store_true", help="skip the KL against the base (random weights)")
    ap.add_argument("--drop", action="store_true", help="delete each build once hashed (disk)")
    ap.add_argument("--pass-store", type=Path, default=None, help="offload.pass_store (e.g. /dev/shm/glmrel)")
    ap.add_argument("--no-hash", action="store_true", help="skip the tensor comparison (time)")
    ap.add_argument(
        "--separate-branch",
        default=None,
        help="in the separate mode build only this branch: the three separate builds are then "
        "estimated as three times its time (a device call's limit; said so in the record)",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--modes",
        default="one_pass,separate",
        help="which builds to run now; with --json, a mode run earlier is read back from it "
        "(the two halves in two device calls)",
    )
    a = ap.parse_args()
    a.work = a.work.resolve()  # the variant configs resolve relative paths against their own folder

    import shutil

    from release.build import one_pass, quantize
    from release.build.branch_folder import resolve_base_model
    from release.build.quantize import build_branches
    from release.config import load_config
    from release.tiny import ensure_demo_assets
    from release.verify.branch import BaseReference, load_heldout, verify_branches

    if a.config.resolve() == (REPO / "configs" / "demo.yaml").resolve():
        ensure_demo_assets()
    record: dict[str, Any] = {"config": str(a.config), "machine": machine(), "builds": {}, "hashes": {}}
    if a.json and a.json.is_file():
        earlier = json.loads(a.json.read_text())
        record["builds"], record["hashes"] = earlier.get("builds", {}), earlier.get("hashes", {})
    cfgs, hashes, quality = {}, record["hashes"], {}
    for mode in ("one_pass", "separate"):
        cfg = load_config(variant_config(a.config, a.work / mode, a.samples, a.seq, a.pass_store))
        cfgs[mode] = cfg
        if mode not in a.modes.split(","):
            continue
        names = [b.name for b in cfg.branches]
        if mode == "separate" and a.separate_branch:
            names = [a.separate_branch]
        hashes[mode] = {}
        if a.drop:  # each branch hashed and its weights deleted once sealed: one branch on disk at a time
            real_seal = quantize.seal_folder
            hashing = [0.0]

            # the one pass's side branches are made in the propagating branch's saved layout:
            # its weights stay until the pass ends
            kept: list[Path] = []

            def seal_then_drop(
                job, *args, real_seal=real_seal, mode=mode, hashing=hashing, kept=kept, lead=names[0], **kwargs
            ):
                real_seal(job, *args, **kwargs)
                out, branch = job.out_dir, job.spec
                t = time.time()
                if not a.no_hash:
                    hashes[mode][branch.name] = tensor_hashes(out)
                if mode == "one_pass" and branch.name == lead:
                    kept.append(out)
                else:
                    for f in out.glob("*.safetensors"):
                        f.unlink()
                hashing[0] += time.time() - t

            quantize.seal_folder = one_pass.seal_folder = seal_then_drop  # both call it
        t = time.time()
        try:
            builds = build_branches(cfg, names, 1, None, force=True, separate=mode == "separate", echo=print)
        finally:
            if a.drop:
                quantize.seal_folder = one_pass.seal_folder = real_seal
                for out in kept:
                    for f in out.glob("*.safetensors"):
                        f.unlink()
        wall = round(time.time() - t - (hashing[0] if a.drop else 0.0), 1)
        per_branch = {}
        for b in builds:
            timings = read_build_log(cfg.output_dir, b.branch).get("quantize", {}).get("timings_s", {})
            per_branch[b.branch] = {"seconds": b.seconds, **{k: timings.get(k) for k in TIMING_KEYS if k in timings}}
        record["builds"][mode] = {"wall_s": wall, "branches": per_branch}
        if len(builds) < len(cfg.branches):
            record["builds"][mode]["estimated_wall_s"] = round(wall * len(cfg.branches) / len(builds), 1)
            record["builds"][mode]["estimate"] = (
                f"{len(cfg.branches)} x the {len(builds)} branch(es) built: a build's time does not depend on "
                "its group size (the same forward and grid search)"
            )
        print(f"{mode}: {len(builds)} branches in {wall} s", flush=True)
        if not a.drop and not a.no_hash:
            hashes[mode] = {b.name: tensor_hashes(cfg.output_dir / b.name) for b in cfg.branches}
        if not a.no_verify:
            reference = BaseReference(resolve_base_model(cfg), load_heldout(cfg), cfg.verify.max_tokens)
            quality[mode] = verify_branches(cfg, {b.name: cfg.output_dir / b.name for b in cfg.branches}, reference)
        if a.drop:
            shutil.rmtree(cfg.output_dir)
    cfg = cfgs["one_pass"]
    record["calibration"] = {"samples": cfg.calibration.num_samples, "max_seq_length": cfg.calibration.max_seq_length}
    if set(record["builds"]) != {"one_pass", "separate"}:
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"recorded {', '.join(record['builds'])}; run the other mode with the same --json to compare")
        return
    sep = record["builds"]["separate"]
    record["wall_ratio"] = round(record["builds"]["one_pass"]["wall_s"] / sep.get("estimated_wall_s", sep["wall_s"]), 3)
    lead = cfg.branches[0].name
    rows = []
    for b in cfg.branches:
        row: dict[str, Any] = {
            "branch": b.name,
            "role": "propagating" if b.name == lead else "side",
        }
        if b.name in hashes.get("one_pass", {}) and b.name in hashes.get("separate", {}):
            row.update(tensor_differences(hashes["one_pass"][b.name], hashes["separate"][b.name]))
        if quality:
            q_one, q_sep = quality["one_pass"][b.name], quality["separate"][b.name]
            row.update(
                kl_one_pass=q_one.mean_kl,
                kl_separate=q_sep.mean_kl,
                kl_change_pct=round(100 * (q_one.mean_kl - q_sep.mean_kl) / q_sep.mean_kl, 3),
                top1_one_pass=q_one.top1_agreement,
                top1_separate=q_sep.top1_agreement,
            )
        rows.append(row)
    record["branches"] = rows
    print()
    print(
        f"wall time: one pass {record['builds']['one_pass']['wall_s']} s, separate "
        f"{sep.get('estimated_wall_s', sep['wall_s'])} s{' (estimated)' if 'estimate' in sep else ''} "
        f"({record['wall_ratio']:.3f}x)"
    )
    print(
        "| branch | role | tensors differing (of) | layers differing | KL one pass | KL separate | change | top-1 one / separate |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        kl = (
            f"{r['kl_one_pass']:.6f} | {r['kl_separate']:.6f} | {r['kl_change_pct']:+.2f} % "
            f"| {r['top1_one_pass']:.4f} / {r['top1_separate']:.4f}"
            if "kl_one_pass" in r
            else "not measured | | | "
        )
        same = f"{r['differ']} ({r['tensors']}) | {r['layers']}" if "differ" in r else "not compared | "
        print(f"| {r['branch']} | {r['role']} | {same} | {kl} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(record, indent=1) + "\n")


TIMING_KEYS = (
    "load",
    "oneshot",
    "quantize",
    "save",
    "finish",
    "calibration_pass_s",
    "peak_gpu_gib",
    "peak_host_rss_gib",
)


def machine() -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    main()
