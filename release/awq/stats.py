"""What the engine observed in a run (`ScaleStats`), and the host-memory helpers it measures with."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerRecord:
    """One sequential-pipeline layer: calibration forward (from the end of the previous
    layer's smoothing) and AWQ smoothing, with the peaks over that window."""

    mappings: int
    calib_s: float
    smooth_s: float
    peak_gpu_gib: float
    peak_host_gib: float
    pinned_host_gib: float = 0.0  # peak of PyTorch's pinned host allocator (part of peak_host_gib)
    reserved_gpu_gib: float = 0.0  # peak the CUDA caching allocator held (what must fit the card)
    side_s: float = 0.0  # one calibration pass for several group sizes: the side branches' smoothing and stores
    side_stored_gib: float = 0.0  # ... and what they wrote to their stores


@dataclass(frozen=True)
class LayerTiming:
    """One smoothing of a layer: its mappings, when it started and how long it took."""

    mappings: int
    started: float
    seconds: float


# the engine's counters a benchmark prints: which fused and batched paths ran
ENGINE_COUNTERS = (
    "fused_calibration_calls",
    "routed_propagation_calls",
    "batched_expert_calls",
    "grouped_search_calls",
    "batched_hook_chunks",
    "per_expert_hook_chunks",
    "routed_down_chunks",
    "causal_search_forwards",
    "causal_calibration_forwards",
    "fused_rope_calls",
    "fused_sum_calls",
    "routing_reused",
)


@dataclass
class ScaleStats:
    """What the patches observed, for provenance and the benchmark."""

    sampled_caches: int = 0
    batched_expert_calls: int = 0
    fused_calibration_calls: int = 0  # all_experts.py: experts calls of the calibration forward batched
    grouped_search_calls: int = 0  # ... of the search, through torch's grouped GEMM (no padding)
    routed_propagation_calls: int = 0  # ... of the propagation pass, on their routed tokens only
    batched_hook_chunks: int = 0  # all_experts.py: chunks of experts whose hooks ran once per kind
    per_expert_hook_chunks: int = 0  # ... whose hooks were called expert by expert
    routed_down_chunks: int = 0  # ... whose down_proj ran on the routed rows only (no hook read its output)
    routing_reused: int = 0  # routing.py: router calls of the search answered from the reference forward's
    routing_reuse_disabled: str | None = None  # ... or why reuse was turned off
    gpu_kernels: dict[str, dict[str, bool]] = field(default_factory=dict)  # kernels.py: device -> kernels used
    fused_sum_calls: int = 0  # kernels.py: search calls whose routed rows were summed by the one kernel
    causal_search_forwards: int = 0  # causal.py: search batches whose causal mask was left out (SDPA's causal kernel)
    causal_calibration_forwards: int = 0  # causal.py: attention calls of the pipeline's passes on SDPA's causal kernel
    fused_rope_calls: int = 0  # rope.py: attention calls whose q and k were rotated by the one kernel
    read_ahead_layers: int = 0  # read_ahead.py: layers whose disk-offloaded weights were read ahead
    read_ahead_gib: float = 0.0  # ... and their bytes
    onload_ahead: dict[str, Any] = field(default_factory=dict)  # read_ahead.py: weights onloaded ahead, and their fate
    batched_expert_searches: int = 0  # batched expert search: expert mappings searched together
    expert_searches_run: int = 0  # ... of which this rank ran the grid search (its share, under Gram search)
    merged_forwards: dict[str, int] = field(default_factory=dict)  # merged batches: parent type -> merged forwards
    batched_experts_disabled: str | None = None  # why, when the first-call check failed
    tokens_seen: int = 0
    tokens_kept: int = 0
    resident_batches: int = 0  # resident caches: cached parent inputs kept on the GPU ...
    offloaded_batches: int = 0  # ... and sent to host RAM
    resident_peak_gib: float = 0.0
    deduplicated_values: int = 0  # values stored once for consecutive equal samples
    resident_expert_caches: int = 0  # expert down_proj row samples kept on the GPU
    gram_gib: float = 0.0  # Gram search: GPU memory of the experts' Gram matrices (all layers' peak)
    deferred_writes: int = 0  # deferred write-back: weight writes that landed on the onloaded copy only ...
    write_back_checked: int = 0  # ... (check_write_back) CPU copies compared after the flush ...
    write_back_mismatches: int = 0  # ... and how many differed from the onloaded copy
    written_back_gib: float = 0.0  # ... what this rank then copied to the CPU offload or wrote to disk
    disk_writes_deferred: int = 0  # ... weights offloaded to disk among them (each written once per run) ...
    disk_writes: int = 0  # ... and how many of those this rank wrote (its share under data parallelism)
    write_back_s: float = 0.0  # ... and how long that took
    batched_balance_mappings: int = (
        0  # batched balance layers: grid searches that quantized their balance layers together
    )
    batched_balance_layers: int = 0  # ... over this many balance layers
    # seconds per kind of mapping and phase of the batched balance layers' search: "prepare" (from the previous mapping's end
    # to the search: its smoothing writes, this one's reference forward and weight copies), "quantize"
    # (the balance layers at every grid point, timed to the GPU's completion) and "forward_loss"
    search_phase_s: dict[str, dict[str, float]] = field(default_factory=dict)
    allreduce_wait_s: float = 0.0  # data parallel on GPUs: time in AWQ's all-reduces once this rank's work is done
    side_store_wait_s: float = 0.0  # one pass for several group sizes: GPU work waiting on side-store writes
    grid: dict[str, Any] = field(default_factory=dict)  # grid.py: the side branches' searched points and choices
    layers: list[LayerRecord] = field(default_factory=list)
    scales: dict[str, Any] = field(default_factory=dict)  # smooth layer name -> chosen scales
    mapping_s: dict[str, float] = field(default_factory=dict)  # seconds per kind of mapping
    # the batched balance layers' grid searches: smooth layer name -> the loss at every grid point, in the order of
    # `_get_grid_search_params` (the first point, ratio 0 without duo scaling, leaves the weights
    # unsmoothed: it depends only on the data the ranks saw together)
    grid_losses: dict[str, list[float]] = field(default_factory=dict)

    @property
    def peak_gpu_gib(self) -> float:
        return max((r.peak_gpu_gib for r in self.layers), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "sampled_expert_caches": self.sampled_caches,
            "batched_expert_calls": self.batched_expert_calls,
            "fused_calibration_calls": self.fused_calibration_calls,
            "grouped_search_calls": self.grouped_search_calls,
            "routed_propagation_calls": self.routed_propagation_calls,
            "batched_hook_chunks": self.batched_hook_chunks,
            "per_expert_hook_chunks": self.per_expert_hook_chunks,
            "routed_down_chunks": self.routed_down_chunks,
            "causal_search_forwards": self.causal_search_forwards,
            "causal_calibration_forwards": self.causal_calibration_forwards,
            "fused_rope_calls": self.fused_rope_calls,
            "fused_sum_calls": self.fused_sum_calls,
            "gpu_kernels": dict(self.gpu_kernels),
            "routing_reused": self.routing_reused,
            "routing_reuse_disabled": self.routing_reuse_disabled,
            # (not the options' names: calibrate.py merges these with ScaleOptions.to_json, and the
            # card and provenance state the options, never a run's counters or times)
            "read_ahead_counts": {"layers": self.read_ahead_layers, "gib": round(self.read_ahead_gib, 3)},
            "onload_ahead_counts": dict(self.onload_ahead),
            "merged_search_forwards": dict(self.merged_forwards),
            "batched_expert_searches": self.batched_expert_searches,
            "expert_searches_run": self.expert_searches_run,
            "gram_gib": round(self.gram_gib, 3),
            "write_back": {
                "deferred_writes": self.deferred_writes,
                "written_back_gib": round(self.written_back_gib, 3),
                "disk_weights": self.disk_writes_deferred,
                "disk_weights_written_here": self.disk_writes,
                "write_back_s": round(self.write_back_s, 2),
                "checked": self.write_back_checked,
                "mismatches": self.write_back_mismatches,
            },
            "batched_balance": {"mappings": self.batched_balance_mappings, "layers": self.batched_balance_layers},
            "search_phase_s": {k: {p: round(v, 2) for p, v in d.items()} for k, d in self.search_phase_s.items()},
            "allreduce_wait_s": round(self.allreduce_wait_s, 2),
            "side_store_wait_s": round(self.side_store_wait_s, 2),
            "side_grid": dict(self.grid),
            "batched_experts_disabled": self.batched_experts_disabled,
            "expert_tokens_seen": self.tokens_seen,
            "expert_tokens_kept": self.tokens_kept,
            "resident_cache": {
                "resident_batches": self.resident_batches,
                "offloaded_batches": self.offloaded_batches,
                "resident_peak_gib": round(self.resident_peak_gib, 3),
                "deduplicated_values": self.deduplicated_values,
                "resident_expert_caches": self.resident_expert_caches,
            },
            "layers": [vars(r) for r in self.layers],
            "mapping_s": {k: round(v, 2) for k, v in self.mapping_s.items()},
            "grid_losses": {k: list(v) for k, v in self.grid_losses.items()},
        }


class HostPeak:
    """Peak resident set size of this process, sampled every 50 ms on a daemon thread."""

    def __init__(self) -> None:
        import threading

        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def take(self) -> float:
        """The peak since the last take(), in GiB; restarts the window."""
        peak = max(self.peak, self._proc.memory_info().rss)
        self.peak = self._proc.memory_info().rss
        return peak / 2**30

    def stop(self) -> None:
        self._stop.set()


def mapping_kind(smooth_name: str) -> str:
    """What a mapping smooths, for the time breakdown."""
    if ".experts." in smooth_name:
        return "routed_expert_down"
    if ".shared_experts." in smooth_name:
        return "shared_expert_down"
    if smooth_name.endswith("input_layernorm"):
        return "attention_qkv"
    if smooth_name.endswith("post_attention_layernorm"):
        return "mlp_or_moe_block"
    if smooth_name.endswith("up_proj"):
        return "dense_mlp_down"
    return "other"


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None where there is no glibc."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_host_memory() -> None:
    """Resident caches: give the pinned blocks PyTorch keeps cached, and the freed pages glibc keeps in
    its heaps, back to the system."""
    import torch

    if torch.cuda.is_available() and hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def pinned_peak_gib() -> float:
    """Peak bytes of PyTorch's pinned host allocator since the last call, in GiB."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    try:
        peak = torch.cuda.host_memory_stats().get("allocated_bytes.peak", 0)
        torch.cuda.reset_peak_host_memory_stats()
    except (AttributeError, RuntimeError):
        return 0.0
    return peak / 2**30
