"""Narrow, version-pinned fixes of compressed-tensors. Each is applied through the `HOOKS` table
(release/awq/hooks.py) for as long as it is needed and undone after, like the engine's hooks."""

from __future__ import annotations

from typing import Any


def distributed_disk_update_is_fixed_upstream() -> bool:
    """Whether compressed-tensors defines `DistributedDiskCache.update_offload` itself (then its
    own is used and no fix is applied)."""
    from compressed_tensors.offload.cache.dist_disk import DistributedDiskCache

    return "update_offload" in DistributedDiskCache.__dict__


def atomic_update_offload(self: Any, offloaded: Any, data: Any) -> None:
    """`DistributedDiskCache.update_offload` for ranks that update the same weight at once
    (compressed-tensors 0.19.0; hook `distributed_disk_update`).

    The class inherits `DiskCache.update_offload`, which rewrites the weight's file in place and,
    where the offload is still a symlink into the base checkpoint, unlinks it first. AWQ's
    smoothing updates the same weight on every rank (each holds the same values: statistics and
    losses are all-reduced), so the ranks race: the slower unlink fails with FileNotFoundError
    (seen on two CPU ranks and on two H200s, at the first smoothed weight), and a rank may read a
    half-written file. Other updates are split between ranks (quantization parameters: each rank
    its share of modules), so the ranks cannot simply wait for each other. Here each rank writes
    a file of its own and renames it over the offload, which replaces a symlink or a file
    atomically; a reader sees the old or the new weight, whole."""
    import os

    import torch
    from safetensors.torch import save_file

    info = self.index[offloaded]
    path = info["safetensors_file"]
    if not self._is_ct_file_path(path):
        raise RuntimeError(f"refusing to write {path}: not a file of the offload")
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file({info["weight_name"]: data.reshape_as(offloaded).to(dtype=getattr(torch, info["dtype"]))}, tmp)
    os.replace(tmp, path)
