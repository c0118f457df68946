"""One calibration pass for several branches of a release (`build-all` and `quantize --branch A
--branch B` on one GPU): the first branch's pass also smooths every layer for the others' group
sizes (release/awq/side.py), stores those layers, and the other branches are then made from
their stores, at the same time (`finish_side_branches`). Its steps are branch_folder.py's (the
folders' life) and calibrate.py's (calibrating and saving); quantize.py decides when a pass runs.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..architecture import Glm4MoeArch
from ..awq import ScaleOptions, SideBranch
from ..config import BranchSpec, ReleaseConfig
from ..errors import ReleaseError
from ..layout import INDEX_FILE, SHARD_WRITERS, SavedLayout, TensorFiles, saved_layout, write_shards
from ..owned import create_owned, remove_owned, require_replaceable, require_writable_folder
from . import distributed, room
from .branch_folder import (
    BranchBuild,
    BranchJob,
    Log,
    partial_folder,
    prepare_branch,
    remove_stale_partials,
    seal_folder,
    up_to_date,
)
from .calibrate import (
    SHARD_SIZE,
    Calibrated,
    calibrate,
    forget_offload,
    offload_folder,
    resource_peaks,
    run_oneshot,
    write_branch_files,
)

FOREIGN_STORE_HINT = "the pass's store is not this release's; rebuild the branch: glmrel quantize --force"
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
    skipping the branches whose inputs are unchanged (two branches or more; one branch is
    `quantize.quantize_branch`).

    The first branch is saved as a build of its own would be (bit for bit the same); each
    other branch's layers are quantized in the pass and stored, and the branch is then
    assembled from its store in the first one's saved layout (`finish_side_branch`: no second
    load of the model). Every branch's provenance names the pass."""
    specs = [cfg.branch(n) for n in dict.fromkeys(branch_names)]
    if len(specs) < 2:
        raise ValueError("one calibration pass is for two branches or more: quantize.quantize_branch builds one")
    leader = distributed.rank() == 0  # under torchrun, rank 0 prepares, seals and makes the side branches
    if not leader:
        echo = _quiet
    names = [b.name for b in specs]
    t_start = time.time()
    plan = plan_pass(cfg, specs, force, echo, clean=leader)
    builds = plan.skipped
    if not plan.stale:
        return [builds[n] for n in names]
    lead, lead_job, jobs, side = specs[0], plan.jobs[names[0]], plan.jobs, plan.side
    rest = [b for b in specs[1:] if b in plan.stale]
    tmps = {b.name: partial_folder(cfg.output_dir, b.name) for b in plan.stale}
    lead_tmp = tmps.get(lead.name)
    if not distributed.in_worker():  # the launcher checked for the ranks (quantize_pass_on_gpus)
        check_pass(plan)
    else:
        distributed.init()
        if not leader:  # calibrate this rank's share of the samples in the same pass; rank 0 writes
            run = calibrate(lead_job, echo, scale_options, side=side)
            if lead_tmp is not None:
                run.model.save_pretrained(lead_tmp, save_compressed=True, max_shard_size=SHARD_SIZE)
            distributed.barrier_and_close()
            return [builds.get(n) or BranchBuild(n, jobs[n].out_dir, False, 0.0, plan.fingerprint(n)) for n in names]
    echo(f"[{lead.name}] one calibration pass for {', '.join(names)} (propagating through {lead.name})")
    create_owned(plan.work, "the calibration pass's side-branch stores")
    for name, folder in tmps.items():
        create_owned(folder, f"building {name}")
    failed = True
    try:
        if progress:
            progress(lead.name)
        timings, run = run_oneshot(lead_job, lead_tmp, echo, scale_options, side)
        shared: dict[str, Any] = {
            k: timings[k] for k in ("calibration_data", "load", "oneshot", "awq_engine") if k in timings
        }
        pass_s = round(time.time() - t_start, 1)
        if lead_tmp is not None:
            timings["calibration_pass_s"] = pass_s
            seal_folder(lead_job, lead_tmp, timings, names)
            builds[lead.name] = BranchBuild(
                lead.name, lead_job.out_dir, False, pass_s, plan.fingerprint(lead.name), stats=run.stats
            )
        calibration_pass: dict[str, Any] = {**shared, "seconds": pass_s, "propagated_through": lead.name}
        builds.update(finish_side_branches(plan, rest, tmps, run, calibration_pass, echo, progress))
        failed = False
    finally:
        for folder in [plan.work, *tmps.values()]:
            remove_owned(folder, echo)
        if distributed.in_worker() and not failed:  # after an error the other ranks may wait in a collective
            distributed.barrier_and_close()
        if cfg.offload.cpu_gib is not None:
            forget_offload(offload_folder(cfg))
    return [builds[n] for n in names]


