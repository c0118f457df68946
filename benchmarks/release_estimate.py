"""The full GLM-4.7 release's calibration time, from one measured MoE layer: the arithmetic
the README's estimate comes from, with every input named as measured or assumed.

Measured where the record has it: a `profile_layer --one-pass` record of one dense and one MoE
layer in one pass of three group sizes gives the dense layer and the side branches' time, and
the two assumptions below are not used.

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

The rest of the release (`rest`): the base model loaded once per pass, each branch compressed
and saved, the three branches verified against the base model (one pass streamed layer by
layer on one GPU, the base model read once), the manifests hashed once, and the bytes to upload. Their rates come from the rehearsal-sized runs
that measured them (run U's in-RAM build for load and save, run X for verify, the manifest
benchmark for hashing), scaled to GLM-4.7's bytes: arithmetic from measured rates, not a
measurement of the full model. The upload is given as bytes and the time at two uplinks.

With `--rest-records SMALL LARGE` (two one-pass rehearsals whose models differ in MoE layers
only, run one after the other on one machine), the rest is also given from what one more MoE
layer costs per stage, with the fixed seconds the smaller model's less its MoE layers': measured
at GLM-4.7's dims per layer, not scaled per GiB (`marginal_rest`). Repeated, each pair is
printed, and the release's sum takes the pairs' mean (`pooled_rest`), with their spread and
standard deviation: one more layer's cost is the difference of two walls of a few minutes, and
single pairs have differed 2x and more. Pairs pooled should come from one machine and commit.

  python -m benchmarks.release_estimate --record benchmarks/results/<run>/profile-512.json

Prints the arithmetic; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import GLM47_CONFIG
from release.architecture import Glm4MoeArch

GROUP_SIZES = (32, 64, 128)  # the release's branches
MOE_LAYERS, DENSE_LAYERS, BRANCHES = 89, 3, len(GROUP_SIZES)
SIDE_OVER_LEAD = 128.1 / 125.3  # a side branch's smoothing against the propagating one's (run of 2026-11-30)
RUN_P_DENSE_S = 108.0  # one dense layer, 512 x 2048, one H200 (run P, ec296b7)
RUN_P_FIXED_S = {"moe": 4.8, "dense": 3.0}  # per-rank part a of a + b / N (run P's 2- and 4-GPU fit)

RESULTS = Path(__file__).resolve().parent / "results"
RUN_U = RESULTS / "2026-11-30-h200x2-offload-glm47-4layer" / "U-1gpu-ram-vs-offload.json"
RUN_X = RESULTS / "2026-11-30-h200x2-rehearsal-glm47-2layer" / "run-X-c465fcc-2gpu.json"
GIB = 2**30
# GLM-4.7: 355 B parameters in bf16 (MTP layer included); the routers and the embeddings and
# lm_head (151,552 x 5,120 each) stay bf16 in a branch, every other Linear is INT4 with one bf16
# scale per group (symmetric: no zero point)
BASE_PARAMS, KEPT_PARAMS = 355e9, 2 * 151_552 * 5_120 + 92 * 160 * 5_120
# run X's model (benchmarks.synthetic --preset glm47 --layers 2): 5.81 B parameters as the
# synthetic prints them, plus the appended MTP layer's 5.54 B (run U's 35.81 GiB model less its
# 13.68 B printed parameters, in bf16)
RUN_X_BASE_GIB = (5.81e9 + 5.54e9) * 2 / GIB
HASH_GIB_S = 2 * 943 / 1024  # manifest hashing, 2 threads on the 2-core CPU (docs/performance.md)


def branch_gib(group_size: int) -> float:
    quantized = BASE_PARAMS - KEPT_PARAMS
    return (quantized * (0.5 + 2 / group_size) + KEPT_PARAMS * 2) / GIB


def rest(upload_gbit_s: tuple[float, ...] = (10.0, 1.0)) -> dict[str, Any]:
    """Load, save, verify and manifests of the release's three branches, in hours, and the
    upload, at the rates of runs U and X scaled per GiB (module docstring); `marginal_rest`
    measures the rest per layer instead."""
    base = BASE_PARAMS * 2 / GIB
    branches = sum(branch_gib(g) for g in GROUP_SIZES)
    u = next(r for r in json.loads(RUN_U.read_text())["runs"] if r["mode"] == "ram")
    load_gib_s = u["model_gib"] / u["timings_s"]["load"]  # from the page cache: a cold read is slower
    save_gib_s = u["model_gib"] / u["timings_s"]["save"]  # GiB of base weights compressed and written a second
    # build-all verifies the three branches in one streaming pass (the base model read once); each
    # branch's "seconds" is that pass's clock when its verify.json was written: the last is the whole
    verify_s = max(v["seconds"] for v in json.loads(RUN_X.read_text())["verify"].values())
    verify_gib_s = RUN_X_BASE_GIB / verify_s
    seconds = {"load": base / load_gib_s, "save": BRANCHES * base / save_gib_s, "verify": base / verify_gib_s}
    rates = {
        "load": round(load_gib_s, 2),
        "save": round(save_gib_s / BRANCHES, 2),
        "verify": round(verify_gib_s, 2),
    }
    source = {"load": "run U", "save": "run U", "verify": "run X"}
    seconds["manifests"] = branches / HASH_GIB_S
    hours = {k: seconds[k] / 3600 for k in ("load", "save", "verify", "manifests")}
    return {
        "base_gib": round(base, 1),
        "branches_gib": round(branches, 1),
        # GiB of base weights a second (save: for the three branches together)
        "rates_gib_s": {**rates, "hash": round(HASH_GIB_S, 2)},
        "measured_in": source,
        "hours": {k: round(v, 2) for k, v in hours.items()},
        "total_h": round(sum(hours.values()), 2),
        "upload_h": {f"{g:g} Gbit/s": round(branches * GIB * 8 / (g * 1e9) / 3600, 2) for g in upload_gbit_s},
    }


def _quantized_params(arch: Glm4MoeArch, layer: int) -> int:
    return sum(out * inp for out, inp in arch.quantized_linear_shapes(layer).values())


# a dense decoder layer's save and verify, taken as a MoE layer's scaled by its quantized
# parameters (GLM-4.7's config, release.architecture: arithmetic, not measured)
_GLM47 = Glm4MoeArch.from_config(json.loads(GLM47_CONFIG.read_text()), str(GLM47_CONFIG))
DENSE_OVER_MOE = _quantized_params(_GLM47, _GLM47.dense_layers[0]) / _quantized_params(_GLM47, _GLM47.moe_layers[0])
REST_STAGES = ("load", "save", "verify", "seal", "other")


def rest_stages(path: Path) -> dict[str, Any]:
    """A one-pass rehearsal's `build-all` outside the calibration itself, in seconds per stage:
    the base model's load, the saves (the propagating branch's compressed save, each side
    branch's finish from its store and its files: the longest of them where the record's side
    branches were made at the same time, their sum where one after the other), the one streaming verify of the three, the
    seal (manifest and check, per branch, where the record has it) and the other seconds of
    the build-all process (its start, the model's dispatch, the side branches' manifests,
    render): its wall less everything named, the calibration pass's `oneshot` included."""
    rec = json.loads(path.read_text())
    timings = rec["quantize_timings_s"].values()
    lead = next(t for t in timings if "calibration_pass_s" in t)
    sides = [t for t in timings if "finish" in t]
    if len(sides) != BRANCHES - 1:
        raise SystemExit(f"{path}: not a one-pass build of {BRANCHES} branches ({len(sides)} side branches)")
    wall = next(s["wall_s"] for s in rec["stages"] if s["stage"] == "build-all")
    side_s = [t["finish"]["seconds"] + t["save"] for t in sides]
    at_once = all(t.get("side_branches_at_once", 1) > 1 for t in sides)  # since d9161d9: they overlap
    stages = {
        "load": lead["load"],
        "save": lead["save"] + (max(side_s) if at_once else sum(side_s)),
        "verify": max(v["seconds"] for v in rec["verify"].values()),
        "seal": sum(v for v in (rec.get("seal_s") or {}).values() if v is not None),
    }
    stages["other"] = wall - lead["oneshot"] - sum(stages.values())
    return {"layers": rec["layers"], "wall_s": wall, "stages": stages}


