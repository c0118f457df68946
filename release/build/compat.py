"""Narrow, version-pinned fixes of the libraries glmrel builds on. compressed-tensors' are applied
through the `HOOKS` table (release/awq/hooks.py) for as long as they are needed and undone after,
like the engine's hooks; `linearized_load` is a context around one `from_pretrained`."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def linearized_load(model_type: str) -> Iterator[None]:
    """`from_pretrained` inside the block builds the model's experts as llm-compressor's
    per-expert Linears and loads a per-expert checkpoint's tensors straight into them, with
    llm-compressor's own load mappings for `model_type` (`get_linearize_load_mappings`).

    The alternative, loading and then `linearize_moe`, makes every expert twice: transformers
    stacks the checkpoint's per-expert tensors into fused parameters, and linearizing copies them
    out again. With the weights offloaded to disk both copies are written to the offload folder
    (run U: 43.5 GiB for a 35.8 GiB model, the load 6.4x the in-RAM one); here the offload's
    files are symlinks into the checkpoint, nothing is written while loading.

    llm-compressor's own path to this (`load_quantizable_moe`, 0.14.0.1) does not run under
    transformers 5.17: its class patch (`apply_patches`) lists every transformers module in
    `sys.modules`, which imports image processors that need torchvision, and the glm4_moe model's
    `_init_weights` then reaches for the fused `gate_up_proj` on the per-expert module. So the
    experts' class is replaced in its own modeling module only, `_init_weights` passes over the
    per-expert modules (their Linears are the checkpoint's tensors), and the conversion mapping
    registered for `model_type` is put back on leaving: later loads in the process are as before."""
    from compressed_tensors.utils import patch_attr
    from llmcompressor.modeling.moe.conversion_mappings import get_linearize_load_mappings
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    experts_cls: Any
    load_map: Any
    experts_cls, load_map, _ = get_linearize_load_mappings(model_type)
    modeling = sys.modules[experts_cls.__module__]
    pretrained: Any
    (pretrained,) = [
        c
        for c in vars(modeling).values()
        if isinstance(c, type) and c.__module__ == modeling.__name__ and "_init_weights" in vars(c)
    ]
    own_init = pretrained._init_weights

    def init_weights(self: Any, module: Any) -> None:
        if not isinstance(module, LinearExperts2D):
            own_init(self, module)

    registered = get_checkpoint_conversion_mapping(model_type)
    register_checkpoint_conversion_mapping(model_type, load_map, overwrite=True)
    try:
        with (
            patch_attr(modeling, experts_cls.__name__, LinearExperts2D.get_linear_experts_cls(experts_cls)),
            patch_attr(pretrained, "_init_weights", init_weights),
        ):
            yield
    finally:
        register_checkpoint_conversion_mapping(model_type, registered or [], overwrite=True)


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
