"""Quantize branches: the one dispatcher. One branch in this process (`quantize_branch`), several
branches in one calibration pass (`one_pass.quantize_pass`) or one build each, and a branch on N
GPUs (`quantize_on_gpus`: torchrun starts `worker` on each rank). A branch folder's life is
`branch_folder.py`'s; calibrating and saving is `calibrate.py`'s."""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from pathlib import Path

from ..awq import ScaleOptions
from ..config import ReleaseConfig
from ..errors import ReleaseError
from ..owned import create_owned, remove_owned, require_replaceable, require_writable_folder
from . import distributed
from .branch_folder import (
    BranchBuild,
    Log,
    branch_is_current,
    check_branch_room,
    partial_folder,
    prepare_branch,
    remove_stale_partials,
    seal_folder,
    up_to_date,
)
from .calibrate import SHARD_SIZE, calibrate, forget_offload, offload_folder, run_oneshot
from .one_pass import check_pass, plan_pass, quantize_pass


def quantize_branch(
    cfg: ReleaseConfig,
    branch_name: str,
    *,
    force: bool = False,
    echo: Log = print,
    scale_options: ScaleOptions | None = None,
) -> BranchBuild:
    """Build one branch into `<output_dir>/<branch>`; skip it when its inputs are unchanged.
    `scale_options` overrides the AWQ patches the config's `awq` section chooses (tests)."""
    branch = cfg.branch(branch_name)
    out_dir = cfg.output_dir / branch.name
    t_start = time.time()
    job = prepare_branch(cfg, branch)
    prepare_s = round(time.time() - t_start, 2)  # the base model's and the data's fingerprints
    fingerprint = job.fingerprint
    if distributed.rank() == 0:
        remove_stale_partials(cfg.output_dir, branch.name, echo)
    if not force and up_to_date(job, echo=echo):
        return BranchBuild(branch.name, out_dir, True, 0.0, fingerprint)

    if not distributed.in_worker():  # the launcher checked for the ranks (quantize_on_gpus)
        require_writable_folder(cfg.output_dir, "output_dir")
        require_replaceable(out_dir, branch.name)
        check_branch_room(job)
    # llm-compressor's save compresses the model across ranks (only rank 0 writes), so under
    # torchrun every rank calls it with the same folder: named by the launcher they share.
    tmp = partial_folder(cfg.output_dir, branch.name)
    if distributed.in_worker():
        distributed.init()
        if distributed.rank() != 0:  # calibrate its share of the samples; rank 0 writes the branch
            run = calibrate(job, lambda s: None, scale_options)
            run.model.save_pretrained(tmp, save_compressed=True, max_shard_size=SHARD_SIZE)
            distributed.barrier_and_close()
            return BranchBuild(branch.name, out_dir, False, round(time.time() - t_start, 1), fingerprint)
    create_owned(tmp, f"building {branch.name}")
    failed = True
    try:
        timings, run = run_oneshot(job, tmp, echo, scale_options)
        timings["prepare"] = prepare_s
        seal_folder(job, tmp, timings, [branch.name])
        failed = False
    finally:
        remove_owned(tmp, echo)
        if not failed:  # after an error the other ranks may wait in a collective: no barrier, or both hang
            distributed.barrier_and_close()
        if cfg.offload.cpu_gib is not None:  # every rank is done with the offloaded weights
            forget_offload(offload_folder(cfg))
    return BranchBuild(branch.name, out_dir, False, round(time.time() - t_start, 1), fingerprint, stats=run.stats)


