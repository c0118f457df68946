"""How fast a branch's shards are written from other safetensors files: what a side branch of a
one-pass build does once the pass is over (`one_pass.finish_side_branch` -> `layout.write_shards`:
every tensor read from the pass's store or the propagating branch, each shard written anew).

Copies a built branch's weight shards (its index's layout, MTP shard left out, as the side branch
makes them; `--shard-gib` cuts the same tensors into smaller shards, as many as a full release's
5 GB shards give the writers) into a scratch folder with 1 writer thread and with `--writers` threads, alternating,
`--repeat` times each; every copy must be byte for byte the first one. The source is read from the
page cache after the first round (the pass has just written it, so the side branch reads it warm
too).

    python -m benchmarks.shard_writes --branch /dev/shm/out/W4A16_GS32 --out /dev/shm/copy --json OUT.json

`--via save_file` loads each shard's tensors and writes them with safetensors' `save_file` (what
glmrel did before `layout.copy_tensors`), for a side-by-side: run each in its own process, so that
the peak RSS printed is that mode's. Prints seconds and GiB/s per run, the shards' digest and
the process's peak RSS; asserts nothing but equal bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from release.layout import DTYPE_BYTES, read_weight_map, write_shards


def _digest(folder: Path, shards: list[str]) -> str:
    h = hashlib.sha256()
    for shard in shards:
        with open(folder / shard, "rb") as f:
            while chunk := f.read(64 << 20):
                h.update(chunk)
    return h.hexdigest()


def _resharded(weight_map: dict[str, str], branch: Path, shard_gib: float) -> dict[str, list[str]]:
    """The same tensors in the same order, cut into shards of about `shard_gib` GiB."""
    from safetensors import safe_open

    by_shard: dict[str, list[str]] = {}
    size, k = 0, 0
    for shard in dict.fromkeys(weight_map.values()):
        with safe_open(str(branch / shard), framework="pt") as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                nbytes = math.prod(sl.get_shape()) * DTYPE_BYTES[sl.get_dtype()]
                if size and size + nbytes > shard_gib * 2**30:
                    k, size = k + 1, 0
                by_shard.setdefault(f"part-{k:05d}.safetensors", []).append(name)
                size += nbytes
    return by_shard


def measure(
    branch: Path, out: Path, writers: int, repeat: int, shard_gib: float | None = None, via: str = "copy"
) -> dict[str, Any]:
    """`via`: "copy" (layout.copy_tensors' byte copies, what a build does) or "save_file" (each
    shard's tensors loaded and written by safetensors' `save_file`, copy_tensors' fallback and
    what glmrel did before it)."""
    if via == "save_file":
        from unittest import mock

        from release import layout

        with mock.patch.object(layout, "_library_order", lambda entries, metadata: None):
            return measure(branch, out, writers, repeat, shard_gib)
    weight_map = {n: s for n, s in read_weight_map(branch).items() if not s.startswith("model-mtp")}
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    size = sum((branch / s).stat().st_size for s in by_shard)
    if shard_gib:
        by_shard = _resharded(weight_map, branch, shard_gib)
    source = {name: branch / shard for name, shard in weight_map.items()}
    runs: list[dict[str, Any]] = []
    digest = None
    for _ in range(repeat):
        for w in (1, writers):
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            t = time.perf_counter()
            write_shards(out, by_shard, source, writers=w)
            s = time.perf_counter() - t
            d = _digest(out, list(by_shard))
            digest = digest or d
            if d != digest:
                raise SystemExit(f"writers={w} wrote other bytes than the first run")
            runs.append({"writers": w, "s": round(s, 2), "gib_s": round(size / s / 2**30, 2)})
    shutil.rmtree(out, ignore_errors=True)
    per = {w: [r["s"] for r in runs if r["writers"] == w] for w in (1, writers)}
    return {
        "branch": str(branch),
        "shards": len(by_shard),
        "shard_gib": shard_gib,
        "gib": round(size / 2**30, 2),
        "cpus": os.cpu_count(),
        "runs": runs,
        "median_s": {str(w): statistics.median(v) for w, v in per.items()},
        "speedup": round(statistics.median(per[1]) / statistics.median(per[writers]), 2),
        "same_bytes": True,
        "digest": digest,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--branch", type=Path, required=True, help="a built branch folder")
    ap.add_argument("--out", type=Path, required=True, help="a scratch folder (removed after)")
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--shard-gib", type=float, default=None, help="re-cut into shards of this size (default: as built)")
    ap.add_argument(
        "--via",
        choices=("copy", "save_file"),
        default="copy",
        help="copy: the tensors' bytes copied (what a build does); save_file: loaded and written by safetensors",
    )
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    rec = {"via": a.via, **measure(a.branch, a.out, a.writers, a.repeat, a.shard_gib, a.via)}
    for r in rec["runs"]:
        print(f"writers {r['writers']}: {r['s']} s, {r['gib_s']} GiB/s ({rec['gib']} GiB in {rec['shards']} shards)")
    print(f"median: {rec['median_s']} s; {a.writers} writers {rec['speedup']}x one; peak RSS {rec['peak_rss_gib']} GiB")
    if a.json:
        a.json.write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