def marginal_rest(small: Path, large: Path, dense_in_record: int = 1) -> dict[str, Any]:
    """The rest of the release from two one-pass rehearsals whose models differ in MoE layers
    only (benchmarks.synthetic: the first `dense_in_record` layers dense, the others MoE; the
    same machine, one after the other): per stage, the seconds one more MoE layer costs (the
    difference over the layers added) and the fixed seconds (the smaller model's less its MoE
    layers': the embeddings, head, MTP layer, dense layer and process costs, all at GLM-4.7's
    dims). The release: fixed + (89 MoE layers + the 2 dense layers the record lacks, at a MoE
    layer's cost scaled by their parameters) x the marginal cost. Each stage is one run of each
    model: machines of the same kind gave marginal costs up to 2x apart (see the record)."""
    a, b = rest_stages(small), rest_stages(large)
    added = b["layers"] - a["layers"]
    if added < 1:
        raise SystemExit(f"{large}: {b['layers']} layers, not more than {small}'s {a['layers']}")
    # a stage that cost less in the larger model (noise around a cost too small to see) is fixed
    per_layer = {k: max(0.0, (b["stages"][k] - a["stages"][k]) / added) for k in REST_STAGES}
    fixed = {k: a["stages"][k] - (a["layers"] - dense_in_record) * per_layer[k] for k in REST_STAGES}
    layers = MOE_LAYERS + (DENSE_LAYERS - dense_in_record) * DENSE_OVER_MOE
    seconds = {k: fixed[k] + layers * per_layer[k] for k in REST_STAGES}
    return {
        "records": [
            str(p.resolve().relative_to(RESULTS)) if p.resolve().is_relative_to(RESULTS) else str(p)
            for p in (small, large)
        ],
        "per_moe_layer_s": {k: round(v, 2) for k, v in per_layer.items()},
        "per_moe_layer_total_s": round(sum(per_layer.values()), 2),
        "fixed_s": {k: round(v, 2) for k, v in fixed.items()},
        "hours": {k: round(v / 3600, 2) for k, v in seconds.items()},
        "total_h": round(sum(seconds.values()) / 3600, 2),
    }


