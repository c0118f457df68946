"""Data-parallel ranks: their count, CPU all-reduce, and the shared-memory smoothing fix of CPU ranks."""

from __future__ import annotations

from typing import Any


def rank_count() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def cpu_allreduce_sum(data: list[Any]) -> list[Any]:
    import torch.distributed as dist

    data = [datum.clone() for datum in data]
    for datum in data:
        dist.all_reduce(datum, op=dist.ReduceOp.SUM)
    return data


def divided_smooth_weight(weight: Any, scales: Any) -> Any:
    """Stock's smoothing of a smooth layer's weight (`_apply_smoothing._smooth`), out of place:
    a norm is divided by the scales; a Linear has its last rows divided (v_proj smoothed for
    o_proj, up_proj for down_proj)."""
    if weight.ndim == 1:
        return weight.div(scales)
    fixed = weight.clone()
    fixed[-scales.size(0) :] = weight[-scales.size(0) :].div(scales.view(-1, 1))
    return fixed


class SharedSmoothFix:
    """Ranks on CPU only (the test of the data-parallel path): compressed-tensors offloads the
    weights of a distributed run to shared CPU memory and, when the execution device is the
    CPU too, onloads them without a copy, so stock's in-place `smooth_layer.weight.div_(scales)`
    runs once per rank on the same memory. Each rank snapshots the smooth layer before the
    grid search (no rank divides before every rank has joined the search's all-reduces) and,
    once the mapping is smoothed, writes the single division back; every rank writes the same
    value. On GPUs each rank divides its own onloaded copy, and none of this runs."""

    def __init__(self) -> None:
        self.pending: tuple[Any, Any, Any, Any] | None = None

    def before(self, mapping: Any) -> None:
        self.flush()
        layer = mapping.smooth_layer
        bias = getattr(layer, "bias", None)
        self.pending = (layer, layer.weight.detach().clone(), None if bias is None else bias.detach().clone(), None)

    def chosen(self, scales: Any) -> None:
        if self.pending is not None:
            self.pending = (*self.pending[:3], scales)

    def flush(self) -> None:
        from llmcompressor.modifiers.transform.awq import base as awq_base

        if self.pending is None or self.pending[3] is None:
            self.pending = None
            return
        layer, weight, bias, scales = self.pending
        self.pending = None
        scales = scales.to(weight.device)
        awq_base.update_offload_parameter(layer, "weight", divided_smooth_weight(weight, scales))
        if bias is not None:
            awq_base.update_offload_parameter(layer, "bias", bias.div(scales))
