"""Where a calibration run's peak GPU memory goes, from PyTorch's allocator trace.

`record()` turns on `torch.cuda.memory._record_memory_history` (Python stacks of every
allocation); `breakdown()` replays the trace of `torch.cuda.memory._snapshot()`, finds the
moment the live allocations peaked, and groups what was alive then by the code that allocated
it (the innermost frames outside PyTorch). Comparing two sample counts shows which allocations
grow with the samples.

  python -m benchmarks.scale ... --memory-trace     # one trace per glmrel run, next to --json
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

FREED = ("free_requested",)  # dead from the program's view (the allocator may reuse it later)


def record(max_entries: int = 3_000_000) -> None:
    import torch

    torch.cuda.memory._record_memory_history(max_entries=max_entries, context="alloc", stacks="python")


def _site(frames: list[dict[str, Any]], depth: int) -> str:
    """The `depth` innermost frames outside torch itself, innermost first."""
    out = []
    for f in frames:
        name = f.get("filename", "?")
        if "/torch/" in name and "/torch/_tensor" not in name:
            continue
        short = "/".join(name.split("/")[-2:])
        out.append(f"{short}:{f.get('line', '?')} {f.get('name', '?')}")
        if len(out) == depth:
            break
    return " < ".join(out) or "(torch internals)"


def breakdown(snapshot: dict[str, Any], top: int = 25, depth: int = 3) -> dict[str, Any]:
    """The peak of live allocations in the longest device trace of `snapshot`, and what was
    alive at that moment, grouped by allocation site (bytes, count), largest first. Allocations
    made before the trace began are not seen: `unmatched_frees` counts their frees."""
    traces = snapshot.get("device_traces") or [[]]
    events = max(traces, key=len)
    live: dict[int, int] = {}
    total = peak = peak_at = unmatched = 0
    for i, e in enumerate(events):
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = e["size"]
            total += e["size"]
            if total > peak:
                peak, peak_at = total, i
        elif action in FREED:
            size = live.pop(e["addr"], None)
            if size is None:
                unmatched += 1
            else:
                total -= size
    alive: dict[int, dict[str, Any]] = {}
    for e in events[: peak_at + 1]:
        if e.get("action") == "alloc":
            alive[e["addr"]] = e
        elif e.get("action") in FREED:
            alive.pop(e["addr"], None)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in alive.values():
        g = groups[_site(e.get("frames") or [], depth)]
        g[0] += e["size"]
        g[1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    return {
        "events": len(events),
        "peak_gib": round(peak / 2**30, 3),
        "peak_event": peak_at,
        "unmatched_frees": unmatched,
        "sites": [{"site": k, "gib": round(v[0] / 2**30, 3), "count": v[1]} for k, v in ranked[:top]],
        "other_gib": round(sum(v[0] for _k, v in ranked[top:]) / 2**30, 3),
    }


def finish(top: int = 25) -> dict[str, Any]:
    """Stop recording; the breakdown of what was recorded."""
    import torch

    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    return breakdown(snap, top)


def compare(a: dict[str, Any], b: dict[str, Any], na: int, nb: int, top: int = 15) -> list[str]:
    """Sites whose bytes at the peak changed between runs of `na` and `nb` samples, per sample."""
    sa = {s["site"]: s["gib"] for s in a["sites"]}
    sb = {s["site"]: s["gib"] for s in b["sites"]}
    rows = []
    for site in sorted(set(sa) | set(sb), key=lambda k: -abs(sb.get(k, 0) - sa.get(k, 0))):
        d = sb.get(site, 0.0) - sa.get(site, 0.0)
        rows.append(
            f"{d / (nb - na) * 1024:+8.1f} MiB/sample  {sa.get(site, 0):7.3f} -> {sb.get(site, 0):7.3f} GiB  {site}"
        )
    return rows[:top]
