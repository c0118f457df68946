"""`scaled_awq`: the engine's patches applied to llm-compressor's AWQModifier for one `oneshot` call,
and undone after it. The design and each patch are described in the package's docstring."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from .balance import _balance_groups, _batched_balance_search
from .caches import _deduplicate_batch, _Ledger, _resident_budget, _subsample_rows, _WriteBack
from .experts import _batchable, _batched_expert_search, _gram, _grouped_experts_forward
from .hooks import Patches
from .merge import TOKEN_WISE_PARENTS, _merged_batches
from .options import TARGET_VERSION, ScaleOptions
from .ranks import _cpu_allreduce_sum, _ranks, _SharedSmoothFix
from .state import RunState, first
from .stats import LayerRecord, ScaleStats, _HostPeak, _pinned_peak_gib, mapping_kind, release_host_memory


@contextlib.contextmanager
def scaled_awq(options: ScaleOptions, num_batches: int) -> Iterator[ScaleStats]:
    """Apply the chosen patches to AWQModifier for the duration of one `oneshot` call."""
    import llmcompressor
    import torch
    from compressed_tensors.utils import patch_attr
    from llmcompressor.modeling.moe import context as moe_context
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from llmcompressor.modifiers.transform.awq import base as awq_base
    from llmcompressor.pipelines.cache import IntermediatesCache
    from torch.utils._pytree import tree_leaves, tree_map

    if llmcompressor.__version__ != TARGET_VERSION:
        raise RuntimeError(
            f"glmrel's AWQ patches target llmcompressor {TARGET_VERSION}, found {llmcompressor.__version__}; "
            "re-read llmcompressor/modifiers/transform/awq/base.py and update release/awq/"
        )
    cls = awq_base.AWQModifier
    stats = ScaleStats()
    run = RunState()  # what the patches below share, for this call only
    # stock's methods, which the replacements below call
    saved = {
        name: getattr(cls, name)
        for name in ("_compute_best_scale", "_apply_smoothing", "_setup_activation_cache_hooks")
    }
    stock_update = IntermediatesCache.update
    stock_write = awq_base.update_offload_parameter
    write_back = _WriteBack(check=options.check_write_back) if options.deferred_write_back else None

    def update_offload_parameter(module: Any, name: str, data: Any) -> None:
        """Patch 11: inside the smoothing step a write lands on the onloaded copy only."""
        if not (write_back is not None and run.smoothing and write_back.defer(module, name, data)):
            stock_write(module, name, data)

    deduplicating = options.resident_cache_gib != 0
    ledger = _Ledger(_resident_budget(options.resident_cache_gib) if deduplicating else 0)
    grams = _Ledger(math.inf)

    def _run_samples(self: Any, module: Any) -> Any:
        run.generation += 1  # balance weights change only between _run_samples calls
        cache = self._parent_args_cache[module]
        state = awq_base.active_session().state
        batches = cache.iter_prefetch() if state.sequential_prefetch else cache
        if options.search_batch_tokens and run.smoothing and not getattr(state, "loss_masks", None):
            kind = type(module).__name__
            token_wise = kind in TOKEN_WISE_PARENTS
            if token_wise or options.sdpa_in_search:
                batches = _merged_batches(batches, token_wise, options.search_batch_tokens, stats.merged_forwards, kind)
        outputs = (first(module(**batch)) for batch in batches)
        if options.stream_loss and run.lazy:
            return outputs  # consumed one batch at a time by _compute_loss
        return list(outputs)

    def _compute_best_scale(self: Any, mapping: Any, fp16_outputs: Any, orig_layer_weights: Any) -> Any:
        if deduplicating and not isinstance(self._parent_args_cache.get(mapping.parent), (SampledCache, GramCache)):
            release_host_memory()  # what earlier mappings pinned and freed
        run.lazy = options.stream_loss
        if shared_fix is not None:
            shared_fix.before(mapping)
        try:
            groups = _balance_groups(mapping.balance_layers) if options.batched_balance_layers else None
            if groups:
                phases = stats.search_phase_s.setdefault(mapping_kind(mapping.smooth_name), {})
                phases["prepare"] = phases.get("prepare", 0.0) + time.perf_counter() - clock["mapping"]
                losses: list[float] = []
                best = _batched_balance_search(self, mapping, fp16_outputs, orig_layer_weights, groups, phases, losses)
                stats.grid_losses[mapping.smooth_name] = losses
                stats.batched_balance_mappings += 1
                stats.batched_balance_layers += sum(len(g) for g in groups)
            else:
                best = saved["_compute_best_scale"](self, mapping, fp16_outputs, orig_layer_weights)
            if shared_fix is not None:
                shared_fix.chosen(best)
        finally:
            run.lazy = False
            # from the end of the previous mapping's search: its smoothing, this one's setup,
            # reference forward and grid search
            now = time.perf_counter()
            kind = mapping_kind(mapping.smooth_name)
            stats.mapping_s[kind] = stats.mapping_s.get(kind, 0.0) + now - clock["mapping"]
            clock["mapping"] = now
        if options.record_scales:
            stats.scales[mapping.smooth_name] = best.detach().float().cpu().clone()
        return best

    clock = {"last": time.perf_counter(), "mapping": time.perf_counter()}
    cpu_ranks = torch.accelerator.current_accelerator() is None and awq_base.is_distributed()
    shared_fix = _SharedSmoothFix() if cpu_ranks else None

    def _apply_smoothing(self: Any, model: Any) -> None:
        t = time.perf_counter()
        excluded = 0.0  # the benchmark's write-back check is not the layer's time
        clock["mapping"] = t
        mappings = len(self._smooth_activation_stats)
        swaps = Patches()  # undone when the layer's smoothing ends
        if options.routed_experts_in_search:
            swaps.set(moe_context, "_CALIBRATE_ALL_EXPERTS", False)
        run.routed = options.routed_experts_in_search
        run.smoothing = True
        # compressed-tensors' offload wrapper calls the forward it captured at load time
        # (`_original_forward_func`), so the class-level patch alone does not reach it.
        if options.batched_experts:
            for m in model.modules():
                if isinstance(m, LinearExperts2D) and m.__dict__.get("_original_forward_func") is stock_experts_forward:
                    swaps.set(m, "_original_forward_func", experts_forward)
        batched: list[Any] = []
        held: dict[str, Any] = {}
        if options.batched_expert_search:
            for m in self._resolved_mappings:
                cache = self._parent_args_cache.get(m.parent)
                if (
                    m.smooth_name in self._smooth_activation_stats
                    and isinstance(cache, (SampledCache, GramCache))
                    and len(m.balance_layers) == 1
                    and m.balance_layers[0] is m.parent
                    and len(cache) == 1
                ):
                    batched.append(m)
            # stock's loop skips what it has no statistics for
            held = {m.smooth_name: self._smooth_activation_stats.pop(m.smooth_name) for m in batched}
        try:
            saved["_apply_smoothing"](self, model)
            if batched:
                t_search = time.perf_counter()
                with awq_base.calibration_forward_context(model):
                    done = _batched_expert_search(
                        self, batched, held, awq_base._allreduce_data_sum, stats, options.record_scales
                    )
                if not done:
                    self._smooth_activation_stats.update(held)
                    saved["_apply_smoothing"](self, model)
                stats.mapping_s["routed_expert_down"] = (
                    stats.mapping_s.get("routed_expert_down", 0.0) + time.perf_counter() - t_search
                )
            if shared_fix is not None:
                import torch.distributed as dist

                shared_fix.flush()
                dist.barrier()  # every rank's last write lands before the layer's outputs propagate
            if write_back is not None:
                t_write, checking = time.perf_counter(), write_back.check_seconds
                write_back.flush()  # the layer's smoothed weights, to the CPU offload once
                excluded = write_back.check_seconds - checking
                stats.mapping_s["write_back"] = (
                    stats.mapping_s.get("write_back", 0.0) + time.perf_counter() - t_write - excluded
                )
        finally:
            swaps.undo()
            run.routed = run.smoothing = False
            run.stacked = {}
            if write_back is not None:
                write_back.dirty.clear()  # flushed above; a failed smoothing leaves the CPU copies as they were
            if deduplicating:
                release_host_memory()
            end = time.perf_counter()
            gpu = reserved = 0.0
            if torch.cuda.is_available():
                gpu = torch.cuda.max_memory_allocated() / 2**30
                reserved = torch.cuda.max_memory_reserved() / 2**30
                torch.cuda.reset_peak_memory_stats()
            if mappings:
                stats.layers.append(
                    LayerRecord(
                        mappings,
                        round(t - clock["last"], 3),
                        round(end - t - excluded, 3),
                        round(gpu, 3),
                        round(host.take(), 3),
                        round(_pinned_peak_gib(), 3),
                        round(reserved, 3),
                    )
                )
            clock["last"] = end

    class SampledCache(IntermediatesCache):
        """An expert down_proj's cached inputs: at most `budget` rows over all batches, kept as
        ONE batch. Stock keeps N batches, so each of the 21 grid points runs N small forwards
        (each an onload from host memory); one batch makes that 21 forwards per expert
        whatever N is. The loss is the same sum of squared errors over the same rows,
        summed in a different order."""

        def __init__(self, offload_device: Any, budget: int, salt: int) -> None:
            super().__init__(None, offload_device)
            # the budget is for the whole run: under data parallelism each rank keeps its share
            # (the grid-search loss is all-reduced over the ranks' rows)
            self.per_batch = max(1, math.ceil(budget / max(1, num_batches * _ranks())))
            self.salt = salt
            self.appended = 0
            self.pending: list[Any] = []
            self.resident: list[dict[str, Any]] | None = None
            self.device: Any = None  # where the rows were computed: the grid search runs there
            self.held = ledger.holder(self)  # patch 9: bytes of rows kept on that device

        def append(self, values: dict[str, Any]) -> None:
            x = values.get("input")
            if set(values) != {"input"} or not isinstance(x, torch.Tensor) or x.dim() < 2:
                super().append(values)
                return
            rows = x.numel() // x.shape[-1]
            self.device = x.device
            stats.tokens_seen += rows
            x = _subsample_rows(x, self.per_batch, self.salt + self.appended).reshape(-1, x.shape[-1])
            stats.tokens_kept += x.shape[0]
            self.appended += 1
            if self.offload_device is None:
                self.pending.append(x.clone())
            elif deduplicating and ledger.take(x.nbytes, self.held):
                self.pending.append(x.clone())  # patch 9: stays on the GPU (no copy to host and back)
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
                stats.resident_expert_caches += 1
                return
            if self.held[0]:  # the budget ran out part way: all rows to the offload device, as stock
                ledger.give(self.held[0], self.held)
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
            if not (options.search_batch_tokens and run.smoothing and input_names is None):
                return super().iter(input_names)
            # the grid search reads these rows 22 times: onload them once (patch 7); the
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
            return self.iter(input_names) if options.search_batch_tokens else super().iter_prefetch(input_names)

        def pin_memory(self, batch_index: int, input_names: Any = None) -> None:
            if not options.search_batch_tokens:  # else onloaded once: pinning would cost more
                super().pin_memory(batch_index, input_names)

    class GramCache(IntermediatesCache):
        """Patch 10: an expert down_proj's cached inputs, kept as the fp32 sum of X^T X over every
        calibration token (and the token count), on the device they were computed on. It holds
        no rows: the batched search (patches 8 and 10) reads `gram` and `rows`."""

        def __init__(self, offload_device: Any) -> None:
            super().__init__(None, offload_device)
            self.gram: Any = None
            self.rows = 0

        def append(self, values: dict[str, Any]) -> None:
            x = values.get("input")
            if set(values) != {"input"} or not isinstance(x, torch.Tensor) or x.dim() < 2:
                raise RuntimeError(
                    "glmrel's Gram expert search expects a Linear's single input; set awq.expert_search: sampled"
                )
            state = awq_base.active_session().state
            if state is not None and getattr(state, "loss_masks", None):
                raise RuntimeError(
                    "glmrel's Gram expert search does not support loss masks; set awq.expert_search: sampled "
                    "and awq.max_expert_tokens: null"
                )
            flat = x.reshape(-1, x.shape[-1])
            g = _gram(flat)
            if self.gram is None:
                self.gram = g
                grams.take(g.nbytes, grams.holder(self))
            else:
                self.gram += g
            self.rows += flat.shape[0]
            stats.tokens_seen += flat.shape[0]
            stats.tokens_kept += flat.shape[0]

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
        """Patch 9: a parent's cached inputs stay on the device they were computed on while the
        run's budget lasts, the rest go to the offload device (stock); inputs equal to the
        previous sample's are stored once."""

        def __init__(self, offload_device: Any) -> None:
            super().__init__(None, offload_device)
            self.held = ledger.holder(self)

        def update(self, batch_index: int, values: dict[str, Any]) -> None:
            nbytes = sum(v.nbytes for v in tree_leaves(values) if isinstance(v, torch.Tensor))
            resident = self.offload_device is not None and ledger.take(nbytes, self.held)
            if resident:
                # copied: a resident cache must not share memory with anything the model may
                # later change in place
                copy = tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, values)
                with patch_attr(self, "offload_device", None):
                    stock_update(self, batch_index, copy)
                stats.resident_batches += 1
            else:
                stock_update(self, batch_index, values)
                stats.offloaded_batches += 1
            count, saved_bytes = _deduplicate_batch(self, batch_index)
            stats.deduplicated_values += count
            if resident:
                ledger.give(saved_bytes, self.held)

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

    def update(self: Any, batch_index: int, values: dict[str, Any]) -> None:
        """Every other cache (the pipeline's layer inputs among them): stock, then patch 9's
        deduplication."""
        stock_update(self, batch_index, values)
        stats.deduplicated_values += _deduplicate_batch(self, batch_index)[0]

    def _setup_activation_cache_hooks(self: Any) -> None:
        saved["_setup_activation_cache_hooks"](self)
        for i, mapping in enumerate(self._resolved_mappings):
            parent = mapping.parent
            old = self._parent_args_cache[parent]
            if type(old) is not IntermediatesCache or old.batch_intermediates:
                continue  # already replaced (a parent shared by several mappings) or in use
            # An expert's up->down mapping: the parent is the down_proj Linear itself.
            expert = isinstance(parent, torch.nn.Linear) and ".experts." in mapping.parent_name
            if expert and options.expert_search == "gram":
                self._parent_args_cache[parent] = GramCache(old.offload_device)
            elif expert and options.sampled_expert_rows is not None:
                self._parent_args_cache[parent] = SampledCache(old.offload_device, options.sampled_expert_rows, i)
                stats.sampled_caches += 1
            elif deduplicating:
                self._parent_args_cache[parent] = ResidentCache(old.offload_device)

    stock_experts_forward = LinearExperts2D.forward
    stock_forward_context = awq_base.calibration_forward_context
    stock_allreduce = awq_base._allreduce_data_sum

    def timed_allreduce(data: list[Any]) -> list[Any]:
        """Stock's all-reduce, timed from when this rank's GPU work is done: the time this rank
        waits for the others (and the transfer) at AWQ's statistics and grid-search losses."""
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = stock_allreduce(data)
        torch.cuda.synchronize()
        stats.allreduce_wait_s += time.perf_counter() - t
        return out

    @contextlib.contextmanager
    def search_forward_context(model: Any) -> Iterator[None]:
        """Stock's calibration context (which forces eager attention), then SDPA (patch 6)."""
        with stock_forward_context(model):
            if run.smoothing and getattr(getattr(model, "config", None), "_attn_implementation", None) == "eager":
                with patch_attr(model.config, "_attn_implementation", "sdpa"):
                    yield
            else:
                yield

    def experts_forward(self: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
        if not (run.routed and options.batched_experts and stats.batched_experts_disabled is None):
            return stock_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        if not self.has_gate or not _batchable(self):
            return stock_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        out = _grouped_experts_forward(self, hidden_states, top_k_index, top_k_weights, run=run)
        if id(self) not in run.checked:  # first call for this layer: compare with the loop
            run.checked.add(id(self))
            ref = stock_experts_forward(self, hidden_states, top_k_index, top_k_weights)
            err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
            if not err < 2e-2:
                stats.batched_experts_disabled = f"relative difference {err:.3g} against the loop"
                return ref
        stats.batched_expert_calls += 1
        return out

    methods: dict[str, Callable[..., Any]] = {"_run_samples": _run_samples, "_apply_smoothing": _apply_smoothing}
    methods["_compute_best_scale"] = _compute_best_scale  # also times each mapping
    if options.sampled_expert_rows is not None or options.expert_search == "gram" or deduplicating:
        methods["_setup_activation_cache_hooks"] = _setup_activation_cache_hooks
    if not options.keep_first_output and not options.stream_loss:
        methods.pop("_run_samples")
    host = _HostPeak()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run.checked = set()
    patches = Patches()
    try:
        for name, fn in methods.items():
            patches.set(cls, name, fn)
        if deduplicating:
            patches.set(IntermediatesCache, "update", update)
        if options.batched_experts:
            patches.set(LinearExperts2D, "forward", experts_forward)
        if options.sdpa_in_search:
            patches.set(awq_base, "calibration_forward_context", search_forward_context)
        if write_back is not None:
            patches.set(awq_base, "update_offload_parameter", update_offload_parameter)
        if cpu_ranks:
            # ranks on CPU (the test of the data-parallel path): stock moves the sums to the
            # accelerator before all-reducing them, and there is none; gloo sums CPU tensors
            patches.set(awq_base, "_allreduce_data_sum", _cpu_allreduce_sum)
        elif awq_base.is_distributed() and torch.cuda.is_available():
            patches.set(awq_base, "_allreduce_data_sum", timed_allreduce)
        clock["last"] = time.perf_counter()
        yield stats
    finally:
        patches.undo()
        run.lazy = False
        run.routed = run.smoothing = False
        run.stacked = {}
        host.stop()
        stats.resident_peak_gib = ledger.peak / 2**30
        stats.gram_gib = grams.peak / 2**30
        if write_back is not None:
            stats.deferred_writes = write_back.deferred
            stats.written_back_gib = write_back.bytes / 2**30
            stats.write_back_s = write_back.seconds
            stats.write_back_checked, stats.write_back_mismatches = write_back.checked, write_back.mismatches
            write_back.stages = []
