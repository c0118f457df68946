"""Values equal for every calibration sample stored once (resident caches): the causal mask, the
rotary tables and the position ids, which every sample of one length shares, held once instead
of once a sample, and handed to the next layer as one tensor, so its parent caches keep them
without a copy or a compare (a compare waits for the GPU)."""

from __future__ import annotations

import weakref
from typing import Any

DEDUPLICATED_INPUTS = ("attention_mask", "position_embeddings", "position_ids")  # resident caches


def _same_plain(a: Any, b: Any) -> bool:
    """The same object, or equal plain values of one type (None, a number, a string)."""
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, bool, str)) and a == b)


def _deduplicate(new: Any, prev: Any) -> int | None:
    """Resident caches: point the tensors of IntermediateValue `new` (nested in tuples or lists) at
    `prev`'s where they are equal; returns the bytes no longer held twice, or None where some
    part differs (its equal parts are still pointed at `prev`'s)."""
    import torch

    a, b = new.value, prev.value
    if isinstance(a, torch.Tensor):
        if a is b:
            return 0
        if (
            isinstance(b, torch.Tensor)
            and (a.device, a.dtype, a.shape) == (b.device, b.dtype, b.shape)
            and torch.equal(a, b)
        ):
            new.value = b
            return a.nbytes
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        parts = [_deduplicate(x, y) for x, y in zip(a, b)]
        return None if None in parts else sum(p for p in parts if p is not None)
    return 0 if _same_plain(a, b) else None


class Source:
    """A tensor a ResidentCache was given, weakly held, and its version (an in-place write since
    bumps it)."""

    __slots__ = ("ref", "version")

    def __init__(self, tensor: Any) -> None:
        self.ref = weakref.ref(tensor)
        self.version = tensor._version


def same_leaf(before: Any, now: Any) -> bool:
    """A leaf remembered by `ResidentCache._same_as_before` against this batch's: the same tensor,
    unwritten since, or the same plain value (None, a number, a string)."""
    if isinstance(before, Source) or isinstance(now, Source):
        if not (isinstance(before, Source) and isinstance(now, Source)):
            return False
        tensor = before.ref()
        if tensor is None or tensor is not now.ref():
            return False
        return bool(getattr(tensor, "_version", None) == before.version)
    return _same_plain(before, now)


def deduplicate_batch(cache: Any, batch_index: int, unequal: set[str]) -> tuple[int, int]:
    """Resident caches: store the values of batch `batch_index` once where they equal the
    previous batch's; returns (values, bytes) saved. The DEDUPLICATED_INPUTS are compared at
    every batch; any other key only until its values first differ (added to `unequal`, the
    cache's set of such keys, which its owner keeps from batch to batch): the
    pipeline's own cache names its inputs by the traced graph's names (the causal mask and the
    rotary tables of every sample under `wrapped_N` and `model_rotary_emb`), which are equal
    for every sample of one length, while a layer's hidden states differ at the first compare.
    Stored once, a value reaches the next layer as the same tensor for every sample, and its
    parent caches see that without comparing (ResidentCache: no wait for the GPU)."""
    if batch_index < 1 or batch_index >= len(cache.batch_intermediates):
        return 0, 0
    new, prev = cache.batch_intermediates[batch_index], cache.batch_intermediates[batch_index - 1]
    values = saved = 0
    for key in new.keys() & prev.keys():
        if key in unequal:
            continue
        n = _deduplicate(new[key], prev[key])
        if n is None:
            if key not in DEDUPLICATED_INPUTS:
                unequal.add(key)
            continue
        values += n > 0
        saved += n
    return values, saved
