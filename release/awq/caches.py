"""Where cached calibration inputs live: sampled rows and Gram matrices of the routed experts' down_proj
(sampled expert rows and the Gram search), resident parent inputs (resident caches; what every
sample shares is stored once: dedup.py), the GPU ledger, and the deferred write-back of smoothed
weights (deferred write-back)."""

from __future__ import annotations

import functools
import math
import time
import weakref
from typing import TYPE_CHECKING, Any

from .dedup import Source, deduplicate_batch, same_leaf
from .ranks import rank_count

if TYPE_CHECKING:
    from .engine import Engine


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


def _stacked_grams(caches: list[Any]) -> Any:
    """The [n, in, in] tensor whose matrices are the caches' Gram sums in order (each a view of
    it, as the batched hooks' first product leaves them with `gram_by_gemm`), or None."""
    first = caches[0].gram
    base = getattr(first, "_base", None)
    if base is None or base.dim() != 3 or base.shape[0] != len(caches) or not base.is_contiguous():
        return None
    size = first.numel()
    for i, c in enumerate(caches):
        g = c.gram
        if g is None or g._base is not base or g.storage_offset() != base.storage_offset() + i * size:
            return None
    return base


def _give_back(ledger: Ledger, held: list[int]) -> None:
    ledger.used -= held[0]


