"""compat.atomic_update_offload (hook `distributed_disk_update`): ranks updating the same
disk-offloaded weight."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file


def test_update_replaces_the_symlink_and_never_writes_the_checkpoint(tmp_path):
    from compressed_tensors.offload.cache.dist_disk import DistributedDiskCache

    from release.awq import Patches
    from release.build.compat import atomic_update_offload, distributed_disk_update_is_fixed_upstream

    assert not distributed_disk_update_is_fixed_upstream(), "compressed-tensors 0.19.0 inherits DiskCache's"
    stock = DistributedDiskCache.update_offload
    fixes = Patches()
    fixes.hook("distributed_disk_update", atomic_update_offload)
    ckpt = tmp_path / "model-00001.safetensors"
    save_file({"model.layers.0.w": torch.ones(4, 4)}, ckpt)
    before = ckpt.read_bytes()
    folder = tmp_path / "offload"
    folder.mkdir()
    cache = DistributedDiskCache.__new__(DistributedDiskCache)  # no process group needed to update
    cache.offload_dir = folder
    offloaded = torch.empty(4, 4, device="meta")
    link = folder / "ct_disk_cache_0_1.safetensors"
    os.symlink(ckpt, link)
    DistributedDiskCache.index[offloaded] = {
        "safetensors_file": str(link),
        "weight_name": "model.layers.0.w",
        "dtype": "float32",
    }
    try:
        # two ranks writing the same smoothed values: the second replaces the first, whole
        for _rank in range(2):
            cache.update_offload(offloaded, torch.full((16,), 2.0))
    finally:
        del DistributedDiskCache.index[offloaded]
        fixes.undo()
    assert DistributedDiskCache.update_offload is stock and "update_offload" not in vars(DistributedDiskCache)
    assert not link.is_symlink()
    assert torch.equal(load_file(link)["model.layers.0.w"], torch.full((4, 4), 2.0))
    assert ckpt.read_bytes() == before, "the base checkpoint is never written"
    assert sorted(p.name for p in folder.iterdir()) == [link.name], "no temporary file left"
