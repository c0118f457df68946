"""glmrel's AWQ calibration against stock llm-compressor oneshot, side by side.

Builds a random-init GLM-4-MoE (benchmarks/synthetic.py: `tiny` for CI, `glm47` for
GLM-4.7's real per-layer dimensions at any depth), then, for each sample count and each
engine, runs `glmrel quantize`'s calibration (release.build.calibrate.calibrate: same recipe, same
data, MoE-aware) in a fresh subprocess so peak host memory is that run's alone. Prints per
layer: calibration-forward time, AWQ smoothing time, peak GPU and peak host memory, then
the stock/glmrel time ratio per layer, and how peak memory moves with the sample count.

  python -m benchmarks.scale --preset tiny --samples 4,8 --seq 128           # CPU, CI
  python -m benchmarks.scale --preset glm47 --layers 2 --samples 16,64 --seq 2048 --device cuda
  python -m benchmarks.scale --preset glm47 --layers 2 --samples 512 --seq 2048 --device cuda \
      --engines glmrel --gpus 1,2,4     # the same runs on 1, 2 and 4 GPUs, compared

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


def awq_overrides(pairs: list[str]) -> dict:
    """`--awq KEY=VALUE` pairs as the config's `awq` section reads them (VALUE parsed as YAML)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--awq {pair!r}: expected KEY=VALUE, e.g. --awq expert_search=sampled")
        out[key.strip()] = yaml.safe_load(value)
    return out


def bench_config(
    release_yaml: Path, engine: str, samples: int, seq: int, write: bool = False, awq: dict | None = None
) -> Path:
    """The release config of one run; `awq` overrides the glmrel engine's settings. The parent
    writes it (`write`) before launching; torchrun's ranks only read it: two ranks writing one
    file let a rank read it half-written."""
    import yaml

    path = release_yaml.with_name(f".bench-{engine}-{samples}-s{seq}.yaml")
    if write:
        raw = yaml.safe_load(release_yaml.read_text())
        raw["calibration"].update(num_samples=samples, max_seq_length=seq)
        raw.setdefault("awq", {})["engine"] = engine
        if engine == "glmrel":
            raw["awq"].update(awq or {})
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(yaml.safe_dump(raw, sort_keys=False))
        tmp.replace(path)
    return path


