"""The library functions the engine replaces for one run (what a subclass of AWQModifier cannot
reach), in one table, and `Patches`, which applies them and puts each back when the run ends."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

_ABSENT = object()


@dataclass(frozen=True)
class Hook:
    target: str  # "module:attribute" or "module:Class.attribute"
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
        "awq.resident_cache_gib != 0 (patch 9)",
        True,
        "the pipeline's own layer-input caches store a value equal to the previous sample's once",
    ),
    "cache_pin": Hook(
        "llmcompressor.pipelines.cache:IntermediatesCache.pin_memory",
        "no accelerator",
        True,
        "AWQ pins cached inputs, which raises on CPU-only torch; with no device there is nothing to pin",
    ),
    "experts_forward": Hook(
        "llmcompressor.modeling.moe.linear_experts:LinearExperts2D.forward",
        "batched_experts (patch 5)",
        False,
        "inside the smoothing step the routed experts run as batched matmuls (checked against the loop)",
    ),
    "forward_context": Hook(
        f"{_AWQ}:calibration_forward_context",
        "sdpa_in_search (patch 6)",
        False,
        "inside the smoothing step attention runs through SDPA instead of the eager attention forced for calibration",
    ),
    "offload_write": Hook(
        f"{_AWQ}:update_offload_parameter",
        "awq.deferred_write_back (patch 11), or side branches (side.py)",
        True,
        "inside the smoothing step a write lands on the onloaded copy; the CPU offload is written once a layer "
        "(a side branch's run writes the onloaded copy only)",
    ),
    "allreduce": Hook(
        f"{_AWQ}:_allreduce_data_sum",
        "data-parallel ranks",
        True,
        "on CPU ranks gloo sums CPU tensors (stock moves them to an accelerator there is not); on GPUs timed",
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
