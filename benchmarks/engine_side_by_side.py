"""One branch built twice from the same inputs, the engine set two ways: the chosen AWQ scales'
agreement per kind of mapping, and each build's KL and top-1 agreement against the base model.

What a change to the engine that may move bits (a faster kernel) is judged by (issue 28: the
KL within 1 %, the scales' agreement recorded). Builds the config's first branch with its own
`awq:` settings ("a") and with `--awq KEY=VALUE` set ("b"), each into a folder of its own under
`--work`, then verifies both against one base reference.

  python -m benchmarks.engine_side_by_side --config /dev/shm/syn/release.yaml --samples 64 \\
      --awq fused_gpu_experts=false --work /dev/shm/sbs --json out/side-by-side.json

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.profile_layer import compare_scales


def _variant(release_yaml: Path, work: Path, label: str, samples: int | None, awq: list[str]) -> Path:
    import yaml

    raw = yaml.safe_load(release_yaml.read_text())
    if samples:
        raw["calibration"]["num_samples"] = samples
    raw["output_dir"] = str(work / label)
    raw["branches"] = raw["branches"][:1]
    for item in awq:
        key, _, value = item.partition("=")
        raw.setdefault("awq", {})[key] = yaml.safe_load(value)
    path = work / f"{label}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def build(config: Path, scales: Path) -> dict[str, Any]:
    """The config's first branch, built with every chosen scale recorded (saved to `scales`)."""
    import torch

    from release.awq import ScaleOptions
    from release.awq.stats import ENGINE_COUNTERS
    from release.build.quantize import quantize_branch
    from release.config import load_config

    cfg = load_config(config)
    branch = cfg.branches[0].name
    options = dataclasses.replace(ScaleOptions.from_spec(cfg.awq), record_scales=True)
    t = time.perf_counter()
    built = quantize_branch(cfg, branch, force=True, echo=lambda s: None, scale_options=options)
    stats = built.stats
    torch.save(stats.scales, scales)
    engine = stats.to_json()
    return {
        "branch": branch,
        "folder": str(built.path),
        "build_s": round(time.perf_counter() - t, 1),
        "layers": [dataclasses.asdict(r) for r in stats.layers],
        "engine": {k: engine[k] for k in ENGINE_COUNTERS},
        "awq": cfg.awq.model_dump(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="a release config (e.g. benchmarks.synthetic's)")
    ap.add_argument("--awq", action="append", default=[], metavar="KEY=VALUE", help="the second build's awq: setting")
    ap.add_argument("--samples", type=int, default=None, help="calibration samples (default: the config's)")
    ap.add_argument("--work", type=Path, required=True, help="where both builds go (created, then left for a look)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if not a.awq:
        ap.error("name at least one --awq KEY=VALUE: the second build's difference")

    from release.config import load_config
    from release.owned import create_owned
    from release.verify.branch import BaseReference, load_heldout, verify_branches

    create_owned(a.work, "engine side-by-side")
    record: dict[str, Any] = {"config": str(a.config), "b_sets": a.awq, "samples": a.samples, "runs": {}}
    configs = {
        "a": _variant(a.config, a.work, "a", a.samples, []),
        "b": _variant(a.config, a.work, "b", a.samples, a.awq),
    }
    for label, path in configs.items():
        record["runs"][label] = build(path, a.work / f"scales-{label}.pt")
        print(f"== build {label}: {record['runs'][label]['build_s']} s", flush=True)
    cfg = load_config(configs["a"])
    reference = BaseReference(cfg.base_model.path, load_heldout(cfg), cfg.verify.max_tokens)
    for label, path in configs.items():
        run = record["runs"][label]
        q = verify_branches(load_config(path), {run["branch"]: Path(run["folder"])}, reference)[run["branch"]]
        run.update(mean_kl=q.mean_kl, top1_agreement=q.top1_agreement, passed=q.passed)
    kl_a, kl_b = record["runs"]["a"]["mean_kl"], record["runs"]["b"]["mean_kl"]
    record["kl_b_over_a"] = round(kl_b / kl_a, 6) if kl_a else None
    record["scales"] = compare_scales(a.work / "scales-a.pt", a.work / "scales-b.pt")
    print(json.dumps(record, indent=1), flush=True)
    if a.json is not None:
        a.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