def pooled_rest(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of several `marginal_rest` pairs (per stage: a MoE layer's cost and the fixed
    seconds; the release's hours), with the pairs' spread and sample standard deviation of
    the release's rest: the noise a single pair cannot show."""
    n = len(pairs)
    totals = [m["total_h"] for m in pairs]
    mean_h = sum(totals) / n
    sd_h = (sum((t - mean_h) ** 2 for t in totals) / (n - 1)) ** 0.5 if n > 1 else None
    per = {k: sum(m["per_moe_layer_s"][k] for m in pairs) / n for k in REST_STAGES}
    return {
        "pairs": n,
        "per_moe_layer_s": {k: round(v, 2) for k, v in per.items()},
        "per_moe_layer_total_s": round(sum(per.values()), 2),
        "fixed_s": {k: round(sum(m["fixed_s"][k] for m in pairs) / n, 2) for k in REST_STAGES},
        "total_h": round(mean_h, 2),
        "sd_h": None if sd_h is None else round(sd_h, 2),
        "range_h": (min(totals), max(totals)),
    }


@dataclass(frozen=True)
class MoeLayer:
    """One decoder layer's measured seconds on one GPU (a MoE layer, or a dense one); `side_s`:
    the release's side branches' smoothing and stores, where the record measured them (a
    `--one-pass` run, scaled to the release's BRANCHES - 1 side branches), else None."""

    calibration_s: float
    smoothing_s: float
    propagation_s: float
    side_s: float | None = None

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> MoeLayer:
        """The MoE layer of a profile_layer `--json` record: the layer with the most mappings."""
        layers = cls.all_from_record(record)
        return layers[max(range(len(layers)), key=lambda i: record["timed"]["layers"][i].get("mappings", 0))]

    @classmethod
    def dense_from_record(cls, record: dict[str, Any]) -> MoeLayer | None:
        """The record's dense layer (the one with the fewest mappings), if it has one beside its MoE layer."""
        rows = record["timed"]["layers"]
        if len(rows) < 2:
            return None
        layers = cls.all_from_record(record)
        return layers[min(range(len(layers)), key=lambda i: rows[i].get("mappings", 0))]

    @classmethod
    def all_from_record(cls, record: dict[str, Any]) -> list[MoeLayer]:
        """Each decoder layer of the record: its calibration and propagation passes (the
        pipeline's subgraph k + 2 for layer k: the first subgraph is the embeddings) and its
        smoothing; the side branches' time where the run was a pass of several branches."""
        timed = record["timed"]
        passes = {p["pass"]: p["s"] for p in timed["passes"]}
        sides = len(timed.get("pass", [])) - 1
        out = []
        for k, row in enumerate(timed["layers"]):
            prefix = f"({k + 2}/"
            calib = next(s for name, s in passes.items() if name.startswith(prefix) and name.endswith("Calibrating"))
            prop = next(s for name, s in passes.items() if name.startswith(prefix) and name.endswith("Propagating"))
            side = row["side_s"] / sides * (BRANCHES - 1) if sides > 0 and "side_s" in row else None
            out.append(cls(calib, row["smooth_s"], prop, side))
        return out


def estimate(
    moe: MoeLayer,
    dense_s: float = RUN_P_DENSE_S,
    gpus: int = 1,
    separate: bool = False,
    dense: MoeLayer | None = None,
) -> dict[str, Any]:
    """Seconds of calibration for the release's three branches (see the module docstring); a
    measured `dense` layer replaces `dense_s`, and a layer's measured side branches replace
    the assumed SIDE_OVER_LEAD."""

    def one_gpu(layer: MoeLayer) -> tuple[float, float]:  # (a pass per branch, one pass) seconds
        lead = layer.calibration_s + layer.propagation_s + layer.smoothing_s
        sides = layer.side_s if layer.side_s is not None else (BRANCHES - 1) * SIDE_OVER_LEAD * layer.smoothing_s
        return lead, lead + sides

    moe_sep, moe_pass = one_gpu(moe)
    if dense is not None:
        dense_sep, dense_pass = one_gpu(dense)
    else:
        dense_sep, dense_pass = dense_s, dense_s * (1 + (BRANCHES - 1) * SIDE_OVER_LEAD)
    moe_1, dense_1, passes = (moe_sep, dense_sep, BRANCHES) if separate else (moe_pass, dense_pass, 1)
    a_moe, a_dense = (RUN_P_FIXED_S["moe"], RUN_P_FIXED_S["dense"]) if gpus > 1 else (0.0, 0.0)
    moe_layer = a_moe + (moe_1 - a_moe) / gpus  # a + (t1 - a) / N on N ranks
    dense_layer = a_dense + (dense_1 - a_dense) / gpus
    total = passes * (MOE_LAYERS * moe_layer + DENSE_LAYERS * dense_layer)
    how = ("a pass per branch" if separate else "one pass for the three branches") + (
        f" over {gpus} ranks" if gpus > 1 else ""
    )
    return {
        "measured_moe_layer": asdict(moe),
        "dense_layer_s": round(dense_1, 1),
        "dense_measured": dense is not None,
        "side_measured": moe.side_s is not None,
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
    ap.add_argument(
        "--rest-records",
        type=Path,
        nargs=2,
        action="append",
        default=None,
        metavar=("SMALL", "LARGE"),
        help="two one-pass benchmarks.rehearsal --json records of models that differ in MoE layers: the rest"
        " from the cost of one more layer (repeatable: the first pair gives the sum, the others its spread)",
    )
    a = ap.parse_args()
    for path in [a.record, *(p for pair in a.rest_records or [] for p in pair)]:
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(
                f"Error: {path}: not a readable JSON record ({exc.__class__.__name__})\n"
                "Hint: pass the --json file of benchmarks.profile_layer (--record) or of benchmarks.rehearsal"
                " (--rest-records); paths are relative to the working directory"
            ) from None
    record = json.loads(a.record.read_text())
    moe, dense = MoeLayer.from_record(record), MoeLayer.dense_from_record(record)
    for gpus, separate in [(g, False) for g in a.gpus or [1, 8]] + [(g, True) for g in a.gpus or [8]]:
        e = estimate(moe, a.dense_s, gpus, separate, dense)
        print(
            f"{gpus} GPU(s), {e['how']}: MoE layer {e['moe_layer_s']} s -> calibration of the release "
            f"{e['calibration_h']} h (measured: {e['measured_moe_layer']}; dense layer on one GPU "
            f"{e['dense_layer_s']} s, {'measured' if e['dense_measured'] else 'run P'}; side branches "
            f"{'measured' if e['side_measured'] else f'assumed at {SIDE_OVER_LEAD:.2f}x the lead'})"
        )
    r = rest()
    h, rates, src = r["hours"], r["rates_gib_s"], r["measured_in"]
    print(
        f"the rest, at rates measured on rehearsal-sized models (arithmetic): load {r['base_gib']} GiB once "
        f"{h['load']} h ({src['load']}, {rates['load']} GiB/s from the page cache); save three branches {h['save']} h "
        f"({src['save']}, {rates['save']} GiB of base weights/s for the three); verify three branches {h['verify']} h "
        f"({src['verify']}, {rates['verify']} GiB of base weights/s, one streaming pass for the three on one GPU); "
        f"manifests of {r['branches_gib']} GiB {h['manifests']} h ({rates['hash']} GiB/s): {r['total_h']} h"
    )
    print(f"upload: {r['branches_gib']} GiB, " + ", ".join(f"{v} h at {k}" for k, v in r["upload_h"].items()))
    if a.rest_records:
        pairs = [marginal_rest(*pair) for pair in a.rest_records]
        for m in pairs:
            per, fixed = m["per_moe_layer_s"], m["fixed_s"]
            print(
                f"the rest from one more MoE layer ({' against '.join(m['records'])}; one run each): "
                + ", ".join(f"{k} {per[k]} s" for k in REST_STAGES)
                + f" a MoE layer ({m['per_moe_layer_total_s']} s), fixed "
                + ", ".join(f"{k} {fixed[k]} s" for k in REST_STAGES)
                + f"; the release's {MOE_LAYERS} MoE and {DENSE_LAYERS} dense layers: {m['total_h']} h ("
                + ", ".join(f"{k} {v} h" for k, v in m["hours"].items())
                + ")"
            )
        gpus = max(a.gpus or [8])
        calibration = estimate(moe, a.dense_s, gpus, False, dense)["calibration_h"]
        pooled = pooled_rest(pairs)
        rest_h = pooled["total_h"]
        if len(pairs) > 1:
            lo, hi = pooled["range_h"]
            print(
                f"the rest, the mean of the {len(pairs)} pairs (one run of each model a pair): "
                + ", ".join(f"{k} {v} s" for k, v in pooled["per_moe_layer_s"].items())
                + f" a MoE layer ({pooled['per_moe_layer_total_s']} s), {round(sum(pooled['fixed_s'].values()))} s"
                f" fixed: {rest_h} h (standard deviation {pooled['sd_h']} h; the pairs span {lo}-{hi} h, the"
                f" release {round(calibration + lo, 2)}-{round(calibration + hi, 2)} h)"
            )
        print(
            f"the release on one node of {gpus} GPU(s): calibration {calibration} h (one pass over {gpus} ranks) + "
            f"the rest {rest_h} h (measured per layer on one GPU"
            + (f", the mean of {len(pairs)} pairs" if len(pairs) > 1 else "")
            + f") = {round(calibration + rest_h, 2)} h, plus the upload"
        )


if __name__ == "__main__":
    main()
