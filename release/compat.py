"""Narrow, version-pinned workarounds for compressed-tensors, applied only where they are needed.

(The engine's own per-run patches of llm-compressor live in release/awq/, undone after each run.)"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def patch_distributed_disk_update() -> bool:
    """Let ranks update the same disk-offloaded weight at once (compressed-tensors 0.19.0).

    `DistributedDiskCache` inherits `DiskCache.update_offload`, which rewrites the weight's file
    in place and, where the offload is still a symlink into the base checkpoint, unlinks it
    first. AWQ's smoothing updates the same weight on every rank (each holds the same values:
    statistics and losses are all-reduced), so the ranks race: the slower unlink fails with
    FileNotFoundError (seen on two CPU ranks and on two H200s, at the first smoothed weight), and
    a rank may read a half-written file. Other updates are split between ranks (quantization
    parameters: each rank its share of modules), so the ranks cannot simply wait for each other.
    Patched: each rank writes a file of its own and renames it over the offload, which replaces
    a symlink or a file atomically; a reader sees the old or the new weight, whole. Not applied
    where compressed-tensors defines its own. Returns whether the patch is in place."""
    from compressed_tensors.offload.cache.dist_disk import DistributedDiskCache

    current = DistributedDiskCache.__dict__.get("update_offload")
    if current is not None:
        return getattr(current, "_glmrel_atomic", False)

    def update_offload(self, offloaded, data):  # type: ignore[no-untyped-def]
        import os

        import torch
        from safetensors.torch import save_file

        info = self.index[offloaded]
        path = info["safetensors_file"]
        assert self._is_ct_file_path(path), f"refusing to write {path}: not a file of the offload"
        tmp = f"{path}.{os.getpid()}.tmp"
        save_file({info["weight_name"]: data.reshape_as(offloaded).to(dtype=getattr(torch, info["dtype"]))}, tmp)
        os.replace(tmp, path)

    update_offload._glmrel_atomic = True  # type: ignore[attr-defined]
    DistributedDiskCache.update_offload = update_offload  # type: ignore[method-assign]
    log.info("compressed-tensors: DistributedDiskCache.update_offload replaces each file atomically")
    return True