class Ledger:
    """GPU bytes held by caches (the resident caches' resident inputs against the run's budget; the Gram search's
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


class WriteBack:
    """Deferred write-back: smoothed weights written to the onloaded (GPU) copy during a layer's AWQ
    smoothing, and copied to their offload once, at the end of it: into host memory, or (base
    weights offloaded to disk) written to their file. Under data parallelism every rank holds the
    same smoothed weights, so each weight is written by one rank only."""

    def __init__(self, stage_bytes: int = 256 * 2**20, check: bool = False) -> None:
        self.stage_bytes = stage_bytes
        self.check = check  # after each flush, compare every CPU copy (all ranks' shares) with ours
        self.checked = self.mismatches = 0
        self.check_seconds = 0.0  # left out of the layer's smoothing time
        # id(offloaded) -> (offloaded, onloaded, shared by the ranks, its DiskCache for a weight on disk)
        self.dirty: dict[int, tuple[Any, Any, bool, Any]] = {}
        self.stages: list[Any] = []
        self.deferred = 0
        self.bytes = 0
        self.disk_deferred = self.disk_written = 0  # weights on disk: marked, and written by this rank
        self.seconds = 0.0

    def defer(self, module: Any, name: str, data: Any) -> bool:
        """Write `data` to the onloaded copy of `module.<name>` only, if it has one distinct from
        a CPU offload (else False: the caller writes as stock does)."""
        import torch
        from compressed_tensors.offload.cache.base import OffloadCache
        from compressed_tensors.offload.cache.cpu import CPUCache
        from compressed_tensors.offload.cache.disk import DiskCache
        from compressed_tensors.offload.cache.dist_cpu import DistributedCPUCache
        from compressed_tensors.offload.cache.dist_disk import DistributedDiskCache

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
        disk = isinstance(cache, DiskCache)
        if cache is None or not (disk or isinstance(cache, CPUCache)):  # device offloads write as stock
            return False
        offloaded = cache.offloaded_values.get(name)
        onloaded = None if offloaded is None else OffloadCache.keep_onloaded_values.get(offloaded)
        if (
            onloaded is None
            or not torch.is_same_size(offloaded, data)
            # onloaded without a copy (CPU offload, execution on the CPU); a disk offload's
            # onloaded tensor is always a copy of its file
            or (not disk and onloaded.untyped_storage().data_ptr() == offloaded.untyped_storage().data_ptr())
        ):
            return False
        if data is not onloaded:
            with torch.no_grad():
                onloaded.copy_(data)
        shared = isinstance(cache, (DistributedCPUCache, DistributedDiskCache))
        if disk and id(offloaded) not in self.dirty:
            self.disk_deferred += 1
        self.dirty[id(offloaded)] = (offloaded, onloaded, shared, cache if disk else None)
        self.deferred += 1
        return True

    def flush(self) -> None:
        """Copy every marked weight to its offload. Under data parallelism every rank holds the
        same smoothed weights (the grid-search losses are all-reduced); weights offloaded to
        shared memory or to the shared disk offload are split between the ranks (each written
        once, not once per rank), and each waits for the others. The ranks mark the same
        weights in the same order, so their splits agree."""
        import torch

        items = list(self.dirty.values())
        everything = items
        self.dirty.clear()
        ranks = rank_count()
        shared = ranks > 1 and any(it[2] for it in items)
        if shared:
            import torch.distributed as dist

            rank = dist.get_rank()
            items = [it for i, it in enumerate(items) if not it[2] or i % ranks == rank]
        t = time.perf_counter()
        with torch.no_grad():
            self._copy([(o, g) for o, g, _s, disk in items if disk is None])
            for o, g, _s, disk in items:
                if disk is not None:  # the file replaced whole (compat.atomic_update_offload under ranks)
                    disk.update_offload(o, g)
                    self.bytes += g.nbytes
                    self.disk_written += 1
        if shared:
            dist.barrier()
        self.seconds += time.perf_counter() - t
        if self.check:
            t = time.perf_counter()
            for o, g, _s, disk in everything:
                self.checked += 1
                written = disk.onload(o) if disk is not None else o
                self.mismatches += not torch.equal(written.to(g.device), g)
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


def resident_budget(gib: float | None) -> int:
    """Bytes of GPU memory resident caches may hold: `gib`, or (None) 35 % of this process's GPU; none
    without one. 35 %: at 512 x 2048 on an H100 80GB, 28 GiB kept the dense layer's host window
    at 55.4 GiB (72.0 GiB at 20 %) with the GPU peak at 54.1 GiB allocated, 65.1 reserved."""
    import torch

    if gib is not None:
        return int(gib * 2**30)
    if not torch.cuda.is_available():
        return 0
    return int(0.35 * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


@functools.cache
def cache_classes() -> tuple[Any, Any, Any]:
    """The engine's replacements of AWQ's per-parent `IntermediatesCache`: `SampledCache` and
    `GramCache` (a routed expert's down_proj inputs, sampled expert rows and the Gram search) and `ResidentCache`
    (resident caches). Defined on first use, so that llm-compressor is imported only when AWQ runs;
    each takes the run's `Engine`."""
    import torch
    from compressed_tensors.utils import patch_attr
    from llmcompressor.modifiers.transform.awq import base as awq_base
    from llmcompressor.pipelines.cache import IntermediatesCache
    from torch.utils._pytree import tree_leaves, tree_map

    from .experts import gram_matrices, gram_matrix

    def _no_loss_masks() -> None:
        state = awq_base.active_session().state
        if state is not None and getattr(state, "loss_masks", None):
            raise RuntimeError(
                "glmrel's Gram expert search does not support loss masks; set awq.expert_search: sampled "
                "and awq.max_expert_tokens: null"
            )

    class SampledCache(IntermediatesCache):
        """An expert down_proj's cached inputs: at most `budget` rows over all batches, kept as
        ONE batch. Stock keeps N batches, so each of the 21 grid points runs N small forwards
        (each an onload from host memory); one batch makes that 21 forwards per expert
        whatever N is. The loss is the same sum of squared errors over the same rows,
        summed in a different order."""

        def __init__(self, engine: Engine, offload_device: Any, budget: int, salt: int) -> None:
            super().__init__(None, offload_device)
            self.engine = engine
            # the budget is for the whole run: under data parallelism each rank keeps its share
            # (the grid-search loss is all-reduced over the ranks' rows)
            self.per_batch = max(1, math.ceil(budget / max(1, engine.num_batches * rank_count())))
            self.salt = salt
            self.appended = 0
            self.pending: list[Any] = []
            self.resident: list[dict[str, Any]] | None = None
            self.device: Any = None  # where the rows were computed: the grid search runs there
            self.held = engine.ledger.holder(self)  # resident caches: bytes of rows kept on that device

        def append(self, values: dict[str, Any]) -> None:
            x = values.get("input")
            if set(values) != {"input"} or not isinstance(x, torch.Tensor) or x.dim() < 2:
                super().append(values)
                return
            rows = x.numel() // x.shape[-1]
            self.device = x.device
            self.engine.stats.tokens_seen += rows
            x = _subsample_rows(x, self.per_batch, self.salt + self.appended).reshape(-1, x.shape[-1])
            self.engine.stats.tokens_kept += x.shape[0]
            self.appended += 1
            if self.offload_device is None:
                self.pending.append(x.clone())
            elif self.engine.deduplicating and self.engine.ledger.take(x.nbytes, self.held):
                self.pending.append(x.clone())  # resident caches: stays on the GPU (no copy to host and back)
            else:
                self.pending.append(x.to(self.offload_device))

        def _flush(self) -> None:
            if not self.pending:
                return
            state = awq_base.active_session().state
            if state is not None and getattr(state, "loss_masks", None):
                raise RuntimeError(
                    "glmrel's expert token sample does not support loss masks; set awq.max_expert_tokens: null"
                )
            if self.held[0] and all(p.device == self.device for p in self.pending):
                rows = torch.cat(self.pending)  # every row stayed on the GPU: keep them there
                self.pending = []
                with patch_attr(self, "offload_device", None):
                    super().append({"input": rows.unsqueeze(0)})
                self.engine.stats.resident_expert_caches += 1
                return
            if self.held[0]:  # the budget ran out part way: all rows to the offload device, as stock
                self.engine.ledger.give(self.held[0], self.held)
            rows = torch.cat(
                [p.to(self.offload_device) if self.offload_device is not None else p for p in self.pending]
            )
            self.pending = []
            super().append({"input": rows.unsqueeze(0)})

        def __len__(self) -> int:
            self._flush()
            return super().__len__()

        def iter(self, input_names: Any = None) -> Any:
            self._flush()
            if not (self.engine.options.search_batch_tokens and self.engine.run.smoothing and input_names is None):
                return super().iter(input_names)
            # the grid search reads these rows 22 times: onload them once (merged batches); the
            # copy goes with this cache when AWQ deletes it after the mapping
            if self.resident is None:
                # flushed rows sit on the offload device, so fetch() would return them there
                self.resident = [
                    {
                        k: v.to(self.device or v.device) if isinstance(v, torch.Tensor) else v
                        for k, v in self.fetch(i).items()
                    }
                    for i in range(len(self.batch_intermediates))
                ]
            return iter(self.resident)

        def iter_prefetch(self, input_names: Any = None) -> Any:
            return (
                self.iter(input_names)
                if self.engine.options.search_batch_tokens
                else super().iter_prefetch(input_names)
            )

        def pin_memory(self, batch_index: int, input_names: Any = None) -> None:
            if not self.engine.options.search_batch_tokens:  # else onloaded once: pinning would cost more
                super().pin_memory(batch_index, input_names)

    class GramCache(IntermediatesCache):
        """Gram search: an expert down_proj's cached inputs, kept as the fp32 sum of X^T X over every
        calibration token (and the token count), on the device they were computed on. It holds
        no rows: the batched search (the batched expert search and the Gram search) reads `gram` and `rows`."""

        def __init__(self, engine: Engine, offload_device: Any) -> None:
            super().__init__(None, offload_device)
            self.engine = engine
            self.gram: Any = None
            self.rows = 0

        def append(self, values: dict[str, Any]) -> None:
            x = values.get("input")
            if set(values) != {"input"} or not isinstance(x, torch.Tensor) or x.dim() < 2:
                raise RuntimeError(
                    "glmrel's Gram expert search expects a Linear's single input; set awq.expert_search: sampled"
                )
            _no_loss_masks()
            flat = x.reshape(-1, x.shape[-1])
            g = gram_matrix(flat)
            if self.gram is None:
                self._first(g)
            else:
                self.gram += g
            self._count(flat.shape[0])

        def _first(self, g: Any) -> None:
            self.gram = g
            self.engine.grams.take(g.nbytes, self.engine.grams.holder(self))

        def _count(self, rows: int) -> None:
            self.rows += rows
            self.engine.stats.tokens_seen += rows
            self.engine.stats.tokens_kept += rows

        @staticmethod
        def add_grams(caches: list[GramCache], inputs: Any) -> None:
            """`append` for each cache of `caches` with its input `inputs[i]` ([n, tokens, in]),
            the Gram matrices as one batched product (all_experts.py's batched hooks)."""
            _no_loss_masks()
            engine = caches[0].engine
            stacked = _stacked_grams(caches) if engine.options.gram_by_gemm and inputs.is_cuda else None
            if stacked is not None and engine.gram_by_gemm is not False:
                # the product added into the stacked sums by the GEMM itself (C = X^T X + C, fp32):
                # no [n, in, in] temporary written, read back and added
                try:
                    torch.baddbmm(stacked, inputs.transpose(1, 2), inputs, out_dtype=torch.float32, out=stacked)
                    engine.gram_by_gemm = True
                except (TypeError, RuntimeError, NotImplementedError):  # a torch without it: the sum below
                    engine.gram_by_gemm = False
                engine.stats.gpu_kernels.setdefault(str(inputs.device), {})["gram_by_gemm"] = engine.gram_by_gemm
                if engine.gram_by_gemm:
                    for c in caches:
                        c._count(inputs.shape[1])
                    return
            grams = gram_matrices(inputs)
            if engine.options.gram_by_gemm and all(c.gram is None for c in caches):
                for c, g in zip(caches, grams.unbind(0)):  # each cache's sum a view of one stack
                    c._first(g)
            else:
                adding = [(c, g) for c, g in zip(caches, grams.unbind(0)) if c.gram is not None]
                for c, g in zip(caches, grams.unbind(0)):
                    if c.gram is None:
                        c._first(g.clone())
                if adding:
                    torch._foreach_add_([c.gram for c, _ in adding], [g for _, g in adding])
            for c in caches:
                c._count(inputs.shape[1])

        def __len__(self) -> int:
            return 1 if self.rows else 0

        def iter(self, input_names: Any = None) -> Any:
            if self.rows:
                raise RuntimeError("glmrel: a Gram-matrix cache has no rows to replay (the batched search reads it)")
            return iter(())

        def iter_prefetch(self, input_names: Any = None) -> Any:
            return self.iter(input_names)

        def pin_memory(self, batch_index: int, input_names: Any = None) -> None:
            return None

    class ResidentCache(IntermediatesCache):
        """Resident caches: a parent's cached inputs stay on the device they were computed on while the
        run's budget lasts, the rest go to the offload device (stock); inputs equal to the
        previous sample's are stored once."""

        def __init__(self, engine: Engine, offload_device: Any) -> None:
            super().__init__(None, offload_device)
            self.engine = engine
            self.held = engine.ledger.holder(self)
            # _same_as_before: the last batch given, and per key its leaves (tensors weakly held)
            self._sources: dict[str, Any] = {}
            self._unequal: set[str] = set()  # deduplicate_batch: keys whose values differ by sample

        def update(self, batch_index: int, values: dict[str, Any]) -> None:
            engine = self.engine
            order = list(values)
            same = self._same_as_before(batch_index, values)
            if same:  # the very tensors the previous sample brought: its stored values, no copy, no compare
                self.batch_intermediates[batch_index].update(same)
                engine.stats.deduplicated_values += len(same)
                values = {k: v for k, v in values.items() if k not in same}
            nbytes = sum(v.nbytes for v in tree_leaves(values) if isinstance(v, torch.Tensor))
            resident = self.offload_device is not None and engine.ledger.take(nbytes, self.held)
            if resident:
                # copied: a resident cache must not share memory with anything the model may
                # later change in place
                copy = tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, values)
                with patch_attr(self, "offload_device", None):
                    engine.stock_update(self, batch_index, copy)
                engine.stats.resident_batches += 1
            else:
                engine.stock_update(self, batch_index, values)
                engine.stats.offloaded_batches += 1
            if same:  # the batch's keys in the order it brought them, as the stock cache keeps them
                stored = self.batch_intermediates[batch_index]
                for key in order:
                    stored[key] = stored.pop(key)
            count, saved_bytes = deduplicate_batch(self, batch_index, self._unequal)
            engine.stats.deduplicated_values += count
            if resident:
                engine.ledger.give(saved_bytes, self.held)

        def _same_as_before(self, batch_index: int, values: dict[str, Any]) -> dict[str, Any]:
            """The previous batch's stored values of the keys whose tensors are this batch's very
            tensors (the pipeline's cache hands every sample the same causal mask and rotary
            tables once it stores them once: deduplicate_batch), and every other leaf equal;
            the sources of this batch remembered (weakly) for the next."""
            sources = self._sources
            last, sources["batch"] = sources.get("batch"), batch_index
            same = {}
            prev = self.batch_intermediates[batch_index - 1] if 0 < batch_index <= len(self.batch_intermediates) else {}
            for key, value in values.items():
                leaves = [Source(v) if isinstance(v, torch.Tensor) else v for v in tree_leaves(value)]
                before, sources[key] = sources.get(key), leaves
                if (
                    last == batch_index - 1
                    and key in prev
                    and before is not None
                    and len(before) == len(leaves)
                    and any(isinstance(x, Source) for x in leaves)
                    and all(same_leaf(x, y) for x, y in zip(before, leaves))
                ):
                    same[key] = prev[key]
            return same

        def pin_memory(self, batch_index: int, input_names: Any = None) -> None:
            """Stock pins each batch's values one by one: a value stored once for several
            batches is pinned once here. (Without an accelerator there is nothing to pin.)"""
            if not torch.accelerator.is_available():
                return
            pinned = self.__dict__.setdefault("_pinned", {})

            def pin(value: Any) -> None:
                v = value.value
                if isinstance(v, torch.Tensor):
                    if v.device.type == "cpu" and not v.is_pinned():
                        # ids of values not yet pinned are unique: all of them are alive (cached);
                        # a freed one's id can only come back as a pinned copy, never looked up
                        if id(v) not in pinned:
                            pinned[id(v)] = v.pin_memory()
                        value.value = pinned[id(v)]
                elif isinstance(v, (list, tuple)):
                    for x in v:
                        pin(x)

            for key, value in self.batch_intermediates[batch_index].items():
                if input_names is None or key in input_names:
                    pin(value)

    return SampledCache, GramCache, ResidentCache
