"""One run of the engine: `scaled_awq` makes the run's `Engine`, patches for the run what a
subclass of AWQModifier cannot reach, and undoes it after; `Engine.recipe` binds the run's
`MoeAWQModifier` (modifier.py) into the recipe `oneshot` runs. The design and each patch are
described in the package's docstring."""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from .all_experts import all_experts_forward, fusable, hooks_silent
from .caches import Ledger, WriteBack, resident_budget
from .causal import calibration_attention
from .dedup import deduplicate_batch
from .experts import batchable, grouped_experts_forward, grouped_gemm_works
from .hooks import HOOKS, Patches
from .kernels import TORCH_OPS, Kernels
from .options import TARGET_VERSION, ScaleOptions
from .ranks import SharedSmoothFix, cpu_allreduce_sum
from .read_ahead import OnloadAhead, ReadAhead, patch_onloads, stock_onload
from .rope import RopeKernel
from .side import SideBranch, SideRun
from .state import RunState
from .stats import HostPeak, ScaleStats


class Engine:
    """One `oneshot` call's engine: its options, what it records (`stats`), the state its
    patches share (`run`), and the GPU budgets and write-back its caches use."""

    def __init__(
        self,
        options: ScaleOptions,
        num_batches: int,
        side: tuple[SideBranch, ...] = (),
        on_layer: Callable[[Any], None] | None = None,
    ) -> None:
        import torch
        from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
        from llmcompressor.modifiers.transform.awq import base as awq_base
        from llmcompressor.pipelines.cache import IntermediatesCache

        self.options = options
        self.num_batches = num_batches
        self.stats = ScaleStats()
        self.on_layer = on_layer  # called with each decoder layer's record as the layer is done (progress)
        self.run = RunState()
        self.run.grid.window = options.side_grid_window if side else None
        self.deduplicating = options.resident_cache_gib != 0  # resident caches
        self.ledger = Ledger(resident_budget(options.resident_cache_gib) if self.deduplicating else 0)
        self.grams = Ledger(math.inf)  # the Gram search's Gram matrices
        # deduplicate_batch: per stock cache (the pipeline's), the keys whose values differ by sample
        self._unequal: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        self.gram_by_gemm: bool | None = None  # caches.py: the batched hooks' Gram sums added by the GEMM (tried once)
        self.write_back = WriteBack(check=options.check_write_back) if options.deferred_write_back else None
        self.clock = {"last": time.perf_counter(), "mapping": time.perf_counter()}
        # ranks on CPU (the test of the data-parallel path) share their weights' memory
        self.cpu_ranks = torch.accelerator.current_accelerator() is None and awq_base.is_distributed()
        self.shared_fix = SharedSmoothFix() if self.cpu_ranks else None
        # branches calibrated by this run's pass (side.py); under data parallelism rank 0 stores them
        self.side_run = None
        if side:
            rank = torch.distributed.get_rank() if awq_base.is_distributed() else 0
            self.side_run = SideRun(side, rank, shared_weights=self.cpu_ranks)
        self.host = HostPeak()
        # the library's own functions, which the patches call
        self.stock_update = IntermediatesCache.update
        self.stock_experts_forward = LinearExperts2D.forward
        self.model_patches = Patches()  # route_experts: the model's experts modules, for the run
        self.grouped_gemm: dict[str, bool] = {}  # device -> torch's grouped GEMM works there
        self.kernels: dict[str, Kernels] = {}  # device -> the kernels (kernels.py) that work there
        self.read_ahead = ReadAhead() if options.read_ahead else None  # read_ahead.py: offloaded weights
        # ... and the next layer's onloaded by a helper thread (the run patches the onloads to ask it)
        self.onload_ahead = (
            OnloadAhead(stock_onload(), options.onload_ahead, pinned=options.onload_ahead_pinned)
            if options.onload_ahead
            else None
        )

    def unequal_keys(self, cache: Any) -> set[str]:
        """deduplicate_batch's set, for a stock cache, of the keys whose values differ by sample:
        kept here for the run (weakly: it ends with the cache), not on llm-compressor's object."""
        return self._unequal.setdefault(cache, set())

    def recipe(self, recipe_text: str) -> Any:
        """The rendered recipe as llm-compressor reads it, each AWQModifier replaced by this
        run's MoeAWQModifier with the same settings (the branch keeps the text as rendered)."""
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.recipe import Recipe

        from .modifier import MoeAWQModifier

        recipe = Recipe.create_instance(recipe_text)
        recipe.modifiers = [
            MoeAWQModifier.bound(m, self, self.side_run) if type(m) is AWQModifier else m for m in recipe.modifiers
        ]
        return recipe

    def route_experts(self, model: Any) -> None:
        """Point each experts module of `model` at the class's forward, the run's patched one,
        for the whole run (undone by `close`): compressed-tensors' offload wrapper calls the
        forward it captured at load time (`_original_forward_func`), which a patch of the class
        does not reach."""
        from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

        for m in model.modules():
            if (
                isinstance(m, LinearExperts2D)
                and m.__dict__.get("_original_forward_func") is self.stock_experts_forward
            ):
                self.model_patches.set(m, "_original_forward_func", LinearExperts2D.forward)

    def close(self) -> None:
        """The run's totals into `stats`; the helper threads and staging buffers released (the
        side branches' last store write finished: it raises here if it failed)."""
        self.model_patches.undo()
        self.run.calibration_stack = None
        self.run.lazy = self.run.routed = self.run.smoothing = False
        self.run.stacked = {}
        self.host.stop()
        self.stats.resident_peak_gib = self.ledger.peak / 2**30
        self.stats.gram_gib = self.grams.peak / 2**30
        self.stats.routing_reused, self.stats.routing_reuse_disabled = (
            self.run.routing.reused,
            self.run.routing.disabled,
        )
        wb = self.write_back
        if wb is not None:
            self.stats.deferred_writes = wb.deferred
            self.stats.written_back_gib = wb.bytes / 2**30
            self.stats.write_back_s = wb.seconds
            self.stats.write_back_checked, self.stats.write_back_mismatches = wb.checked, wb.mismatches
            self.stats.disk_writes_deferred, self.stats.disk_writes = wb.disk_deferred, wb.disk_written
            wb.stages = []
        if self.read_ahead is not None:
            ahead, self.read_ahead = self.read_ahead, None
            ahead.close()
            self.stats.read_ahead_layers, self.stats.read_ahead_gib = ahead.layers, ahead.advised_bytes / 2**30
        if self.onload_ahead is not None:
            onload, self.onload_ahead = self.onload_ahead, None
            onload.close()
            self.stats.onload_ahead = onload.counts()
        if self.side_run is not None:
            self.stats.grid = self.run.grid.to_json()  # grid.py: what the side branches searched
            side, self.side_run = self.side_run, None
            try:
                side.close()
            finally:
                self.stats.side_store_wait_s = side.writer.waited_s