def weights_digest(model) -> str:
    """A digest of every parameter and buffer as stored (the CPU offload of an offloaded model,
    which is what gets saved): equal digests, equal weights bit for bit."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from compressed_tensors.offload import disable_onloading

    with disable_onloading():
        tensors = sorted(model.state_dict(keep_vars=True).items())

    def one(item):
        name, t = item
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        h = hashlib.blake2b(name.encode(), digest_size=16)
        h.update(data)  # releases the GIL: the threads hash in parallel
        return h.digest()

    with ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(one, tensors))
    return hashlib.blake2b(b"".join(parts), digest_size=16).hexdigest()


def run_one(
    release_yaml: Path,
    engine: str,
    samples: int,
    seq: int,
    scales_out: Path | None = None,
    memory_trace: Path | None = None,
) -> dict | None:
    """One calibration in this process (or on every torchrun rank); returns rank 0's records.
    No branch is saved. With `scales_out`, every chosen AWQ scale vector is saved there; with
    `memory_trace` (one GPU), the breakdown of the GPU memory peak is written there as JSON."""
    import dataclasses

    from release.awq import ScaleOptions
    from release.build import distributed
    from release.build.branch_folder import prepare_branch
    from release.build.calibrate import calibrate, resource_peaks
    from release.config import load_config

    if distributed.in_worker():
        distributed.init()

    cfg = load_config(bench_config(release_yaml, engine, samples, seq))
    branch = cfg.branches[0]
    job = prepare_branch(cfg, branch)
    t = time.time()
    options = dataclasses.replace(
        ScaleOptions.from_spec(cfg.awq),
        record_scales=scales_out is not None,
        check_write_back=bool(os.environ.get("GLMREL_CHECK_WRITE_BACK")),  # deferred write-back against the GPU copies
    )
    if memory_trace is not None:
        from benchmarks import gpu_memory

        gpu_memory.record()
    run = calibrate(job, lambda s: print(s, file=sys.stderr), options)
    import torch

    if memory_trace is not None:
        memory_trace.write_text(json.dumps(gpu_memory.finish(), indent=1) + "\n")
    # every rank's own timings: a rank that waits at AWQ's all-reduces waits for a slower one
    mine = {
        "rank": distributed.rank(),
        "allreduce_wait_s": round(run.stats.allreduce_wait_s, 2),
        "layers": [{"calib_s": r.calib_s, "smooth_s": r.smooth_s} for r in run.stats.layers],
    }
    ranks = [mine]
    if distributed.world_size() > 1:
        import torch.distributed as dist

        ranks = [None] * distributed.world_size()
        dist.all_gather_object(ranks, mine)
    if distributed.rank() != 0:
        distributed.barrier_and_close()
        return None
    digest = weights_digest(run.model)
    if scales_out is not None:
        torch.save(run.stats.scales, scales_out)
    distributed.barrier_and_close()
    stats = run.stats.to_json()
    return {
        "gpus": distributed.world_size(),
        "engine": engine,
        "awq_options": options.to_json(),
        "resident_cache": stats["resident_cache"],
        "samples": samples,
        "seq": seq,
        "tokens": run.calibration.total_tokens,
        "dense_layers": len(job.arch.dense_layers),
        "oneshot_s": run.timings["oneshot"],
        "wall_s": round(time.time() - t, 1),
        "peak_host_gib": resource_peaks()["peak_host_rss_gib"],
        "peak_gpu_gib": round(run.stats.peak_gpu_gib, 2),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "weights_digest": digest,
        "write_back": stats["write_back"],
        "batched_balance": stats["batched_balance"],  # batched balance layers
        "search_phase_s": stats["search_phase_s"],
        "allreduce_wait_s": stats["allreduce_wait_s"],
        "ranks": ranks,
        "expert_searches_run": stats["expert_searches_run"],  # this rank's share of the Gram searches
        **{k: stats[k] for k in ("layers", "expert_tokens_seen", "expert_tokens_kept", "mapping_s")},
    }


def _ratio_rows(n: int, base: dict, other: dict) -> list[str]:
    """Per layer: base time, other time, base / other (time = calibration forward + smoothing)."""
    rows = []
    for i, (lb, lo) in enumerate(zip(base["layers"], other["layers"])):
        tb, to = lb["calib_s"] + lb["smooth_s"], lo["calib_s"] + lo["smooth_s"]
        kind = "dense" if i < base["dense_layers"] else "MoE"
        rows.append(f"| {n} | {i} | {kind} | {tb:.1f} | {to:.1f} | {tb / to:.2f}x |")
    return rows


def table(records: list[dict]) -> str:
    out = []
    out.append(
        "| engine | samples | layer | kind | calibrate s | smooth s | total s | peak GPU GiB | reserved GiB "
        "| peak host GiB | of it pinned GiB |"
    )
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        for i, layer in enumerate(r["layers"]):
            kind = "dense" if i < r["dense_layers"] else "MoE"
            total = layer["calib_s"] + layer["smooth_s"]
            pinned = layer.get("pinned_host_gib")  # recorded from resident caches on
            reserved = layer.get("reserved_gpu_gib")  # from deferred write-back on
            out.append(
                f"| {r['engine']} | {r['samples']} | {i} | {kind} | {layer['calib_s']:.1f} | {layer['smooth_s']:.1f} "
                f"| {total:.1f} | {layer['peak_gpu_gib']:.2f} | {'-' if reserved is None else f'{reserved:.2f}'} "
                f"| {layer['peak_host_gib']:.2f} | {'-' if pinned is None else f'{pinned:.2f}'} |"
            )
    out.append("")
    out.append("| samples | layer | kind | stock s | glmrel s | stock / glmrel |")
    out.append("| --- | --- | --- | --- | --- | --- |")
    by = {(r["engine"], r["samples"]): r for r in records}
    for n in sorted({r["samples"] for r in records}):
        s, g = by.get(("stock", n)), by.get(("glmrel", n))
        if not (s and g):
            continue
        out += _ratio_rows(n, s, g)
    out.append("")
    out.append("| engine | samples | tokens | oneshot s | peak GPU GiB | peak host GiB (process) |")
    out.append("| --- | --- | --- | --- | --- | --- |")
    for r in sorted(records, key=lambda r: (r["engine"], r["samples"])):
        out.append(
            f"| {r['engine']} | {r['samples']} | {r['tokens']} | {r['oneshot_s']:.1f} | {r['peak_gpu_gib']:.2f} "
            f"| {r['peak_host_gib']:.2f} |"
        )
    out.append("")
    timed = [r for r in records if r.get("mapping_s")]
    if timed:
        out.append(
            "AWQ smoothing time by mapping kind (s): "
            + "; ".join(
                f"{r['engine']} N={r['samples']}: "
                + ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["mapping_s"].items()))
                for r in timed
            )
        )
    phased = [r for r in records if r.get("search_phase_s")]
    for r in phased:  # the batched balance layers' grid searches, by phase
        out.append(
            f"Grid-search phases (s), {r['engine']} N={r['samples']} {r.get('gpus', 1)} GPU: "
            + "; ".join(
                f"{kind} " + ", ".join(f"{p} {v:.1f}" for p, v in phases.items())
                for kind, phases in sorted(r["search_phase_s"].items())
            )
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


def scales_agreement(one_file: str, many_file: str) -> dict:
    """How far the AWQ scales chosen on N GPUs are from those chosen on one."""
    import torch

    s1, sn = torch.load(one_file), torch.load(many_file)
    cos = [torch.nn.functional.cosine_similarity(s1[k].flatten(), sn[k].flatten(), dim=0).item() for k in s1]
    same = sum(bool(torch.allclose(s1[k], sn[k], rtol=1e-2, atol=1e-4)) for k in s1)
    return {"mappings": len(s1), "same_1e-2": same, "min_cosine": round(min(cos), 6)}


def _one_gpu_runs(records: list[dict]) -> dict[int, dict]:
    """glmrel's 1-GPU record for each sample count: what the multi-GPU runs are compared with."""
    return {r["samples"]: r for r in records if r["engine"] == "glmrel" and r.get("gpus", 1) == 1}


