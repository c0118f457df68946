"""`MoeAWQModifier`: llm-compressor's AWQModifier with glmrel's engine, as a subclass.

`Engine.recipe` puts one in place of each AWQModifier of a rendered recipe, bound to the run's
`Engine`, and `oneshot` runs it as it would run stock's. Its four overrides are the engine's
changes to AWQ's own steps (the package docstring numbers them); with the matching option off
each one is stock's method. Unbound (no engine) it is stock AWQ. What AWQ cannot be told by a
subclass (the library's cache update, the experts' forward, the calibration context, the
offload write, the all-reduce) `scaled_awq` patches for the run and undoes.
"""

from __future__ import annotations

import time
from typing import Any

from llmcompressor.modifiers.transform.awq import base as awq_base
from llmcompressor.modifiers.transform.awq.base import AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from pydantic import Field

from .activations import register_calibration_hooks, sums_to_host
from .balance import balance_groups, batched_balance_search
from .caches import cache_classes
from .causal import causal_sdpa
from .experts import search_routed_experts
from .hooks import Patches
from .merge import TOKEN_WISE_PARENTS, merged_batches
from .side import SideRun, SideTimes, layer_key, touched_modules
from .state import first
from .stats import LayerRecord, LayerTiming, mapping_kind, pinned_peak_gib, release_host_memory


