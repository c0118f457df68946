"""The MTP layer carried into a branch (`calibrate._carry_mtp_layers`): glmrel's byte copy
(`layout.copy_tensors`) against compressed-tensors' `save_mtp_tensors_to_checkpoint`, which loads
the layer into memory whole and writes it with `save_file`. A GLM-4.7 MTP layer is 7.6 GiB; every
branch carries it, two side branches at a time.

Makes (once) a base folder under `--work` with an MTP layer of about `--gib` GiB of bf16 in a
shard of its own beside another layer's shard, then, `--repeat` times, each mode in a process of
its own into a fresh branch folder (a config and one shard, as a saved branch has), after a
`sync` so that no run pays for the last one's writes. Prints each
run's seconds and the process's peak RSS growth, and whether the two modes wrote the same MTP
shard and index, byte for byte (their configs differ by design: compressed-tensors' ignore entry
leaves the dots unescaped). Asserts nothing.

    python -m benchmarks.mtp_carry --work /tmp/mtp --gib 2 [--repeat 3] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from release.manifest import sha256_file

LAYER = 4  # the MTP layer's index: model.layers.4.* after 4 decoder layers

RUN = """
import json, resource, sys, time
from pathlib import Path
from types import SimpleNamespace
from compressed_tensors.utils import save_mtp_tensors_to_checkpoint
from release.build.calibrate import _carry_mtp_layers
mode, base, out, layer = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the imports' memory already in
t = time.perf_counter()
if mode == "compressed-tensors":
    save_mtp_tensors_to_checkpoint(
        base, str(out), mtp_prefix=f"model.layers.{layer}.", shard_name=f"model-mtp-{layer}.safetensors"
    )
else:
    _carry_mtp_layers(Path(base), out, SimpleNamespace(mtp_layers=(layer,)))
s = time.perf_counter() - t
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"s": round(s, 3), "rss_growth_gib": round((after - before) / 2**20, 3), "peak_rss_gib": round(after / 2**20, 3)}))
"""


def make_base(base: Path, gib: float) -> None:
    import torch
    from safetensors.torch import save_file

    if (base / "model.safetensors.index.json").is_file():
        return
    base.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    n = max(1, round(gib * 2**30 / (1536 * 5120 * 2)))  # experts' projections of GLM-4.7's size
    mtp = {
        f"model.layers.{LAYER}.mlp.experts.{i}.down_proj.weight": torch.randn(5120, 1536, generator=g).bfloat16()
        for i in range(n)
    }
    mtp[f"model.layers.{LAYER}.enorm.weight"] = torch.ones(5120, dtype=torch.bfloat16)
    save_file(mtp, str(base / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    other = {"model.layers.3.input_layernorm.weight": torch.ones(5120, dtype=torch.bfloat16)}
    save_file(other, str(base / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = dict.fromkeys(mtp, "model-00002-of-00002.safetensors") | dict.fromkeys(
        other, "model-00001-of-00002.safetensors"
    )
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def branch_folder(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    save_file(
        {"model.layers.3.input_layernorm.weight": torch.ones(8)},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (out / "config.json").write_text(json.dumps({"quantization_config": {"ignore": ["lm_head"]}}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="a scratch folder (the base model is kept there)")
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    base = a.work / "base"
    make_base(base, a.gib)
    gib = round(sum(f.stat().st_size for f in base.glob("model-00002*")) / 2**30, 2)
    runs, written = [], {}
    root = Path(__file__).resolve().parent.parent
    for i in range(a.repeat):
        for mode in ("compressed-tensors", "glmrel"):
            out = a.work / mode
            branch_folder(out)
            os.sync()  # the last run's written pages to disk: each run starts with none dirty
            proc = subprocess.run(
                [sys.executable, "-c", RUN, mode, str(base), str(out), str(LAYER)],
                cwd=root,
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                raise SystemExit(f"{mode} failed:\n{proc.stderr[-2000:]}")
            row = {"mode": mode, "round": i, **json.loads(proc.stdout.strip().splitlines()[-1])}
            runs.append(row)
            print(f"{mode}: {row['s']} s, peak RSS +{row['rss_growth_gib']} GiB ({gib} GiB MTP layer)")
            written[mode] = {
                f: sha256_file(out / f) for f in (f"model-mtp-{LAYER}.safetensors", "model.safetensors.index.json")
            }
    same = written["compressed-tensors"] == written["glmrel"]
    median = {m: statistics.median(r["s"] for r in runs if r["mode"] == m) for m in written}
    print(f"median: {median} s; the same MTP shard and index: {same}")
    if a.json:
        a.json.write_text(
            json.dumps({"gib": gib, "runs": runs, "median_s": median, "same_bytes": same}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
