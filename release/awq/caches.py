"""Where cached calibration inputs live: sampled rows and Gram matrices of the routed experts' down_proj
(patches 4 and 10), resident and deduplicated parent inputs (patch 9), the GPU ledger, and the
deferred write-back of smoothed weights (patch 11)."""

from __future__ import annotations

import time
import weakref
from typing import Any

from .ranks import _ranks


def _subsample_rows(x: Any, keep: int, salt: int) -> Any:
    """`keep` rows of x (flattened to [tokens, features]), evenly spread with a fixed offset."""
    import torch

    flat = x.reshape(-1, x.shape[-1])
    n = flat.shape[0]
    if keep >= n:
        return x
    offset = salt % max(1, n // keep)
    idx = (torch.arange(keep, device=flat.device) * n) // keep + offset
    return flat.index_select(0, idx.clamp_(max=n - 1)).unsqueeze(0)


DEDUPLICATED_INPUTS = ("attention_mask", "position_embeddings", "position_ids")  # patch 9


def _deduplicate(new: Any, prev: Any) -> int:
    """Patch 9: point the tensors of IntermediateValue `new` (nested in tuples or lists) at
    `prev`'s where they are equal; returns the bytes no longer held twice."""
    import torch

    a, b = new.value, prev.value
    if isinstance(a, torch.Tensor):
        if (
            isinstance(b, torch.Tensor)
            and a is not b
            and (a.device, a.dtype, a.shape) == (b.device, b.dtype, b.shape)
            and torch.equal(a, b)
        ):
            new.value = b
            return a.nbytes
        return 0
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return sum(_deduplicate(x, y) for x, y in zip(a, b))
    return 0


def _deduplicate_batch(cache: Any, batch_index: int) -> tuple[int, int]:
    """Patch 9: store the DEDUPLICATED_INPUTS of batch `batch_index` once where they equal the
    previous batch's; returns (values, bytes) saved."""
    if batch_index < 1 or batch_index >= len(cache.batch_intermediates):
        return 0, 0
    new, prev = cache.batch_intermediates[batch_index], cache.batch_intermediates[batch_index - 1]
    values = saved = 0
    for key in DEDUPLICATED_INPUTS:
        if key in new and key in prev:
            n = _deduplicate(new[key], prev[key])
            values += n > 0
            saved += n
    return values, saved


def _give_back(ledger: _Ledger, held: list[int]) -> None:
    ledger.used -= held[0]


class _Ledger:
    """GPU bytes held by caches (patch 9's resident inputs against the run's budget; patch 10's
    Gram matrices, unbounded), and their peak. Each holder's bytes come back when it is
    collected."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.used = 0
        self.peak = 0

    def holder(self, owner: Any) -> list[int]:
        """The count of bytes `owner` holds, given back when `owner` goes."""
        held = [0]
        weakref.finalize(owner, _give_back, self, held)
        return held

    def take(self, n: int, held: list[int]) -> bool:
        if self.used + n > self.budget:
            return False
        self.used += n
        held[0] += n
        self.peak = max(self.peak, self.used)
        return True

    def give(self, n: int, held: list[int]) -> None:
        self.used -= n
        held[0] -= n


class _WriteBack:
    """Patch 11: smoothed weights written to the onloaded (GPU) copy during a layer's AWQ
    smoothing, and copied to their CPU offload once, at the end of it."""

    def __init__(self, stage_bytes: int = 256 * 2**20, check: bool = False) -> None:
        self.stage_bytes = stage_bytes
        self.check = check  # after each flush, compare every CPU copy (all ranks' shares) with ours
        self.checked = self.mismatches = 0
        self.check_seconds = 0.0  # left out of the layer's smoothing time
        self.dirty: dict[int, tuple[Any, Any, bool]] = {}  # id(offloaded) -> (offloaded, onloaded, shared)
        self.stages: list[Any] = []
        self.deferred = 0
        self.bytes = 0
        self.seconds = 0.0

    def defer(self, module: Any, name: str, data: Any) -> bool:
        """Write `data` to the onloaded copy of `module.<name>` only, if it has one distinct from
        a CPU offload (else False: the caller writes as stock does)."""
        import torch
        from compressed_tensors.offload.cache.base import OffloadCache
        from compressed_tensors.offload.cache.cpu import CPUCache
        from compressed_tensors.offload.cache.dist_cpu import DistributedCPUCache

        if not OffloadCache.offloading_disabled or OffloadCache.onloading_disabled:
            return False
        cache = next(
            (
                c
                for c in (module.__dict__.get("_parameters"), module.__dict__.get("_buffers"))
                if c is not None and name in c
            ),
            None,
        )
        if not isinstance(cache, CPUCache):  # disk and device offloads write as stock
            return False
        offloaded = cache.offloaded_values.get(name)
        onloaded = None if offloaded is None else OffloadCache.keep_onloaded_values.get(offloaded)
        if (
            onloaded is None
            or onloaded.untyped_storage().data_ptr() == offloaded.untyped_storage().data_ptr()
            or not torch.is_same_size(offloaded, data)
        ):
            return False  # not onloaded, or onloaded without a copy (execution on the CPU)
        if data is not onloaded:
            with torch.no_grad():
                onloaded.copy_(data)
        self.dirty[id(offloaded)] = (offloaded, onloaded, isinstance(cache, DistributedCPUCache))
        self.deferred += 1
        return True

    def flush(self) -> None:
        """Copy every marked weight to its CPU offload. Under data parallelism every rank holds
        the same smoothed weights (the grid-search losses are all-reduced); weights offloaded to
        shared memory are split between the ranks, and each waits for the others."""
        import torch

        items = list(self.dirty.values())
        everything = items
        self.dirty.clear()
        ranks = _ranks()
        shared = ranks > 1 and any(s for _o, _g, s in items)
        if shared:
            import torch.distributed as dist

            rank = dist.get_rank()
            items = [it for i, it in enumerate(items) if not it[2] or i % ranks == rank]
        t = time.perf_counter()
        with torch.no_grad():
            self._copy([(o, g) for o, g, _s in items])
        if shared:
            dist.barrier()
        self.seconds += time.perf_counter() - t
        if self.check:
            t = time.perf_counter()
            for o, g, _s in everything:
                self.checked += 1
                self.mismatches += not torch.equal(o.to(g.device), g)
            self.check_seconds += time.perf_counter() - t

    def _copy(self, pairs: list[tuple[Any, Any]]) -> None:
        import torch

        pieces = []
        for dst, src in pairs:
            self.bytes += dst.nbytes
            if not (dst.is_contiguous() and src.is_contiguous() and dst.dtype == src.dtype):
                dst.copy_(src)
                continue
            d, s = dst.reshape(-1).view(torch.uint8), src.reshape(-1).view(torch.uint8)
            pieces += [
                (d[i : i + self.stage_bytes], s[i : i + self.stage_bytes])
                for i in range(0, d.numel(), self.stage_bytes)
            ]
        if not pieces:
            return
        if not self.stages:
            pin = torch.cuda.is_available()
            self.stages = [torch.empty(self.stage_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        loads: list[list[tuple[Any, Any]]] = [[]]
        used = 0
        for d, s in pieces:  # pack pieces into loads of at most one staging buffer each
            if used + s.numel() > self.stage_bytes:
                loads.append([])
                used = 0
            loads[-1].append((d, s))
            used += s.numel()
        previous = None
        for i, load in enumerate(loads):
            stage, at, moves = self.stages[i % 2], 0, []
            for d, s in load:
                stage[at : at + s.numel()].copy_(s, non_blocking=True)
                moves.append((d, stage[at : at + s.numel()]))
                at += s.numel()
            done = torch.cuda.Event() if load[0][1].is_cuda else None
            if done is not None:
                done.record()
            if previous is not None:  # the host copies of the other buffer, while this one fills
                _land(*previous)
            previous = (done, moves)
        if previous is not None:
            _land(*previous)


def _land(done: Any, moves: list[tuple[Any, Any]]) -> None:
    if done is not None:
        done.synchronize()
    for d, staged in moves:
        d.copy_(staged)


def _resident_budget(gib: float | None) -> int:
    """Bytes of GPU memory patch 9 may hold: `gib`, or (None) 35 % of this process's GPU; none
    without one. 35 %: at 512 x 2048 on an H100 80GB, 28 GiB kept the dense layer's host window
    at 55.4 GiB (72.0 GiB at 20 %) with the GPU peak at 54.1 GiB allocated, 65.1 reserved."""
    import torch

    if gib is not None:
        return int(gib * 2**30)
    if not torch.cuda.is_available():
        return 0
    return int(0.35 * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
