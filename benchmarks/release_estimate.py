"""The full GLM-4.7 release's calibration time, from one measured MoE layer: the arithmetic
the README's estimate comes from, with every input named as measured or assumed.

Input: a `benchmarks.profile_layer` record (`--json`) of one GLM-4.7-dims MoE layer at the
recipe's 512 x 2048 on one GPU: its calibration pass, AWQ smoothing (one group size) and
propagation pass. From it, on one GPU, one calibration pass for the three branches:

  89 MoE layers x (calibration + propagation + smoothing x (1 + side x 2)) + 3 dense layers

where `side` is a side branch's smoothing against the propagating branch's (measured 128.1 /
125.3 s = 1.02 at 512 x 2048 in benchmarks/results/2026-11-30-h200-single-pass-glm47-moe-layer-512),
and a dense layer's time is taken from `--dense-s` (default: run P's 108.0 s on one H200 at
ec296b7, the last dense layer measured at 512 x 2048; the engine changes since touch only the
experts, so this over-states a dense layer). Under `--gpus N` the three branches share one pass
over N ranks (`build-all --gpus N`; `--separate`: a pass per branch); a layer's time there is
a + b / N with a, the per-rank part that does not shrink, from run P's 2- and 4-GPU fit (4.8 s
for a MoE layer, 3.0 s for a dense one). That fit was measured on one branch's pass: that the
side branches' searches shrink with N as the propagating one's does is assumed (each rank
searches on its share of the samples, all-reduced, as for the propagating branch; rank 0 alone
quantizes and stores the side layers, a part not separated in the record), not measured on
several GPUs.

Not counted: loading (the model's ~710 GB read once per pass), saving, verify, check and the
upload; benchmarks/results/README.md gives their measured rates.

  python -m benchmarks.release_estimate --record benchmarks/results/<run>/profile-512.json

Prints the arithmetic; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MOE_LAYERS, DENSE_LAYERS, BRANCHES = 89, 3, 3
SIDE_OVER_LEAD = 128.1 / 125.3  # a side branch's smoothing against the propagating one's (run of 2026-11-30)
RUN_P_DENSE_S = 108.0  # one dense layer, 512 x 2048, one H200 (run P, ec296b7)
RUN_P_FIXED_S = {"moe": 4.8, "dense": 3.0}  # per-rank part a of a + b / N (run P's 2- and 4-GPU fit)


@dataclass(frozen=True)
class MoeLayer:
    """One MoE layer's measured seconds on one GPU."""

    calibration_s: float
    smoothing_s: float
    propagation_s: float

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> MoeLayer:
        """From a profile_layer `--json` record of a one-MoE-layer model: the layer's passes
        (the second subgraph's: the first is the embeddings) and its smoothing."""
        timed = record["timed"]
        passes = {p["pass"]: p["s"] for p in timed["passes"]}
        moe = [k for k in passes if k.startswith("(2/")]
        calib = next(passes[k] for k in moe if k.endswith("Calibrating"))
        prop = next(passes[k] for k in moe if k.endswith("Propagating"))
        return cls(calib, timed["layers"][-1]["smooth_s"], prop)


def estimate(moe: MoeLayer, dense_s: float = RUN_P_DENSE_S, gpus: int = 1, separate: bool = False) -> dict[str, Any]:
    """Seconds of calibration for the release's three branches (see the module docstring)."""
    lead = moe.calibration_s + moe.propagation_s + moe.smoothing_s
    sides = (BRANCHES - 1) * SIDE_OVER_LEAD
    # one GPU's seconds per layer, and how many passes
    moe_1, dense_1, passes = (
        (lead, dense_s, BRANCHES) if separate else (lead + sides * moe.smoothing_s, dense_s * (1 + sides), 1)
    )
    a_moe, a_dense = (RUN_P_FIXED_S["moe"], RUN_P_FIXED_S["dense"]) if gpus > 1 else (0.0, 0.0)
    moe_layer = a_moe + (moe_1 - a_moe) / gpus  # a + (t1 - a) / N on N ranks
    dense = a_dense + (dense_1 - a_dense) / gpus
    total = passes * (MOE_LAYERS * moe_layer + DENSE_LAYERS * dense)
    how = ("a pass per branch" if separate else "one pass for the three branches") + (
        f" over {gpus} ranks" if gpus > 1 else ""
    )
    return {
        "measured_moe_layer": asdict(moe),
        "dense_layer_s": dense_s,
        "gpus": gpus,
        "separate": separate,
        "how": how,
        "moe_layer_s": round(moe_layer, 1),
        "calibration_h": round(total / 3600, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", type=Path, required=True, help="benchmarks.profile_layer --json of one MoE layer")
    ap.add_argument("--dense-s", type=float, default=RUN_P_DENSE_S, help="one dense layer's seconds on one GPU")
    ap.add_argument("--gpus", type=int, action="append", default=None, help="GPUs of one node (repeatable)")
    a = ap.parse_args()
    moe = MoeLayer.from_record(json.loads(a.record.read_text()))
    for gpus, separate in [(g, False) for g in a.gpus or [1, 8]] + [(g, True) for g in a.gpus or [8]]:
        e = estimate(moe, a.dense_s, gpus, separate)
        print(
            f"{gpus} GPU(s), {e['how']}: MoE layer {e['moe_layer_s']} s -> calibration of the release "
            f"{e['calibration_h']} h (measured: {e['measured_moe_layer']}; dense {e['dense_layer_s']} s)"
        )


if __name__ == "__main__":
    main()