@contextlib.contextmanager
def scaled_awq(
    options: ScaleOptions,
    num_batches: int,
    side: tuple[SideBranch, ...] = (),
    on_layer: Callable[[Any], None] | None = None,
) -> Iterator[Engine]:
    """One run of the engine: pass `engine.recipe(text)` to `oneshot` inside it; `engine.stats`
    holds what the run recorded. `side`: other group sizes this pass also smooths, each
    layer's result written to the branch's store (side.py). Refuses any llm-compressor but the
    one the patches were written against."""
    import llmcompressor
    import torch
    from compressed_tensors.utils import patch_attr
    from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag
    from llmcompressor.modifiers.transform.awq import base as awq_base

    if llmcompressor.__version__ != TARGET_VERSION:
        raise RuntimeError(
            f"glmrel's AWQ patches target llmcompressor {TARGET_VERSION}, found {llmcompressor.__version__}; "
            "re-read llmcompressor/modifiers/transform/awq/base.py and update release/awq/"
        )
    engine = Engine(options, num_batches, side, on_layer)
    stats, run, write_back = engine.stats, engine.run, engine.write_back
    stock_write = awq_base.update_offload_parameter
    stock_forward_context = awq_base.calibration_forward_context
    stock_allreduce = awq_base._allreduce_data_sum
    stock_experts_forward = engine.stock_experts_forward

    def update_offload_parameter(module: Any, name: str, data: Any) -> None:
        """Deferred write-back: inside the smoothing step a write lands on the onloaded copy
        only, and the CPU offload is written once a layer (`WriteBack.flush`)."""
        if not (write_back is not None and run.smoothing and write_back.defer(module, name, data)):
            stock_write(module, name, data)

    def update(self: Any, batch_index: int, values: dict[str, Any]) -> None:
        """Resident caches, every cache the engine does not replace (the pipeline's layer inputs among
        them): stock, then values equal to the previous sample's stored once."""
        engine.stock_update(self, batch_index, values)
        stats.deduplicated_values += deduplicate_batch(self, batch_index, engine.unequal_keys(self))[0]

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
        """Stock's calibration context (which forces eager attention), then SDPA (SDPA in the search)."""
        with stock_forward_context(model):
            if run.smoothing and getattr(getattr(model, "config", None), "_attn_implementation", None) == "eager":
                with patch_attr(model.config, "_attn_implementation", "sdpa"):
                    yield
            else:
                yield

    def grouped_gemm(like: Any) -> bool:
        """Whether torch's grouped GEMM works on `like`'s device (tried once per device and run)."""
        where = str(like.device)
        if where not in engine.grouped_gemm:
            engine.grouped_gemm[where] = grouped_gemm_works(like)
        return engine.grouped_gemm[where]

    def kernels(like: Any) -> Kernels:
        """The kernels (kernels.py) that work on `like`'s device, on the devices whose experts
        run fused (tried once per device and run)."""
        if not options.triton_kernels or like.device.type not in options.fused_expert_devices:
            return TORCH_OPS
        where = str(like.device)
        if where not in engine.kernels:
            engine.kernels[where] = Kernels.on(like)
            stats.gpu_kernels[where] = vars(engine.kernels[where]).copy()
        return engine.kernels[where]

    def experts_forward(self: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
        """Outside the smoothing step, with every expert calibrated on every token: the
        experts as batched products (all_experts.py), or on their routed tokens where no hook
        listens (the propagation pass). Inside it (batched experts): the routed experts as batched (or
        grouped) matmuls."""
        fused = hidden_states.device.type in options.fused_expert_devices
        if not run.routed:
            if (
                fused
                and get_calibrate_all_experts_flag()
                and fusable(self, hidden_states, options.fused_expert_devices)
            ):
                if hooks_silent(self):  # the propagation pass: the routed tokens make the output
                    run.calibration_stack = None
                    stats.routed_propagation_calls += 1
                    return grouped_experts_forward(
                        self,
                        hidden_states,
                        top_k_index,
                        top_k_weights,
                        run=run,
                        grouped=grouped_gemm(hidden_states),
                        kernels=kernels(hidden_states),
                    )
                stats.fused_calibration_calls += 1
                return all_experts_forward(
                    self,
                    hidden_states,
                    top_k_index,
                    top_k_weights,
                    run,
                    options.batched_expert_hooks,
                    stats,
                    grouped_gemm(hidden_states),
                    kernels(hidden_states),
                    sync_free=options.sync_free_routing,
                )
            return stock_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        if not (options.batched_experts and stats.batched_experts_disabled is None):
            return stock_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        if not self.has_gate or not batchable(self):
            return stock_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        grouped = fused and grouped_gemm(hidden_states)
        used = kernels(hidden_states) if fused else TORCH_OPS
        out = grouped_experts_forward(
            self, hidden_states, top_k_index, top_k_weights, run=run, grouped=grouped, kernels=used
        )
        if id(self) not in run.checked:  # first call for this layer: compare with the loop
            run.checked.add(id(self))
            ref = stock_experts_forward(self, hidden_states, top_k_index, top_k_weights)
            err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
            if not err < 2e-2:
                stats.batched_experts_disabled = f"relative difference {err:.3g} against the loop"
                return ref
        stats.batched_expert_calls += 1
        stats.grouped_search_calls += grouped
        stats.fused_sum_calls += used.weighted_sum
        return out

    owner, name = HOOKS["router_forward"].owner_and_name()
    stock_router: Callable[[Any, Any], Any] = getattr(owner, name)

    def router_forward(self: Any, hidden_states: Any) -> Any:
        """Routing reuse in the search (routing.py): outside a MoE block's search, stock's."""
        if not run.smoothing:
            return stock_router(self, hidden_states)
        return run.routing.route(self, hidden_states, stock_router)

    def no_pin(self: Any, batch_index: int, input_names: Any = None) -> None:
        """Without an accelerator: AWQ's smoothing pins cached inputs, and `tensor.pin_memory()`
        raises on CPU-only torch ("Cannot access accelerator device when none is available").
        Pinning only speeds copies to a device, so with none it is nothing to do."""
        return None

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    patches = Patches()
    try:
        if not torch.accelerator.is_available():
            patches.hook("cache_pin", no_pin)
        if engine.deduplicating:
            patches.hook("cache_update", update)
        if options.batched_experts or options.fused_expert_devices:
            patches.hook("experts_forward", experts_forward)
        if options.sdpa_in_search:
            patches.hook("forward_context", search_forward_context)
        if options.reuse_routing:
            patches.hook("router_forward", router_forward)
        if options.triton_kernels and options.fused_rope:  # CPU tensors take transformers' function
            stock_rope = getattr(*HOOKS["rotary_embedding"].owner_and_name())
            patches.hook("rotary_embedding", RopeKernel(stock_rope, stats))
        if options.causal_calibration_attention:
            eager = getattr(*HOOKS["calibration_attention"].owner_and_name())
            patches.hook("calibration_attention", calibration_attention(eager, run.causal_masks, stats))
        if write_back is not None:
            patches.hook("offload_write", update_offload_parameter)
        if engine.onload_ahead is not None:
            patch_onloads(patches, lambda: engine.onload_ahead)
        if engine.cpu_ranks:
            patches.hook("allreduce", cpu_allreduce_sum)
        elif awq_base.is_distributed() and torch.cuda.is_available():
            patches.hook("allreduce", timed_allreduce)
        engine.clock["last"] = time.perf_counter()
        yield engine
    finally:
        patches.undo()
        engine.close()
