"""Merged batches: consecutive cached batches merged into fewer, larger forwards in the grid search."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

TOKEN_WISE_PARENTS = ("Linear", "Glm4MoeMLP", "Glm4MoeMoE")  # output row t depends on input row t only


def _tokens(batch: dict[str, Any]) -> int:
    """The batch's tokens: the most rows any of its tensors of two or more dimensions has (the
    hidden states'), whatever the order of its keys: a cache may hand `position_ids`, one row
    of a sample's positions, first (a resident cache's values stored once come first), and
    counting that as one token let a whole layer's samples merge into one forward."""
    import torch

    return max(
        (v.numel() // v.shape[-1] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() >= 2), default=0
    )


def _mergeable(a: dict[str, Any], b: dict[str, Any], token_wise: bool) -> bool:
    """Can batches a and b run as one forward? Token-wise parents: one tensor input each, equal but
    for the token axis. Others: batch-1 tensors of equal shapes (stacked on the batch axis);
    everything else (1-D tensors, None, flags) equal."""
    import torch

    if a.keys() != b.keys():
        return False
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    for k, va in a.items():
        vb = b[k]
        if isinstance(va, tuple) and isinstance(vb, tuple) and not token_wise:
            if len(va) != len(vb) or not all(_stackable(x, y) for x, y in zip(va, vb)):
                return False
        elif isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
            if token_wise:
                if len(tensors) != 1 or va.dim() < 2 or va.shape[:-2] != vb.shape[:-2] or va.shape[-1] != vb.shape[-1]:
                    return False
            elif not _stackable(va, vb):
                return False
        elif isinstance(va, torch.Tensor) or isinstance(vb, torch.Tensor) or va != vb:
            return False
    return True


def _stackable(x: Any, y: Any) -> bool:
    import torch

    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        return False
    if x.dim() >= 2 and x.shape[0] == 1:
        return x.shape == y.shape
    return x.shape == y.shape and torch.equal(x, y)  # no batch axis: must be the same value


def _merge(group: list[dict[str, Any]], token_wise: bool) -> dict[str, Any]:
    import torch

    if len(group) == 1:
        return group[0]

    def cat(values: list[Any]) -> Any:
        v = values[0]
        if isinstance(v, tuple):
            return tuple(cat([x[i] for x in values]) for i in range(len(v)))
        if not isinstance(v, torch.Tensor):
            return v
        if token_wise:
            return torch.cat(values, dim=-2)
        return torch.cat(values, dim=0) if v.dim() >= 2 and v.shape[0] == 1 else v

    return {k: cat([b[k] for b in group]) for k in group[0]}


def merged_batches(
    batches: Any, token_wise: bool, budget: int, counts: dict[str, int], kind: str
) -> Iterator[dict[str, Any]]:
    """Consecutive cached batches merged into forwards of at most `budget` tokens (merged batches);
    `counts[kind]` counts the forwards that merged more than one batch."""
    group: list[dict[str, Any]] = []
    tokens = 0
    for batch in batches:
        n = _tokens(batch)
        if group and (tokens + n > budget or not _mergeable(group[0], batch, token_wise)):
            counts[kind] = counts.get(kind, 0) + (len(group) > 1)
            yield _merge(group, token_wise)
            group, tokens = [], 0
        group.append(batch)
        tokens += n
    if group:
        counts[kind] = counts.get(kind, 0) + (len(group) > 1)
        yield _merge(group, token_wise)
