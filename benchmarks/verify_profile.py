"""Where the streaming verify's time goes: `verify_branches` (what build-all runs after the
branches are built: the base model and every branch streamed layer by layer, the base read once)
under torch's profiler, its time summed by the spans release/verify/stream.py names
(`verify.read`: tensors from the safetensors shards onto the device, `decompress`, `fuse`:
per-expert tensors stacked into transformers' fused parameters, `materialize`: the meta module
made real and loaded, `forward`, `divergence`, `digest`: the branches' content digests, `decode`
and `vllm_check`), with the top operators by host and by device time.

    python -m benchmarks.verify_profile --config /dev/shm/syn/release.yaml --json OUT.json

The branches must be built (`glmrel build-all`). Writes each branch's verify.json as verify does
(the same content when nothing changed). Prints the figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def profile_verify(
    config: Path, branches: list[str] | None = None, top: int = 15, read_ahead: int = 0
) -> dict[str, Any]:
    """`read_ahead`: pieces stream_compare reads ahead on threads (0, verify's default: each
    piece read when it is needed; the number of models: one layer of each ahead)."""
    import functools

    import torch
    from torch.profiler import ProfilerActivity, profile

    from release.build.branch_folder import resolve_base_model
    from release.config import load_config
    from release.verify import stream
    from release.verify.branch import BaseReference, load_heldout, verify_branches

    cfg = load_config(config)
    names = branches or [b.name for b in cfg.branches]
    folders = {n: cfg.output_dir / n for n in names}
    reference = BaseReference(resolve_base_model(cfg), load_heldout(cfg), cfg.verify.max_tokens)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    t0 = time.perf_counter()
    compare = stream.stream_compare
    stream.stream_compare = functools.partial(compare, read_ahead=read_ahead)  # what verify_branches calls
    try:
        with profile(activities=activities) as prof:
            reports = verify_branches(cfg, folders, reference)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    finally:
        stream.stream_compare = compare
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    # a span comes back twice under CUDA: the host's annotation (its wall time) and the device's
    # (time 0 on the host): summed by name, the host's count
    spans: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.key.startswith("verify."):
            span = spans.setdefault(e.key.removeprefix("verify."), {"s": 0.0, "calls": 0})
            span["s"] = round(span["s"] + e.cpu_time_total / 1e6, 3)
            span["calls"] = max(span["calls"], e.count)
    ops = [e for e in events if not e.key.startswith("verify.")]

    def row(e: Any) -> dict[str, Any]:
        return {
            "op": e.key,
            "calls": e.count,
            "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3),
            "device_s": round(getattr(e, "self_device_time_total", 0) / 1e6, 3),
        }

    return {
        "config": str(config),
        "branches": names,
        "heldout_tokens": sum(int(b.shape[1]) for b in reference.batches),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "read_ahead": read_ahead,
        "wall_s": round(wall, 2),
        "spans_s": dict(sorted(spans.items(), key=lambda kv: -kv[1]["s"])),
        "spans_sum_s": round(sum(v["s"] for v in spans.values()), 2),
        "top_host_ops": [row(e) for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top]],
        "top_device_ops": [row(e) for e in sorted(ops, key=lambda e: -getattr(e, "self_device_time_total", 0))[:top]],
        "passed": {n: r.passed for n, r in reports.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--branch", action="append", default=None, help="a branch (repeatable; default: all)")
    ap.add_argument("--read-ahead", type=int, default=0, help="pieces read ahead on threads (default 0, verify's)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    rec = profile_verify(a.config, a.branch, read_ahead=a.read_ahead)
    print(
        f"verify of {', '.join(rec['branches'])} on {rec['device']}, read-ahead {rec['read_ahead']}: {rec['wall_s']} s wall"
    )
    for name, v in rec["spans_s"].items():
        print(f"  {name:12s} {v['s']:9.2f} s  ({v['calls']} calls)")
    print("top host ops:", json.dumps(rec["top_host_ops"][:8], indent=1))
    print("top device ops:", json.dumps(rec["top_device_ops"][:8], indent=1))
    if a.json:
        a.json.write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