class MoeAWQModifier(AWQModifier):
    # the run's Engine (engine.py) and its side branches (side.py), given by `bound`; neither is
    # part of the recipe (not serialized)
    engine: Any = Field(default=None, exclude=True, repr=False)
    side_run: SideRun | None = Field(default=None, exclude=True, repr=False)

    @classmethod
    def bound(cls, stock: AWQModifier, engine: Any, side_run: SideRun | None = None) -> MoeAWQModifier:
        """This class with `stock`'s settings (those the recipe set), for `engine`'s run, which
        also smooths each layer for `side_run`'s branches."""
        return cls.model_validate({**stock.model_dump(exclude_unset=True), "engine": engine, "side_run": side_run})

    def layer_state(self) -> tuple[dict[Any, Any], dict[Any, Any]]:
        """AWQ's per-layer statistics and input caches as they are (a side run puts them back)."""
        return dict(self._smooth_activation_stats), dict(self._parent_args_cache)

    def restore_layer_state(self, state: tuple[dict[Any, Any], dict[Any, Any]]) -> None:
        stats, caches = state
        self._smooth_activation_stats.clear()
        self._smooth_activation_stats.update(stats)
        self._parent_args_cache.clear()
        self._parent_args_cache.update(caches)

    def _run_samples(self, module: Any) -> Any:
        e = self.engine
        if e is None or not (e.options.keep_first_output or e.options.stream_loss):
            return super()._run_samples(module)
        options, run = e.options, e.run
        run.generation += 1  # balance weights change only between _run_samples calls
        cache = self._parent_args_cache[module]
        state = awq_base.active_session().state
        batches: Any = cache.iter_prefetch() if state.sequential_prefetch else cache
        kind = type(module).__name__
        token_wise = kind in TOKEN_WISE_PARENTS
        if options.reuse_routing and run.smoothing:
            run.routing.start(module)  # routing.py: this pass over the cache is matched call by call
        if (
            options.causal_search_attention
            and run.smoothing
            and not token_wise
            and causal_sdpa(module)
            and awq_base.get_execution_device(module).type in options.fused_expert_devices
        ):
            batches = run.causal_masks.dropped_from(batches, e.stats)  # causal.py
        if options.search_batch_tokens and run.smoothing and not getattr(state, "loss_masks", None):
            if token_wise or options.sdpa_in_search:
                batches = merged_batches(
                    batches, token_wise, options.search_batch_tokens, e.stats.merged_forwards, kind
                )
        outputs = (first(module(**batch)) for batch in batches)  # first output only: element 0 as each batch ends
        if options.stream_loss and run.lazy:
            return outputs  # streamed loss: consumed one batch at a time by _compute_loss
        return list(outputs)

    def _get_grid_search_params(self) -> Any:
        grid = super()._get_grid_search_params()
        return grid if self.engine is None else self.engine.run.grid.points(grid)  # grid.py

    def _compute_loss(self, fp16_outputs: Any, int_w_outputs: Any) -> float:
        loss = super()._compute_loss(fp16_outputs, int_w_outputs)
        if self.engine is not None:
            self.engine.run.grid.loss(loss)
        return loss

    def _compute_best_scale(self, mapping: Any, fp16_outputs: Any, orig_layer_weights: Any) -> Any:
        e = self.engine
        if e is None:
            return super()._compute_best_scale(mapping, fp16_outputs, orig_layer_weights)
        options, stats, run, clock = e.options, e.stats, e.run, e.clock
        side = run.grid.branch is not None  # a side branch's search (side.py): the propagating branch's records stay
        run.grid.begin(mapping.smooth_name)
        sampled, gram, _resident = cache_classes()
        if e.deduplicating and not isinstance(self._parent_args_cache.get(mapping.parent), (sampled, gram)):
            release_host_memory()  # what earlier mappings pinned and freed
        run.lazy = options.stream_loss
        if e.shared_fix is not None:
            e.shared_fix.before(mapping)
        try:
            groups = balance_groups(mapping.balance_layers) if options.batched_balance_layers else None
            if groups:  # batched balance layers
                phases = stats.search_phase_s.setdefault(mapping_kind(mapping.smooth_name), {})
                phases["prepare"] = phases.get("prepare", 0.0) + time.perf_counter() - clock["mapping"]
                losses: list[float] = []
                best = batched_balance_search(self, mapping, fp16_outputs, orig_layer_weights, groups, phases, losses)
                if not side:
                    stats.grid_losses[mapping.smooth_name] = losses
                stats.batched_balance_mappings += 1
                stats.batched_balance_layers += sum(len(g) for g in groups)
            else:
                best = super()._compute_best_scale(mapping, fp16_outputs, orig_layer_weights)
            if e.shared_fix is not None:
                e.shared_fix.chosen(best)
        finally:
            run.grid.end()
            run.lazy = False
            run.routing.forget()  # smoothing changes the router's weight next
            # from the end of the previous mapping's search: its smoothing, this one's setup,
            # reference forward and grid search
            now = time.perf_counter()
            kind = mapping_kind(mapping.smooth_name)
            stats.mapping_s[kind] = stats.mapping_s.get(kind, 0.0) + now - clock["mapping"]
            clock["mapping"] = now
        if options.record_scales and not side:
            stats.scales[mapping.smooth_name] = best.detach().float().cpu().clone()
        return best

    def on_calibration_start(self, state: Any, event: Any, **kwargs: Any) -> Any:
        started = super().on_calibration_start(state, event, **kwargs)
        if self.engine is not None:
            self.engine.route_experts(state.model)
        return started

    def _apply_smoothing(self, model: Any) -> None:
        e = self.engine
        if e is None:
            return super()._apply_smoothing(model)
        sums_to_host(self)  # where the smoothing (stock's and the side runs') reads them
        e.run.calibration_stack = None  # the weights change now; the memory is the search's
        try:
            self._apply_smoothing_engine(model)
        finally:
            e.run.calibration_stack = None

    def _apply_smoothing_engine(self, model: Any) -> None:
        mappings = [m for m in self._resolved_mappings if m.smooth_name in self._smooth_activation_stats]
        key = layer_key(touched_modules(mappings)) if mappings else None
        if key is not None and self.engine.read_ahead is not None:  # the next layer's offloaded weights, meanwhile
            self.engine.read_ahead.after(model, key)
        if self.side_run is None or not mappings:
            self._record_layer(self._smooth_layer(model))
        else:
            # the branch whose outputs propagate first, then the side branches from the layer's
            # originals (side.py), each searching near the propagating branch's choices (grid.py)
            timing: list[LayerTiming] = []
            side = self.side_run.smooth_layer(
                self,
                model,
                mappings,
                lambda: timing.append(self._smooth_layer(model)),
                lambda: self._smooth_layer(model, record=False),
            )
            if timing:
                self._record_layer(timing[0], side)
        if (
            key is not None and self.engine.onload_ahead is not None
        ):  # the next layer's weights, while this one propagates
            self.engine.onload_ahead.after(model, key)

    def _smooth_layer(self, model: Any, *, record: bool = True) -> LayerTiming:
        """The engine's smoothing of one layer (stock's loop with routed experts in the search,
        batched experts, the batched and Gram expert searches, deferred write-back), timed for
        its LayerRecord unless it is a side branch's run (`record=False`)."""
        e = self.engine
        options, stats, run, clock, write_back = e.options, e.stats, e.run, e.clock, e.write_back
        t = time.perf_counter()
        excluded = 0.0  # the benchmark's write-back check is not the layer's time
        clock["mapping"] = t
        mappings = len(self._smooth_activation_stats)
        swaps = Patches()  # undone when the layer's smoothing ends
        if options.routed_experts_in_search:  # routed experts in the search
            swaps.hook("calibrate_all_experts", False)
        run.routed = options.routed_experts_in_search
        run.smoothing = True
        batched: list[Any] = []
        held: dict[str, Any] = {}
        if options.batched_expert_search:  # the batched expert search and the Gram search
            sampled, gram, _resident = cache_classes()
            for m in self._resolved_mappings:
                cache = self._parent_args_cache.get(m.parent)
                if (
                    m.smooth_name in self._smooth_activation_stats
                    and isinstance(cache, (sampled, gram))
                    and len(m.balance_layers) == 1
                    and m.balance_layers[0] is m.parent
                    and len(cache) == 1
                ):
                    batched.append(m)
            # stock's loop skips what it has no statistics for
            held = {m.smooth_name: self._smooth_activation_stats.pop(m.smooth_name) for m in batched}
        try:
            super()._apply_smoothing(model)
            if batched:
                t_search = time.perf_counter()
                with awq_base.calibration_forward_context(model):
                    done = search_routed_experts(
                        self,
                        batched,
                        held,
                        awq_base._allreduce_data_sum,
                        stats,
                        options.record_scales and run.grid.branch is None,
                    )
                if not done:
                    self._smooth_activation_stats.update(held)
                    super()._apply_smoothing(model)
                stats.mapping_s["routed_expert_down"] = (
                    stats.mapping_s.get("routed_expert_down", 0.0) + time.perf_counter() - t_search
                )
            if e.shared_fix is not None:  # a side run's too: its last mapping is read and then put back
                import torch.distributed as dist

                e.shared_fix.flush()
                dist.barrier()  # every rank's last write lands before the layer's outputs propagate
            if write_back is not None and record:  # deferred write-back (a side run writes no offload)
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
            run.routing.forget()
            if write_back is not None:
                write_back.dirty.clear()  # flushed above; a failed smoothing leaves the CPU copies as they were
            if e.deduplicating:
                release_host_memory()
        return LayerTiming(mappings, t, time.perf_counter() - t - excluded)

    def _record_layer(self, timing: LayerTiming, side: SideTimes | None = None) -> None:
        """The layer's LayerRecord: its calibration forward (from the previous layer's end to
        the start of its smoothing), the propagating branch's smoothing, the side branches'
        runs, and the peaks over all of it."""
        import torch

        e = self.engine
        stats, clock = e.stats, e.clock
        end = time.perf_counter()
        gpu = reserved = 0.0
        if torch.cuda.is_available():
            gpu = torch.cuda.max_memory_allocated() / 2**30
            reserved = torch.cuda.max_memory_reserved() / 2**30
            torch.cuda.reset_peak_memory_stats()
        if timing.mappings:
            stats.layers.append(
                LayerRecord(
                    timing.mappings,
                    round(timing.started - clock["last"], 3),
                    round(timing.seconds, 3),
                    round(gpu, 3),
                    round(e.host.take(), 3),
                    round(pinned_peak_gib(), 3),
                    round(reserved, 3),
                    side_s=round(side.seconds, 3) if side is not None else 0.0,
                    side_stored_gib=round(side.stored_bytes / 2**30, 6) if side is not None else 0.0,
                )
            )
            if e.on_layer is not None:
                e.on_layer(stats.layers[-1])
        clock["last"] = end

    def _setup_activation_cache_hooks(self) -> None:
        e = self.engine
        if e is not None and e.options.device_activation_sums:
            register_calibration_hooks(self)
        else:
            super()._setup_activation_cache_hooks()
        if e is None or not (
            e.options.sampled_expert_rows is not None or e.options.expert_search == "gram" or e.deduplicating
        ):
            return
        import torch

        options = e.options
        sampled, gram, resident = cache_classes()
        for i, mapping in enumerate(self._resolved_mappings):
            parent = mapping.parent
            old = self._parent_args_cache[parent]
            if type(old) is not IntermediatesCache or old.batch_intermediates:
                continue  # already replaced (a parent shared by several mappings) or in use
            # An expert's up->down mapping: the parent is the down_proj Linear itself.
            expert = isinstance(parent, torch.nn.Linear) and ".experts." in mapping.parent_name
            if expert and options.expert_search == "gram":
                self._parent_args_cache[parent] = gram(e, old.offload_device)
            elif expert and options.sampled_expert_rows is not None:
                self._parent_args_cache[parent] = sampled(e, old.offload_device, options.sampled_expert_rows, i)
                e.stats.sampled_caches += 1
            elif e.deduplicating:
                self._parent_args_cache[parent] = resident(e, old.offload_device)