def build_branches(
    cfg: ReleaseConfig,
    branches: list[str],
    gpus: int,
    config_path: Path | None,
    *,
    force: bool = False,
    echo: Log = print,
    separate: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[BranchBuild]:
    """Several branches: one calibration pass for all of them on one GPU (`quantize_pass`), or
    one build each (`separate`, or on several GPUs: the shared pass runs in one process).
    A disk that fills up midway is reported as such (every partial folder is removed by then)."""
    try:
        return _build_branches(cfg, branches, gpus, config_path, force, echo, separate, progress)
    except ReleaseError:
        raise
    except Exception as e:
        if not disk_full(e):
            raise
        raise ReleaseError(
            f"the disk filled up while building ({e}); nothing half-written was kept",
            hint="free space where output_dir (and offload.folder / offload.pass_store) point, or point them at a "
            "disk with room, then build again",
        ) from e


def disk_full(e: BaseException | None) -> bool:
    """`e`, or an exception it was raised from, is a write that found no space left."""
    while e is not None:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _build_branches(
    cfg: ReleaseConfig,
    branches: list[str],
    gpus: int,
    config_path: Path | None,
    force: bool,
    echo: Log,
    separate: bool,
    progress: Callable[[str], None] | None,
) -> list[BranchBuild]:
    if not separate and len(dict.fromkeys(branches)) > 1:
        if gpus == 1:
            return quantize_pass(cfg, branches, force=force, echo=echo, progress=progress)
        if config_path is None:
            raise ReleaseError("a multi-GPU build needs the config's path to hand to torchrun")
        return quantize_pass_on_gpus(cfg, config_path, branches, gpus, force=force, echo=echo)
    builds = []
    for name in branches:
        if progress:
            progress(name)
        builds.append(build_branch(cfg, name, gpus, config_path, force=force, echo=echo))
    return builds


def build_branch(
    cfg: ReleaseConfig, branch: str, gpus: int, config_path: Path | None, *, force: bool = False, echo: Log = print
) -> BranchBuild:
    """One branch: in this process (one GPU) or launched on `gpus` GPUs."""
    if gpus == 1:
        return quantize_branch(cfg, branch, force=force, echo=echo)
    if config_path is None:
        raise ReleaseError("a multi-GPU build needs the config's path to hand to torchrun")
    return quantize_on_gpus(cfg, config_path, branch, gpus, force=force, echo=echo)


def quantize_pass_on_gpus(
    cfg: ReleaseConfig, config_path: Path, branches: list[str], gpus: int, *, force: bool = False, echo: Log = print
) -> list[BranchBuild]:
    """Several branches in one calibration pass on `gpus` GPUs: every rank calibrates its share
    of the samples for every branch; rank 0 writes them. Checked here, before torchrun starts."""
    names = list(dict.fromkeys(branches))
    plan = plan_pass(cfg, [cfg.branch(n) for n in names], force, echo, clean=True)
    if not plan.stale:
        return [plan.skipped[n] for n in names]
    distributed.check_gpus(gpus, cfg.calibration.num_samples)
    check_pass(plan)
    t = time.time()
    echo(f"[{names[0]}] launching {gpus} ranks with torchrun for one calibration pass of {', '.join(names)}")
    distributed.launch(gpus, config_path, names, force=force)
    builds = []
    for n in names:
        if n in plan.skipped:
            builds.append(plan.skipped[n])
            continue
        out, fingerprint = plan.jobs[n].out_dir, plan.fingerprint(n)
        if not branch_is_current(out, fingerprint):
            raise ReleaseError(f"the {gpus}-GPU pass finished but wrote no current branch {n} at {out}")
        calibrated_by = None if n == names[0] else names[0]
        builds.append(BranchBuild(n, out, False, round(time.time() - t, 1), fingerprint, calibrated_by))
    return builds


def quantize_on_gpus(
    cfg: ReleaseConfig, config_path: Path, branch: str, gpus: int, *, force: bool = False, echo: Log = print
) -> BranchBuild:
    """Build one branch on `gpus` GPUs (rank 0 writes it); skip it when its inputs are unchanged."""
    spec = cfg.branch(branch)
    job = prepare_branch(cfg, spec)
    fingerprint, out = job.fingerprint, job.out_dir
    if not force and up_to_date(job, echo=echo):
        return BranchBuild(spec.name, out, True, 0.0, fingerprint)
    distributed.check_gpus(gpus, cfg.calibration.num_samples)
    require_writable_folder(cfg.output_dir, "output_dir")
    require_replaceable(out, spec.name)
    check_branch_room(job)
    t = time.time()
    echo(f"[{spec.name}] launching {gpus} ranks with torchrun")
    distributed.launch(gpus, config_path, spec.name)
    if not branch_is_current(out, fingerprint):
        raise ReleaseError(f"the {gpus}-GPU run of {spec.name} finished but wrote no current branch at {out}")
    return BranchBuild(spec.name, out, False, round(time.time() - t, 1), fingerprint)