def _compare_scales(records: list[dict]) -> None:
    """Fill in `scales_vs_1gpu` on every multi-GPU record whose 1-GPU run of the same N has saved
    its scales, whichever of the two ran first (--gpus 4,2,1, or --append across device calls)."""
    one = _one_gpu_runs(records)
    for r in records:
        n, f = r["samples"], r.get("scales_file")
        base = one[n].get("scales_file") if n in one else None
        if r.get("gpus", 1) > 1 and "scales_vs_1gpu" not in r and f and base:
            if Path(f).is_file() and Path(base).is_file():
                r["scales_vs_1gpu"] = scales_agreement(base, f)


def compare_gpus(records: list[dict]) -> str:
    """Multi-GPU against one GPU: time per layer, and how far the chosen AWQ scales moved."""
    out = [
        "| samples | GPUs | layer | kind | 1 GPU s | N GPUs s | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    one = _one_gpu_runs(records)
    for many in records:
        gpus, n = many.get("gpus", 1), many["samples"]
        if gpus == 1 or n not in one:
            continue
        out += [row.replace(f"| {n} |", f"| {n} | {gpus} |", 1) for row in _ratio_rows(n, one[n], many)]
        a = many.get("scales_vs_1gpu")
        if a:
            notes.append(
                f"N={n}, {gpus} GPUs: {a['same_1e-2']}/{a['mappings']} mappings chose the same scales (1e-2) as on one "
                f"GPU; min cosine {a['min_cosine']:.5f}; peak GPU per rank {many['peak_gpu_gib']:.2f} GiB vs "
                f"{one[n]['peak_gpu_gib']:.2f}"
            )
        if len(many.get("ranks") or []) > 1:
            notes.append(
                f"Per rank, N={n} on {gpus} GPUs (each layer's calibrate + smooth s; time waiting at AWQ's "
                "all-reduces s): "
                + "; ".join(
                    f"rank {x['rank']}: "
                    + " / ".join(f"{la['calib_s']:.1f} + {la['smooth_s']:.1f}" for la in x["layers"])
                    + f", wait {x['allreduce_wait_s']:.1f}"
                    for x in many["ranks"]
                )
            )
    return "\n".join(out + [""] + notes)


def report(records: list[dict]) -> str:
    text = table([r for r in records if r.get("gpus", 1) == 1])
    if any(r.get("gpus", 1) > 1 for r in records):
        text += "\n\n" + compare_gpus(records)
    return text


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
    ap.add_argument(
        "--gpus",
        default="1",
        help="comma-separated GPU counts for the glmrel runs, in the order given (e.g. 1,2,4 or 4,2); each count "
        "above 1 runs data-parallel and is compared with the 1-GPU run of the same N, from this run or --append's",
    )
    ap.add_argument(
        "--append",
        action="store_true",
        help="keep the records already in --json and add this run's (one report over both: e.g. the multi-GPU "
        "runs in one device call and the 1-GPU run in the next, when one call's time limit cannot hold all)",
    )
    ap.add_argument(
        "--awq",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the config's awq section for the glmrel runs (repeatable), e.g. resident_cache_gib=0",
    )
    ap.add_argument(
        "--stock-samples", default=None, help="comma-separated sample counts for stock (default: --samples)"
    )
    ap.add_argument(
        "--memory-trace",
        action="store_true",
        help="one GPU: also trace the allocator in each glmrel run and print what was alive at the peak "
        "(slower: do not read timings from these runs)",
    )
    ap.add_argument(
        "--check-write-back",
        action="store_true",
        help="with --gpus: after each layer, every rank compares the shared CPU copy of each smoothed weight with "
        "its own (the deferred write-back's split write-back; adds that copy's time to the multi-GPU runs)",
    )
    ap.add_argument("--report", type=Path, default=None, help="print the tables of a --json file and exit")
    ap.add_argument("--run-one", nargs=4, metavar=("RELEASE_YAML", "ENGINE", "SAMPLES", "SEQ"), help=argparse.SUPPRESS)
    ap.add_argument("--scales-out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--trace-out", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.report:
        print(report(json.loads(a.report.read_text())))
        return
    if a.run_one:
        yaml_path, engine, n, seq = a.run_one
        rec = run_one(Path(yaml_path), engine, int(n), int(seq), a.scales_out, a.trace_out)
        if rec is not None:
            print("RECORD " + json.dumps(rec), flush=True)
        return

    from release.build.distributed import CUDA_ALLOC_CONF

    if a.memory_trace:
        import torch

        if not torch.cuda.is_available():  # checked before building anything
            raise SystemExit(
                "--memory-trace traces the CUDA allocator, and this machine has no GPU "
                "(torch.cuda.is_available() is False): run it on a GPU machine, or drop --memory-trace"
            )
    try:
        gpu_counts = [int(x) for x in a.gpus.split(",")]
    except ValueError:
        gpu_counts = []
    if not gpu_counts or min(gpu_counts) < 1:
        raise SystemExit(f"--gpus takes GPU counts of 1 or more, e.g. 1,2,4; got {a.gpus!r}")
    if a.append and not a.json:
        raise SystemExit("--append adds to the records of --json FILE: pass --json too")
    samples = [int(x) for x in a.samples.split(",")]
    stock_samples = [int(x) for x in a.stock_samples.split(",")] if a.stock_samples else samples
    awq = awq_overrides(a.awq)
    most = max(samples + stock_samples)
    work = a.work / f"{a.preset}-{a.layers or 'default'}-n{most}-s{a.seq}"
    release_yaml = work / "release.yaml"
    if not release_yaml.is_file():
        # in a child process: GPU memory the build's allocator keeps would be missing from every run
        cmd = [sys.executable, "-m", "benchmarks.synthetic", "--preset", a.preset, "--out", str(work)]
        cmd += ["--device", a.device, "--group-size", str(a.group_size), "--samples", str(most), "--seq", str(a.seq)]
        subprocess.run(cmd + (["--layers", str(a.layers)] if a.layers else []), check=True)
    records = json.loads(a.json.read_text()) if a.append and a.json.is_file() else []
    engines = a.engines.split(",")
    # glmrel on each of --gpus' counts in their order, stock (the slow baseline) last: a run cut
    # short by a time limit still has the records that came before (--json is written after each)
    runs = [(n, "glmrel", g) for n in samples for g in gpu_counts if "glmrel" in engines]
    runs += [(n, "stock", 1) for n in stock_samples if "stock" in engines]
    for n, engine, gpus in runs:
        t = time.time()
        bench_config(release_yaml, engine, n, a.seq, write=True, awq=awq)  # before any rank reads it
        scales = work / f"scales-{engine}-{n}-{gpus}gpu.pt"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
        cmd = (launcher if gpus > 1 else [sys.executable]) + [
            "-m",
            "benchmarks.scale",
            "--run-one",
            str(release_yaml),
            engine,
            str(n),
            str(a.seq),
        ]
        if engine == "glmrel":
            cmd += ["--scales-out", str(scales)]
        trace = work / f"memory-{engine}-{n}.json"
        if a.memory_trace and engine == "glmrel" and gpus == 1:
            cmd += ["--trace-out", str(trace)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)  # as `glmrel quantize` runs
        if a.check_write_back and gpus > 1:  # costs a copy of each layer's weights: not in 1-GPU timings
            env["GLMREL_CHECK_WRITE_BACK"] = "1"
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RECORD ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{engine} with {n} samples failed (exit {proc.returncode})")
        rec = json.loads(lines[-1][len("RECORD ") :])
        rec["scales_file"] = str(scales) if engine == "glmrel" else None
        if "--trace-out" in cmd:
            rec["memory_trace"] = json.loads(trace.read_text())
        records.append(rec)
        _compare_scales(records)
        if a.json:  # after every run, so a run cut short still leaves its records
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(records, indent=1) + "\n")
        print(
            f"{engine:6} {gpus} GPU N={n:<4} oneshot {rec['oneshot_s']:.1f}s  peak GPU {rec['peak_gpu_gib']:.2f} GiB  "
            f"peak host {rec['peak_host_gib']:.2f} GiB  ({time.time() - t:.0f}s with load)",
            flush=True,
        )
    print()
    print(report(records))
    traced = sorted((r for r in records if r.get("memory_trace")), key=lambda r: r["samples"])
    for r in traced:
        t = r["memory_trace"]
        print(f"\nGPU memory at the peak, {r['engine']} N={r['samples']}: {t['peak_gib']:.2f} GiB traced")
        for site in t["sites"]:
            print(f"  {site['gib']:8.3f} GiB {site['count']:6d}x  {site['site']}")
    if len(traced) > 1:
        from benchmarks.gpu_memory import compare

        lo, hi = traced[0], traced[-1]
        print(f"\nWhat grows with the samples, N={lo['samples']} -> {hi['samples']}:")
        print("\n".join(compare(lo["memory_trace"], hi["memory_trace"], lo["samples"], hi["samples"])))


if __name__ == "__main__":
    main()