def finish_side_branches(
    plan: PassPlan,
    rest: list[BranchSpec],
    tmps: dict[str, Path],
    run: Calibrated,
    calibration_pass: dict[str, Any],
    echo: Log,
    progress: Callable[[str], None] | None = None,
) -> dict[str, BranchBuild]:
    """Every side branch of the pass made from its store and sealed (`finish_side_branch`,
    `seal_folder`), all at once on threads: each reads the propagating branch's sealed folder
    and its own store and writes a folder of its own, so they share nothing but what they read.
    The shard writers (`SHARD_WRITERS`) are split between them: as many shards are in memory at
    once as when they were made one after another. What each says is kept and printed in branch
    order when it is done (a CLI's output belongs to the main thread). The first error is raised
    once every branch is done; the caller removes what is left."""
    from concurrent.futures import ThreadPoolExecutor

    lead = plan.names[0]
    lead_dir = plan.jobs[lead].out_dir
    stores = {sb.name: sb for sb in plan.side}
    writers = max(1, SHARD_WRITERS // max(1, len(rest)))

    def finish(b: BranchSpec, said: list[str]) -> BranchBuild:
        t = time.time()
        job, store = plan.jobs[b.name], stores[b.name]
        timings = finish_side_branch(job, store, lead_dir, tmps[b.name], run, said.append, writers=writers)
        timings["calibration_pass"] = calibration_pass
        timings["side_branches_at_once"] = len(rest)  # their seconds overlap: a phase's wall is not their sum
        seal_folder(job, tmps[b.name], timings, plan.names)
        shutil.rmtree(store.store, ignore_errors=True)
        seconds = round(time.time() - t, 1)
        return BranchBuild(b.name, job.out_dir, False, seconds, plan.fingerprint(b.name), lead, run.stats)

    for b in rest:
        if progress:
            progress(b.name)
    said: dict[str, list[str]] = {b.name: [] for b in rest}
    built: dict[str, BranchBuild] = {}
    first_error: BaseException | None = None
    with ThreadPoolExecutor(max(1, len(rest)), thread_name_prefix="glmrel-side-branch") as pool:
        futures = {b.name: pool.submit(finish, b, said[b.name]) for b in rest}
        for name, future in futures.items():
            try:
                built[name] = future.result()
            except BaseException as e:  # the others finish first; then the first error is raised
                first_error = first_error or e
            for line in said[name]:
                echo(line)
    if first_error is not None:
        raise first_error
    return built


def _quiet(line: str) -> None:
    """What ranks other than 0 say: nothing (rank 0 speaks for the pass)."""


@dataclass(frozen=True)
class PassPlan:
    """What one calibration pass will do: each branch's job, which branches it builds (`stale`)
    and which are up to date (`skipped`), the side branches it smooths and where their stores
    go (`work`, under `store_root`)."""

    names: list[str]
    jobs: dict[str, BranchJob]
    stale: list[BranchSpec]
    skipped: dict[str, BranchBuild]
    side: tuple[SideBranch, ...]
    work: Path
    store_root: Path

    def fingerprint(self, name: str) -> str:
        return self.jobs[name].sealed_fingerprint(self.names)


def plan_pass(cfg: ReleaseConfig, specs: list[BranchSpec], force: bool, echo: Log, *, clean: bool) -> PassPlan:
    """The pass's plan, before torch is imported (`clean`: first remove what killed runs left)."""
    names = [b.name for b in specs]
    jobs = {b.name: prepare_branch(cfg, b) for b in specs}
    store_root = cfg.offload.pass_store or cfg.output_dir
    if clean:
        for name in names:
            remove_stale_partials(cfg.output_dir, name, echo)
        remove_stale_partials(store_root, PASS_FOLDER, echo)
    stale = [b for b in specs if force or not up_to_date(jobs[b.name], names, echo)]
    skipped = {
        b.name: BranchBuild(b.name, jobs[b.name].out_dir, True, 0.0, jobs[b.name].sealed_fingerprint(names))
        for b in specs
        if b not in stale
    }
    work = partial_folder(store_root, PASS_FOLDER)
    side = tuple(SideBranch(b.name, b.group_size, work / b.name, jobs[b.name].recipe) for b in specs[1:] if b in stale)
    return PassPlan(names, jobs, stale, skipped, side, work, store_root)


def check_pass(plan: PassPlan) -> None:
    """Refuse, before any work, a pass that cannot write where it goes or cannot fit there, or
    whose side branches would be made from a propagating branch changed since it was sealed."""
    lead_job = plan.jobs[plan.names[0]]
    cfg = lead_job.cfg
    require_writable_folder(cfg.output_dir, "output_dir")
    if plan.side:
        require_writable_folder(plan.store_root, "offload.pass_store")
    for b in plan.stale:
        require_replaceable(plan.jobs[b.name].out_dir, b.name)
    check_pass_room(lead_job, plan.side, {b.name: b.group_size for b in plan.stale}, plan.store_root)
    if plan.side and lead_job.spec not in plan.stale:  # what the side branches are made from, sealed earlier
        check_sealed_files(lead_job.out_dir, lead_job.arch)


def check_pass_room(lead: BranchJob, side: tuple[SideBranch, ...], stale: dict[str, int], store_root: Path) -> None:
    """Refuse a pass whose side branches' stores and built branches (`stale`: name -> group
    size) cannot fit where they go, before any work."""
    cfg, base_dir, arch = lead.cfg, lead.base_dir, lead.arch
    needs = []
    if side:
        stores = sum(room.weights_bytes(base_dir, arch, cfg.dtype, b.group_size, decoder_only=True) for b in side)
        needs.append((store_root, stores, f"{len(side)} side branch(es)' stores"))
    built = sum(room.branch_bytes(base_dir, arch, cfg.dtype, size) for size in stale.values())
    needs.append((cfg.output_dir, built, f"{len(stale)} branch(es)"))
    room.check_room(
        "one calibration pass",
        needs,
        hint="free space there, set offload.pass_store to another disk (or a tmpfs such as /dev/shm) for the "
        "stores, or build with --separate (one branch's room at a time)",
    )


def finish_side_branch(
    job: BranchJob,
    side: SideBranch,
    lead_dir: Path,
    out: Path,
    run: Calibrated,
    echo: Log = print,
    writers: int | None = None,
) -> dict[str, Any]:
    """A side branch of a pass into `out`, without loading the model again. The pass stored
    each decoder layer of the branch quantized and compressed (release/awq/side.py); the
    propagating branch's saved folder (`lead_dir`) gives the layout (shards, tensor names,
    config), and each of its tensors becomes the side branch's own: the store's where the store
    has it (every quantized Linear of the decoder layers, and what smoothing changed unquantized:
    norms, the router, biases), else the propagating branch's (embeddings, head, the other
    norms: the base model's in both). Then the MTP layer, tokenizer, recipe and records as any
    build (`write_branch_files`). The same bits as the base model with the branch's smoothed
    layers quantized by QuantizationModifier and saved compressed (the demo's pinned digests).
    `writers`: shards written at once (`layout.write_shards`)."""
    branch = job.spec
    timings: dict[str, Any] = {}
    t = time.time()
    layout = saved_layout(lead_dir, job.arch)
    lead = TensorFiles.of([lead_dir / s for s in layout.shards])
    store = TensorFiles.of(sorted(side.store.glob("*.safetensors")))
    check_store(store, side.store, layout, lead, branch.name)
    missing = [n for n in sorted(layout.names) if n not in store.names and layout.is_quantized_part(n)]
    if missing:  # refused before anything is written
        raise ReleaseError(
            f"{missing[0]} is not in the pass's store {side.store}: {branch.name} cannot be made from it",
            hint="build this branch on its own: glmrel quantize --separate",
        )
    echo(f"[{branch.name}] from the pass's store: group size {branch.group_size}, in {lead_dir.name}'s layout")
    out.mkdir(parents=True, exist_ok=True)
    # each tensor from the store where it has it, else the propagating branch's
    write_shards(out, layout.by_shard, {**lead.names, **store.names}, writers)
    stored = len(store.names)  # check_store refused a store naming a tensor the branch does not have
    layout.write_index_and_config(out, store_quantization(side.store, branch))
    for name in ("generation_config.json",):
        if (lead_dir / name).is_file():
            shutil.copy2(lead_dir / name, out / name)
    timings["finish"] = {"from_store": stored, "seconds": round(time.time() - t, 2)}  # no model is loaded
    t = time.time()
    timings["save_mtp"] = write_branch_files(job, out, run)
    timings["save"] = round(time.time() - t, 2)
    timings.update(resource_peaks())
    return timings


def check_store(store: TensorFiles, where: Path, layout: SavedLayout, lead: TensorFiles, branch: str) -> None:
    """Refuse a side branch's store that is not this release's, by file and tensor name: empty,
    naming a tensor the branch does not have, one of another dtype or shape (a quantized
    Linear's scales may differ from the propagating branch's in their groups only), or a
    quantized Linear with some of its parts missing."""
    if not store.names:
        raise ReleaseError(
            f"the side branch store {where} holds no layers", hint="rebuild the branch: glmrel quantize --force"
        )
    hint = FOREIGN_STORE_HINT
    parts: dict[str, set[str]] = {}
    for key in store.names:
        if key not in layout.names:
            raise ReleaseError(f"{store.where(key)}: {key} names no tensor of {branch}", hint=hint)
        (shape, dtype), (got_shape, got_dtype) = lead.header(key), store.header(key)
        module, _, part = key.rpartition(".")
        grouped = layout.is_quantized_part(key) and part not in ("weight_packed", "weight_shape")
        if got_dtype != dtype or (got_shape[:1] if grouped else got_shape) != (shape[:1] if grouped else shape):
            raise ReleaseError(
                f"{store.where(key)}: {key} is {got_shape} {got_dtype}, {branch}'s is {shape} {dtype}", hint=hint
            )
        if layout.is_quantized_part(key):
            parts.setdefault(module, set()).add(key)
    for module, have in parts.items():
        if have != layout.parts[module]:
            missing = sorted(layout.parts[module] - have)
            raise ReleaseError(f"{store.where(next(iter(have)))}: {module} lacks {', '.join(missing)}", hint=hint)


def store_quantization(store: Path, branch: BranchSpec) -> dict[str, Any]:
    """The quantization scheme a side run wrote beside its store's layers (side.py's
    `Quantizer.describe`), refused unless it is the branch's: one weight scheme, of the
    branch's group size."""
    import json

    from ..awq import QUANTIZATION_FILE

    hint = FOREIGN_STORE_HINT
    path = store / QUANTIZATION_FILE
    try:
        quantization = json.loads(path.read_text())
        groups = [g["weights"] for g in quantization["config_groups"].values() if g.get("weights")]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ReleaseError(f"{path} is missing or unreadable ({e})", hint=hint) from e
    if [g.get("group_size") for g in groups] != [branch.group_size]:
        raise ReleaseError(
            f"{path} describes group sizes {[g.get('group_size') for g in groups]}, {branch.name}'s is "
            f"{branch.group_size}",
            hint=hint,
        )
    return quantization


def check_sealed_files(folder: Path, arch: Glm4MoeArch) -> None:
    """Refuse to make side branches from a propagating branch sealed by an earlier run whose
    files (the index, shards, `config.json` and `generation_config.json` they are made from) are
    not those its manifest records: changed, missing, outside the folder or swapped for a link."""
    from ..manifest import MANIFEST_FILE, Manifest, hash_files, release_files

    release_files(folder)  # regular files only: nothing is read through a link
    layout = saved_layout(folder, arch)
    extra = [n for n in (INDEX_FILE, "generation_config.json") if (folder / n).exists()]
    names = [*layout.shards, "config.json", *extra]
    manifest = Manifest.load(folder / MANIFEST_FILE)
    hashes = hash_files([folder / n for n in names])
    for name in names:
        entry = manifest.files.get(name)
        if entry is None or entry.sha256 != hashes[folder / name]:
            raise ReleaseError(
                f"{folder / name} is not what {folder.name}'s manifest.json records; the side branches "
                "are made from it",
                hint=f"rebuild it and its pass: glmrel quantize --branch {folder.name} ... --force",
            )
