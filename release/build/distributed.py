"""`glmrel quantize --gpus N`: llm-compressor's own data-parallel calibration, launched for the user.

llm-compressor 0.14.0.1 runs `oneshot` data-parallel when every rank calls
`compressed_tensors.distributed.init_dist()` under `torchrun`: each rank calibrates a
disjoint part of the samples and AWQ all-reduces its activation statistics and grid-search
losses, so every rank chooses the same scales and ends with the same weights. glmrel adds the
launch, the sums that its own records need (expert coverage), "rank 0 writes the branch", and
the partition of the samples (`partition`):

llm-compressor 0.14.0.1's automatic partition (`datasets/utils.py`, `_make_sampler`, when all
ranks hold the same dataset) builds its sampler over the rank's `select`ed slice but hands the
DataLoader the whole dataset, so every rank calibrates the first 1/N of the samples and the rest
are never seen (measured: on 2 ranks both ranks' activation sums were equal, and their total
differed from the one-process sum). glmrel gives each rank its own slice instead; the slices
differ, so llm-compressor does not partition again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import ReleaseError
from .coverage import ExpertCounts

# Calibration allocates tensors of many sizes for hours (sample batches, padded expert
# products, each layer's weights): expandable segments keep the CUDA allocator from
# fragmenting (8.8 GiB reserved but unusable at the OOM of a 512-sample GLM-4.7 layer on an
# H100). Read when CUDA first allocates; torchrun workers inherit it. A user's setting wins.
CUDA_ALLOC_CONF = "expandable_segments:True"


def in_worker() -> bool:
    """True inside a torchrun worker."""
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if in_worker() else 0


def world_size() -> int:
    """Ranks calibrating together (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if in_worker() else 1


def partition(n: int) -> tuple[int, int]:
    """This rank's contiguous share [start, end) of n samples (llm-compressor's own bounds)."""
    r, w = rank(), world_size()
    return (n * r) // w, (n * (r + 1)) // w


def check_gpus(gpus: int, num_samples: int | None = None) -> None:
    import torch

    if num_samples is not None and num_samples < gpus:
        raise ReleaseError(
            f"--gpus {gpus} needs at least one calibration sample per GPU; calibration.num_samples is {num_samples}",
            hint=f"raise calibration.num_samples to {gpus} or more, or pass fewer --gpus",
        )

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > have:
        raise ReleaseError(
            f"--gpus {gpus} asks for more GPUs than this machine has ({have})",
            hint="pass --gpus with at most the number of GPUs nvidia-smi lists, or leave it out for one GPU",
        )
    if shutil.which("torchrun") is None and not _torchrun_module_available():
        raise ReleaseError("torchrun is not available", hint="install torch with its distributed launcher")


def _torchrun_module_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch.distributed.run") is not None


def launch(gpus: int, config: Path, branch: str | list[str], force: bool = True) -> None:
    """Build `branch` (several: in one calibration pass) on `gpus` ranks: torchrun starts
    `python -m release.build.worker` on each (after `check_gpus`); raise if any rank fails."""
    branches = [branch] if isinstance(branch, str) else list(branch)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={gpus}",
        "-m",
        "release.build.worker",
        "--config",
        str(config),
        *[arg for name in branches for arg in ("--branch", name)],
        *(["--force"] if force and len(branches) > 1 else []),
    ]
    # a rank killed by a signal (an abort in a library's C++) prints every thread's Python stack
    # to its log, so the log says where it was
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": os.environ.get("PYTHONFAULTHANDLER", "1")}
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise ReleaseError(
            f"the {gpus}-GPU run failed (torchrun exit {proc.returncode}); no branch was written",
            hint="see the rank logs above; run once without --gpus to rule out the multi-GPU path",
        )


def init() -> None:
    """Join the process group (inside a torchrun worker). compressed-tensors' `init_dist` needs
    an accelerator; without one (the CPU test of this path) the ranks join over gloo."""
    import torch

    if torch.accelerator.current_accelerator() is None:
        import torch.distributed as dist

        dist.init_process_group(backend="gloo", init_method="env://", rank=rank(), world_size=world_size())
        dist.barrier()
        return
    from compressed_tensors.distributed import init_dist

    init_dist()


def sum_counts(counts: ExpertCounts) -> ExpertCounts:
    """Expert-coverage counts summed over ranks (each rank saw its own samples)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return counts
    out: ExpertCounts = {}
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    for kind, per_module in counts.items():
        keys = sorted(per_module)
        t = torch.tensor([per_module[k] for k in keys], dtype=torch.int64, device=device)
        dist.all_reduce(t)
        out[kind] = dict(zip(keys, t.tolist()))
    return out


def barrier() -> None:
    """Wait for every rank (nothing to wait for outside a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def barrier_and_close() -> None:
    import torch.distributed as dist

    barrier()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
