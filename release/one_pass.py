"""One calibration pass for several branches of a release (`build-all` and `quantize --branch A
--branch B` on one GPU): the first branch's pass also smooths every layer for the others' group
sizes (release/awq/side.py), stores those layers, and each other branch is then made from its
store. The pass's steps are quantize.py's, called through the module so tests can stand in for one.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import distributed, quantize
from .architecture import Glm4MoeArch
from .awq import ScaleOptions, SideBranch
from .config import BranchSpec, ReleaseConfig
from .errors import ReleaseError
from .quantize import BranchBuild, Calibrated, Log

PASS_FOLDER = "calibration-pass"  # .calibration-pass.partial-<pid>@<host>: the side branches' stores


def quantize_pass(
    cfg: ReleaseConfig,
    branch_names: list[str],
    *,
    force: bool = False,
    echo: Log = print,
    scale_options: ScaleOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[BranchBuild]:
    """Build several branches from ONE calibration pass (the first named propagates its
    smoothed layers; the others are smoothed beside it, layer by layer: release/awq/side.py),
    skipping the branches whose inputs are unchanged. One branch: `quantize_branch`.

    The first branch is saved as a build of its own would be (bit for bit the same); each
    other branch is then the base model with its stored smoothed weights written over it,
    quantized by QuantizationModifier alone (no calibration data: weight-only) and saved.
    Every branch's provenance names the pass."""
    specs = [cfg.branch(n) for n in dict.fromkeys(branch_names)]
    if len(specs) == 1:
        if progress:
            progress(specs[0].name)
        return [quantize.quantize_branch(cfg, specs[0].name, force=force, echo=echo, scale_options=scale_options)]
    if distributed.in_worker():
        raise ReleaseError("one calibration pass for several branches runs in one process, not under torchrun")
    names = [b.name for b in specs]
    t_start = time.time()
    prepared = {b.name: quantize.prepare_branch(cfg, b) for b in specs}
    base_dir, arch = prepared[names[0]][0], prepared[names[0]][1]
    fingerprints = {n: quantize.pass_fingerprint(prepared[n][3], names) for n in names}
    store_root = cfg.offload.pass_store or cfg.output_dir
    for name in names:
        quantize.remove_stale_partials(cfg.output_dir, name, echo)
    quantize.remove_stale_partials(store_root, PASS_FOLDER, echo)
    stale = [b for b in specs if force or not quantize.up_to_date(cfg, b, prepared[b.name][3], names)]
    builds: dict[str, BranchBuild] = {
        b.name: BranchBuild(b.name, cfg.output_dir / b.name, True, 0.0, fingerprints[b.name])
        for b in specs
        if b not in stale
    }
    if not stale:
        return [builds[n] for n in names]
    lead, rest = specs[0], [b for b in specs[1:] if b in stale]
    work = quantize.partial_folder(store_root, PASS_FOLDER)
    side = tuple(SideBranch(b.name, b.group_size, work / b.name) for b in rest)
    tmps = {b.name: quantize.partial_folder(cfg.output_dir, b.name) for b in stale}
    if side:
        check_pass_store_room(cfg, base_dir, arch, len(side), store_root)
    echo(f"[{lead.name}] one calibration pass for {', '.join(names)} (propagating through {lead.name})")
    for folder in [work, *tmps.values()]:
        shutil.rmtree(folder, ignore_errors=True)
    try:
        if progress:
            progress(lead.name)
        lead_tmp = tmps.get(lead.name)
        timings, run = quantize._run_oneshot(
            cfg, lead, base_dir, arch, prepared[lead.name][2], lead_tmp, echo, scale_options, side
        )
        shared = {k: timings[k] for k in ("calibration_data", "load", "oneshot", "awq_engine") if k in timings}
        pass_s = round(time.time() - t_start, 1)
        if lead_tmp is not None:
            timings["calibration_pass_s"] = pass_s
            quantize.seal_folder(
                cfg, lead, base_dir, arch, lead_tmp, cfg.output_dir / lead.name, fingerprints[lead.name], timings, names
            )
            builds[lead.name] = BranchBuild(
                lead.name, cfg.output_dir / lead.name, False, pass_s, fingerprints[lead.name]
            )
        for b, sb in zip(rest, side):
            if progress:
                progress(b.name)
            t = time.time()
            side_timings = quantize_side_branch(
                cfg, b, base_dir, arch, prepared[b.name][2], sb, tmps[b.name], run, echo
            )
            side_timings["calibration_pass"] = {**shared, "seconds": pass_s, "propagated_through": lead.name}
            quantize.seal_folder(
                cfg, b, base_dir, arch, tmps[b.name], cfg.output_dir / b.name, fingerprints[b.name], side_timings, names
            )
            builds[b.name] = BranchBuild(
                b.name, cfg.output_dir / b.name, False, round(time.time() - t, 1), fingerprints[b.name], lead.name
            )
            shutil.rmtree(sb.store, ignore_errors=True)
    finally:
        for folder in [work, *tmps.values()]:
            shutil.rmtree(folder, ignore_errors=True)
        if cfg.offload.cpu_gib is not None:
            quantize.forget_offload(quantize.offload_folder(cfg))
    return [builds[n] for n in names]


