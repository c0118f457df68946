"""Every library attribute glmrel replaces (what a subclass of AWQModifier cannot reach, and one
fix of compressed-tensors), in one table, and `Patches`, which applies them and puts each back
when their scope ends: the engine's run (`scaled_awq`), one layer's smoothing, a side branch's
smoothing, or a calibration under torchrun with disk-offloaded weights (calibrate.py)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

_ABSENT = object()


@dataclass(frozen=True)
class Hook:
    target: str  # "module:attribute" or "module:Class.attribute"
    scope: str  # how long it is in place: "run", "smoothing", "side run" or "calibration"
    when: str  # what turns it on
    exact: bool  # True: stock's values, bit for bit
    why: str

    def owner_and_name(self) -> tuple[Any, str]:
        module, path = self.target.split(":")
        owner: Any = importlib.import_module(module)
        *parents, name = path.split(".")
        for p in parents:
            owner = getattr(owner, p)
        return owner, name


_AWQ = "llmcompressor.modifiers.transform.awq.base"
HOOKS = {
    "cache_update": Hook(
        "llmcompressor.pipelines.cache:IntermediatesCache.update",
        "run",
        "awq.resident_cache_gib != 0 (resident caches)",
        True,
        "the pipeline's own layer-input caches store a value equal to the previous sample's once",
    ),
    "cache_pin": Hook(
        "llmcompressor.pipelines.cache:IntermediatesCache.pin_memory",
        "run",
        "no accelerator",
        True,
        "AWQ pins cached inputs, which raises on CPU-only torch; with no device there is nothing to pin",
    ),
    "experts_forward": Hook(
        "llmcompressor.modeling.moe.linear_experts:LinearExperts2D.forward",
        "run",
        "batched_experts or fused_gpu_experts",
        False,
        "inside the smoothing step the routed experts run as batched matmuls (checked against the loop); on a "
        "GPU the calibration pass runs every expert on every token as batched products",
    ),
    "forward_context": Hook(
        f"{_AWQ}:calibration_forward_context",
        "run",
        "sdpa_in_search",
        False,
        "inside the smoothing step attention runs through SDPA instead of the eager attention forced for calibration",
    ),
    "calibration_attention": Hook(
        "transformers.models.glm4_moe.modeling_glm4_moe:eager_attention_forward",
        "run",
        "causal_calibration_attention",
        False,
        "in the calibration and propagation passes a causal attention whose mask is exactly the causal pattern "
        "runs SDPA's causal kernel instead of eager attention (causal.py)",
    ),
    "rotary_embedding": Hook(
        "transformers.models.glm4_moe.modeling_glm4_moe:apply_rotary_pos_emb",
        "run",
        "triton_kernels and fused_rope (a call on CPU tensors is transformers' own)",
        True,
        "GLM's rotary embedding of q and k as one kernel each instead of about ten passes of torch's ops, where the "
        "kernel gave transformers' bits on the device (rope.py)",
    ),
    "router_forward": Hook(
        "transformers.models.glm4_moe.modeling_glm4_moe:Glm4MoeTopkRouter.forward",
        "run",
        "reuse_routing",
        True,
        "inside a MoE block's grid search the router's outputs of the reference forward are reused at every grid "
        "point (its weight and input do not change there; the first reuse is recomputed and compared)",
    ),
    "offload_write": Hook(
        f"{_AWQ}:update_offload_parameter",
        "run",
        "awq.deferred_write_back",
        True,
        "inside the smoothing step a write lands on the onloaded copy; the CPU offload is written once a layer",
    ),
    "side_offload_write": Hook(
        f"{_AWQ}:update_offload_parameter",
        "side run",
        "a side branch's smoothing of a layer (side.py)",
        True,
        "a side branch's smoothed weights land on the onloaded copy only: they never reach the offload, the next "
        "layer or the propagating branch",
    ),
    "calibrate_all_experts": Hook(
        "llmcompressor.modeling.moe.context:_CALIBRATE_ALL_EXPERTS",
        "smoothing",
        "routed_experts_in_search",
        False,
        "inside the smoothing step the MoE block runs each expert on its routed tokens only (the block's output, "
        "what AWQ's loss compares, uses nothing else); the calibration statistics still see every token",
    ),
    "cpu_onload": Hook(
        "compressed_tensors.offload.cache.cpu:CPUCache.onload",
        "run",
        "awq.onload_ahead names the onload device's type",
        True,
        "a weight the helper thread onloaded ahead (read_ahead.py: the same onload, its source unchanged since) is "
        "handed over instead of copied again",
    ),
    "disk_onload": Hook(
        "compressed_tensors.offload.cache.disk:DiskCache.onload",
        "run",
        "awq.onload_ahead names the onload device's type",
        True,
        "as cpu_onload, for weights offloaded to disk",
    ),
    "disk_update": Hook(
        "compressed_tensors.offload.cache.disk:DiskCache.update_offload",
        "run",
        "awq.onload_ahead names the onload device's type",
        True,
        "a disk-offloaded weight rewritten in place drops the helper thread's copy of it first (read_ahead.py)",
    ),
    "allreduce": Hook(
        f"{_AWQ}:_allreduce_data_sum",
        "run",
        "data-parallel ranks",
        True,
        "on CPU ranks gloo sums CPU tensors (stock moves them to an accelerator there is not); on GPUs timed",
    ),
    "distributed_disk_update": Hook(
        "compressed_tensors.offload.cache.dist_disk:DistributedDiskCache.update_offload",
        "calibration",
        "ranks under torchrun with disk-offloaded base weights (compat.py)",
        True,
        "ranks updating the same disk-offloaded weight each write a file of their own and rename it over the "
        "offload, instead of racing to unlink and rewrite one file",
    ),
}


class Patches:
    """Attributes replaced with `set` (or a hook of HOOKS with `hook`), restored in reverse
    order by `undo` (the run's `finally`, so also after a failure). `undo` puts back the very
    object that was there, and removes what only shadowed an inherited attribute: a test checks
    identity with the library's own functions after a run."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def hook(self, name: str, value: Any) -> None:
        owner, attr = HOOKS[name].owner_and_name()
        self.set(owner, attr, value)

    def set(self, owner: Any, name: str, value: Any) -> None:
        own = vars(owner).get(name, _ABSENT)  # the owner's own attribute, not one it inherits
        self._saved.append((owner, name, own))
        setattr(owner, name, value)

    def undo(self) -> None:
        while self._saved:
            owner, name, old = self._saved.pop()
            if old is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