def side_store_bytes(base_dir: Path, arch: Glm4MoeArch, dtype: str) -> int:
    """About what one side branch's store holds, from the base checkpoint's headers: the
    decoder layers' tensors (AWQ smooths within them; the MTP layer, embeddings and head are not
    stored) in the dtype the build loads them in. An upper bound: norms and the layers' few
    weights no mapping smooths are counted too."""
    from .check import DTYPE_BYTES, TORCH_TO_ST, read_shard

    layer = re.compile(r"^model\.layers\.(\d+)\.")
    size = DTYPE_BYTES[TORCH_TO_ST[dtype]] if dtype in TORCH_TO_ST else None  # "auto": the checkpoint's
    total = 0
    for f in sorted(base_dir.glob("*.safetensors")):
        meta, _errors = read_shard(f)
        for name, t in meta.tensors.items() if meta is not None else ():
            m = layer.match(name)
            if m and int(m[1]) < arch.num_hidden_layers:
                stored = t.data_offsets[1] - t.data_offsets[0]
                total += stored if size is None else stored // DTYPE_BYTES.get(t.dtype, 2) * size
    return total


def check_pass_store_room(cfg: ReleaseConfig, base_dir: Path, arch: Glm4MoeArch, sides: int, store_root: Path) -> None:
    """Refuse a pass whose side branches' stores cannot fit where they go, before any work
    (a full disk found after hours of calibration loses them)."""
    need = side_store_bytes(base_dir, arch, cfg.dtype) * sides
    where = store_root
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need:
        raise ReleaseError(
            f"one calibration pass needs about {need / 2**30:.1f} GiB at {store_root} for its {sides} side "
            f"branch(es)' smoothed layers, and {free / 2**30:.1f} GiB are free there",
            hint="set offload.pass_store to a disk (or a tmpfs such as /dev/shm) with room, or build with --separate",
        )


def quantize_side_branch(
    cfg: ReleaseConfig,
    branch: BranchSpec,
    base_dir: Path,
    arch: Glm4MoeArch,
    recipe_text: str,
    side: SideBranch,
    out: Path,
    run: Calibrated,
    echo: Log = print,
) -> dict[str, Any]:
    """A side branch of a pass into `out`: the base model with the branch's stored smoothed
    weights written over it, then the recipe's QuantizationModifier alone (weight-only
    W4A16 needs no calibration data: llm-compressor's data-free pipeline computes each
    weight's scales as the sequential pipeline does at a layer's end) and the compressed save.
    Shares the pass's tokenizer, calibration record and expert coverage."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.recipe import Recipe

    from .awq import load_side_weights

    timings: dict[str, Any] = {}
    with quantize.released_after_oneshot(echo) as track:
        t = time.time()
        if cfg.offload.cpu_gib is not None:
            quantize.forget_offload(quantize.offload_folder(cfg))
        model = quantize.load_base_model(cfg, base_dir, branch.name, echo)
        track(model)
        timings["load"] = round(time.time() - t, 2)
        t = time.time()
        written = load_side_weights(model, side.store)
        timings["smoothed_weights"] = {"tensors": written, "seconds": round(time.time() - t, 2)}
        echo(f"[{branch.name}] {written} smoothed tensors from the pass; quantizing W4A16 group {branch.group_size}")
        t = time.time()
        recipe = Recipe.create_instance(recipe_text)
        recipe.modifiers = [m for m in recipe.modifiers if not isinstance(m, AWQModifier)]
        oneshot(model=model, recipe=recipe)
        timings["quantize"] = round(time.time() - t, 2)
        t = time.time()
        model.save_pretrained(out, save_compressed=True, max_shard_size=quantize.SHARD_SIZE)
        model = None
    quantize._write_branch_files(cfg, base_dir, arch, recipe_text, out, run)
    timings["save"] = round(time.time() - t, 2)
    timings.update(quantize.resource_peaks())
    return timings
