"""glmrel's extension of llm-compressor's AWQ for MoE calibration at GLM-4.7 size.

Targets llmcompressor 0.14.0.1 (`llmcompressor/modifiers/transform/awq/base.py`); every patch
is a wrapper around one `AWQModifier` method, applied inside `scaled_awq()` and removed when it
exits, and `scaled_awq` refuses any other llm-compressor version rather than patching blind.

What stock 0.14.0.1 does and what each patch changes:

1. `_run_samples` builds a list of each batch's *whole* output before keeping element 0. Under
   the eager attention llm-compressor forces during calibration, the attention parent's output
   holds the [heads, seq, seq] attention weights: all N batches of them are alive at once
   (0.79 GiB per 2048-token sample at GLM-4.7 size). Patched: element 0 is kept as each batch
   finishes. Same values, bit for bit.
2. The grid search keeps the quantized outputs of all N batches for each grid point, then
   computes the loss. Patched: the loss is accumulated batch by batch as the outputs are made,
   in the same order with the same arithmetic. Bit for bit.
3. With `moe_calibrate_all_experts`, the MoE block's forward runs every expert on every token,
   and stays that way inside AWQ's grid search, although the block's output (what the loss
   compares) only uses each token's top-k experts. Patched: inside the smoothing step the
   block runs each expert on its routed tokens only — 160/8 = 20x fewer expert FLOPs for
   GLM-4.7. Calibration statistics (activation means, cached inputs) still see every token
   for every expert. The arithmetic differs only in GEMM row blocking, which can change the
   last bits of an expert's output; the AWQ scales and KL are compared with stock in tests.
4. For each expert's `up_proj -> down_proj` mapping, AWQ caches the `down_proj` input of every
   calibration token (160 x 2048 x 1536 bf16 per sample: ~1.1 GiB per sample, offloaded to
   host RAM), and its grid search runs 21 x N small forwards per expert, each an onload from
   host memory. Patched: at most `max_expert_tokens` rows per expert are kept, an evenly
   spread deterministic subset, as one batch (21 forwards per expert); the activation mean
   that shapes the candidate scales still comes from every token. `None` keeps every token
   in N batches (stock).
5. Inside the smoothing step, the MoE block's experts run as three batched matrix products
   (tokens grouped by expert, padded to the busiest expert of each run of consecutive experts;
   the runs sized so the padded temporaries stay within 4 GiB) instead of stock's Python loop
   over 160 experts with ~10 small kernels each. Expert weights are stacked once per
   grid point (they change only between grid points) with the same fake quantization the
   Linear's own forward would apply; each token's k weighted expert outputs are summed in
   fp32 and rounded once (the loop adds them into bf16 one expert at a time with atomic
   index_add_). The first call per layer is checked against the
   stock loop; a mismatch turns the batched path off for the rest of the run.
6. Inside the smoothing step, attention runs through PyTorch's SDPA instead of the eager
   attention llm-compressor forces for calibration (eager materialises the [heads, seq, seq]
   scores in fp32: ~14 ms per 2048-token sample at GLM-4.7 size, 22 times per sample for the
   attention mapping). The reference output and every grid point use the same kernel, so the
   loss compares like with like; the values differ from eager's in the last bits of bf16.
   The calibration forward itself (statistics, caches, what the next layer sees) stays eager.
7. The reference forward and each grid point run the cached samples in merged batches of up to
   `search_batch_tokens` tokens instead of one forward per sample: token-wise parents (MLP,
   MoE block, Linear) concatenate along the token axis whatever the sample lengths; attention
   stacks samples of equal shape along the batch axis (only under patch 6: stacked eager
   attention would hold N x [heads, seq, seq] fp32 scores). The loss is the same sum of
   squared errors over the same elements, grouped differently. Each expert's sampled
   `down_proj` rows (patch 4) are moved to the GPU once per mapping, not once per grid point.
8. (`expert_search: sampled-batched`, and under patch 10.) The routed experts'
   `up_proj -> down_proj` searches of a layer run together: per grid point one scale
   computation, one min/max, one `calculate_qparams`, one `fake_quantize` and one batched
   matmul for a chunk of experts, instead of llm-compressor's per-mapping machinery (~5 ms of
   framework time per expert and grid point, measured on CPU). Quantization is disabled during
   AWQ's search, so Q(W*s)/s is the whole weight, as in stock. The loss is summed in fp32 per
   expert (stock rounds each batch's sum to bf16); smoothing is applied with stock's formulas.
9. Where AWQ's cached parent inputs live. Stock offloads every cached input of a MoE model to
   host RAM, then for each mapping copies the parent's cache into pinned memory, which
   PyTorch's pinned allocator rounds up to a power of two (a 20 MiB sample takes a 32 MiB
   block) and keeps after the mapping, block sizes apart: the dense layer's 64 MiB blocks
   stayed reserved through every later layer. Patched: a parent's inputs stay on the GPU
   where they were computed (copied, so nothing the model does later can change them) while
   the run's `resident_cache_gib` lasts; the rest go to host RAM as in stock. A value equal to
   the same input of the previous sample (the causal mask and RoPE tables of equal-length
   samples) is stored once, in AWQ's caches and in the pipeline's. After each mapping the
   pinned blocks and freed host memory go back to the system. Same values, bit for bit.
10. (`expert_search: gram`, the default.) A routed expert's `down_proj` is a Linear: its grid
   search loss is ||X (Wq - W)^T||^2 / (rows * out) over the cached inputs X, with
   Wq = Q(W*s)/s. That equals tr(D G D^T) / (rows * out) with D = Wq - W and G = X^T X. So
   instead of keeping rows (stock: every token; patch 4: a sample), the calibration forward
   adds each batch's X^T X into one fp32 [in, in] matrix per expert (9 MiB at GLM-4.7 size,
   whatever the number of samples), and patch 8's batched search evaluates every grid point
   for a chunk of experts from G: one [E, out, in] x [E, in, in] product instead of replaying
   the rows. Every calibration token counts in every expert's search, memory does not grow
   with the samples, and the cost per grid point does not grow with the tokens. Under data
   parallelism G is all-reduced, so each rank searches its share of the experts and the chosen
   scales are all-reduced (one rank's value plus zeros: exact). The loss is
   exact in fp32 where stock's compares bf16 outputs (each batch's sum rounded to bf16), so
   near-tied grid points can resolve differently: measured in tests/test_awq_scale.py.
11. Where smoothed weights are written. The sequential pipeline keeps the layer being
   calibrated onloaded on the GPU (compressed-tensors' `disable_offloading`), and stock's
   `update_offload_parameter` writes every smoothed weight twice: into that GPU copy and, with
   a synchronous copy from the GPU into pageable memory, into the CPU offload (an expert's
   `up_proj` twice a layer, as a balance layer and as a smooth layer). Profiled at GLM-4.7 size
   this write-back was a third of the layer's AWQ time, paid whole by every data-parallel rank
   into the one shared CPU copy. Patched (`deferred_write_back`): inside AWQ's smoothing a
   write lands on the GPU copy only and the weight is marked; at the end of the layer's
   smoothing each marked weight is copied to its CPU offload once, through two pinned staging
   buffers (the copy from the GPU of one overlaps the host copy of the other), and under data
   parallelism each rank copies its share of the layers' weights into the shared CPU memory,
   then waits for the others. Until then nothing reads the CPU copies: the layer stays
   onloaded through its smoothing and the propagation pass. Same values, bit for bit.
12. At each grid point stock quantizes the mapping's balance layers one by one: for each
   Linear a scaled copy, an observer pass (min/max), `update_qparams` and `forward_quantize`,
   ~30 small kernels and their framework calls. The MoE block's mapping has 322 balance
   layers at GLM-4.7 size (160 experts' gate and up projections and the shared expert's), so
   that loop ran ~6,800 times per layer, on every data-parallel rank alike. Patched
   (`batched_balance_layers`): stock's grid search for the mapping, with the balance layers of
   one shape and quantization scheme scaled, observed (min/max), given quantization
   parameters and fake-quantized together, in chunks of layers whose temporaries stay within
   2 GiB; each layer's weight (and its onloaded scale and zero point, as stock's
   `update_qparams(only_update_onload=True)` sets them) becomes a new tensor of its own, as
   in stock. Rows are quantized independently (channel and group strategies only; any other
   scheme keeps stock's loop) and each product and quotient is rounded to the weight's dtype
   once, as in stock, so the values are the same, bit for bit (tests/test_awq_scale.py;
   equal weight digests at GLM-4.7 size on an H200).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, get_args

from .config import ExpertSearch

TARGET_VERSION = "0.14.0.1"
EXPERT_SEARCHES = get_args(ExpertSearch)


@dataclass
class ScaleOptions:
    """Which patches are on. `stock()` is llm-compressor as released."""

    keep_first_output: bool = True
    stream_loss: bool = True
    routed_experts_in_search: bool = True
    max_expert_tokens: int | None = 16384
    batched_experts: bool = True
    sdpa_in_search: bool = True
    search_batch_tokens: int | None = 16384
    # routed experts' down_proj scale search: "gram" (patch 10: every token, no rows kept),
    # "sampled" (patch 4's rows, stock's per-expert loop), "sampled-batched" (patch 4 + patch 8)
    expert_search: ExpertSearch = "gram"
    resident_cache_gib: float | None = None  # patch 9: None = 35 % of the GPU's memory; 0 = stock
    deferred_write_back: bool = True  # patch 11: smoothed weights reach the CPU offload once a layer
    batched_balance_layers: bool = True  # patch 12: a grid point quantizes same-shape balance layers together
    check_write_back: bool = False  # patch 11, benchmarks: compare every CPU copy with the GPU's after each layer
    record_scales: bool = False  # keep every chosen scale vector (tests, small models only)

    @classmethod
    def stock(cls, record_scales: bool = False) -> ScaleOptions:
        return cls(
            keep_first_output=False,
            stream_loss=False,
            routed_experts_in_search=False,
            max_expert_tokens=None,
            batched_experts=False,
            sdpa_in_search=False,
            search_batch_tokens=None,
            expert_search="sampled",  # with max_expert_tokens None: every token, as stock
            resident_cache_gib=0,
            deferred_write_back=False,
            batched_balance_layers=False,
            record_scales=record_scales,
        )

    def __post_init__(self) -> None:
        if self.expert_search not in EXPERT_SEARCHES:
            raise ValueError(f"expert_search {self.expert_search!r} is not one of {EXPERT_SEARCHES}")

    @property
    def batched_expert_search(self) -> bool:
        return self.expert_search in ("gram", "sampled-batched")

    @property
    def sampled_expert_rows(self) -> int | None:
        """Patch 4's row budget, where the expert search replays rows."""
        return None if self.expert_search == "gram" else self.max_expert_tokens

    @classmethod
    def memory_only(cls, record_scales: bool = False) -> ScaleOptions:
        """Only the patches that leave AWQ's arithmetic unchanged (1, 2, 9, 11 and 12)."""
        return dataclasses.replace(
            cls.stock(record_scales),
            keep_first_output=True,
            stream_loss=True,
            resident_cache_gib=None,
            deferred_write_back=True,
            batched_balance_layers=True,
        )

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("record_scales", "check_write_back")}
        if self.expert_search == "gram":
            out["max_expert_tokens"] = None  # unused: the Gram search keeps no rows
        return out


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


@dataclass
class ScaleStats:
    """What the patches observed, for provenance and the benchmark."""

    sampled_caches: int = 0
    batched_expert_calls: int = 0
    batched_expert_searches: int = 0  # patch 8: expert mappings searched together
    expert_searches_run: int = 0  # ... of which this rank ran the grid search (its share, under patch 10)
    merged_forwards: dict[str, int] = field(default_factory=dict)  # patch 7: parent type -> merged forwards
    batched_experts_disabled: str | None = None  # why, when the first-call check failed
    tokens_seen: int = 0
    tokens_kept: int = 0
    resident_batches: int = 0  # patch 9: cached parent inputs kept on the GPU ...
    offloaded_batches: int = 0  # ... and sent to host RAM
    resident_peak_gib: float = 0.0
    deduplicated_values: int = 0  # values stored once for consecutive equal samples
    resident_expert_caches: int = 0  # expert down_proj row samples kept on the GPU
    gram_gib: float = 0.0  # patch 10: GPU memory of the experts' Gram matrices (all layers' peak)
    deferred_writes: int = 0  # patch 11: weight writes that landed on the onloaded copy only ...
    write_back_checked: int = 0  # ... (check_write_back) CPU copies compared after the flush ...
    write_back_mismatches: int = 0  # ... and how many differed from the onloaded copy
    written_back_gib: float = 0.0  # ... what this rank then copied to the CPU offload
    write_back_s: float = 0.0  # ... and how long that took
    batched_balance_mappings: int = 0  # patch 12: grid searches that quantized their balance layers together
    batched_balance_layers: int = 0  # ... over this many balance layers
    # seconds per kind of mapping and phase of patch 12's search: "prepare" (from the previous mapping's end
    # to the search: its smoothing writes, this one's reference forward and weight copies), "quantize"
    # (the balance layers at every grid point, timed to the GPU's completion) and "forward_loss"
    search_phase_s: dict[str, dict[str, float]] = field(default_factory=dict)
    allreduce_wait_s: float = 0.0  # data parallel on GPUs: time in AWQ's all-reduces once this rank's work is done
    layers: list[LayerRecord] = field(default_factory=list)
    scales: dict[str, Any] = field(default_factory=dict)  # smooth layer name -> chosen scales
    mapping_s: dict[str, float] = field(default_factory=dict)  # seconds per kind of mapping
    # patch 12's grid searches: smooth layer name -> the loss at every grid point, in the order of
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
            "merged_search_forwards": dict(self.merged_forwards),
            "batched_expert_searches": self.batched_expert_searches,
            "expert_searches_run": self.expert_searches_run,
            "gram_gib": round(self.gram_gib, 3),
            "write_back": {
                "deferred_writes": self.deferred_writes,
                "written_back_gib": round(self.written_back_gib, 3),
                "write_back_s": round(self.write_back_s, 2),
                "checked": self.write_back_checked,
                "mismatches": self.write_back_mismatches,
            },
            "batched_balance": {"mappings": self.batched_balance_mappings, "layers": self.batched_balance_layers},
            "search_phase_s": {k: {p: round(v, 2) for p, v in d.items()} for k, d in self.search_phase_s.items()},
            "allreduce_wait_s": round(self.allreduce_wait_s, 2),
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


class _HostPeak:
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


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output


class _Lazy:
    """Marks `_run_samples` calls made from inside the grid search (patch 2)."""

    active = False


class _Search:
    """Patch 5's state: inside AWQ smoothing?, the weight generation, stacked weights."""

    active = False  # experts run on routed tokens (patches 3 and 5)
    smoothing = False  # inside AWQModifier._apply_smoothing (patches 6 and 7)
    generation = 0
    stacked: dict[int, tuple[int, Any]] = {}
    checked: set[int] = set()


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


def _effective_weight(linear: Any) -> Any:
    """The weight a compressed-tensors Linear's forward would multiply by (fake-quantized
    when its quantization is enabled), as `set_forward_quantized` computes it."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    scheme = getattr(linear, "quantization_scheme", None)
    status = getattr(linear, "quantization_status", None)
    enabled = getattr(linear, "quantization_enabled", True) and scheme is not None and status is not None
    w = linear.weight.data
    if enabled and scheme.weights and status < QuantizationStatus.COMPRESSED:
        w = forward_quantize(linear, w, "weight", scheme.weights)
    return w


def _batchable(experts: Any) -> bool:
    first = experts[0]
    for lin in (getattr(first, "gate_proj", None), getattr(first, "up_proj", None), first.down_proj):
        if lin is None or lin.bias is not None:
            return False
        scheme = getattr(lin, "quantization_scheme", None)
        if scheme is not None and (scheme.input_activations or scheme.output_activations):
            return False
    return True


def _expert_chunks(counts: list[int], max_rows: int) -> list[tuple[int, int, int]]:
    """Runs [first, last) of consecutive experts with their padded width (the most rows of any
    expert in the run), each with at most `max_rows` padded rows (experts x width), or a single
    expert where one alone has more."""
    chunks: list[tuple[int, int, int]] = []
    first, width = 0, 0
    for e, c in enumerate(counts):
        if e > first and (e + 1 - first) * max(width, c) > max_rows:
            chunks.append((first, e, width))
            first, width = e, 0
        width = max(width, c)
    if counts:
        chunks.append((first, len(counts), width))
    return chunks


def _grouped_experts_forward(
    experts: Any, hidden: Any, top_k_index: Any, top_k_weights: Any, padded_bytes: int = 4 * 2**30
) -> Any:
    """The routed (top-k) output of a LinearExperts2D with gated experts, as batched matmuls."""
    import torch

    n_exp = experts.num_experts
    key = id(experts)
    cached = _Search.stacked.get(key)
    if cached is None or cached[0] != _Search.generation:
        # One buffer per projection for the layer, refilled in place at each grid point:
        # torch.stack of freshly fake-quantized weights held two copies at once.
        members = [experts[i] for i in range(n_exp)]
        if cached is None:
            ref = members[0]
            bufs = tuple(
                torch.empty((n_exp, *lin.weight.shape), dtype=lin.weight.dtype, device=lin.weight.device)
                for lin in (ref.gate_proj, ref.up_proj, ref.down_proj)
            )
        else:
            bufs = cached[1]
        for i, m in enumerate(members):
            for buf, lin in zip(bufs, (m.gate_proj, m.up_proj, m.down_proj)):
                buf[i].copy_(_effective_weight(lin))
        _Search.stacked = {key: (_Search.generation, bufs)}  # one layer at a time
        cached = _Search.stacked[key]
    w_gate, w_up, w_down = cached[1]
    n_tok, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    token_of = order // k
    slot_of = order % k
    counts = torch.bincount(flat, minlength=n_exp)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(flat.numel(), device=flat.device) - starts[expert_of]
    # [expert, row] products padded to the busiest expert of each chunk of consecutive experts,
    # the chunks sized so their temporaries stay within `padded_bytes`: padding to the busiest
    # expert of the whole layer grew with routing skew (the most tokens one expert got in a
    # merged batch), 26.8 GiB at N=32 at GLM-4.7 size on random-init routing (H200 allocator trace)
    hid, inter = hidden.shape[-1], w_gate.shape[1]
    row_bytes = (2 * hid + 5 * inter) * hidden.element_size()  # x, gate, up, cat, act, down out
    y = hidden.new_empty(flat.numel(), hid)
    per_expert = counts.tolist()
    ends = list(itertools.accumulate(per_expert))
    for first, last, width in _expert_chunks(per_expert, max(1, padded_bytes // row_bytes)):
        lo, hi = ends[first] - per_expert[first], ends[last - 1]
        if hi == lo:
            continue
        e_of, r_of = expert_of[lo:hi] - first, rank[lo:hi]
        x = hidden.new_zeros(last - first, width, hid)
        x[e_of, r_of] = hidden[token_of[lo:hi]].to(x.dtype)
        gate_up = torch.cat(
            [torch.bmm(x, w_gate[first:last].transpose(1, 2)), torch.bmm(x, w_up[first:last].transpose(1, 2))], dim=-1
        )
        act = experts[0]._apply_gate(gate_up)
        del x, gate_up
        y[lo:hi] = torch.bmm(act, w_down[first:last].transpose(1, 2))[e_of, r_of]
        del act
    weights = top_k_weights[token_of, slot_of, None]
    # Each (token, slot) is written once, then the k slots are summed in fp32: no atomic
    # index_add_ of 16k x 8 rows into bf16 (the loop's way; same terms, rounded once here).
    slots = hidden.new_zeros(n_tok, k, hidden.shape[-1])
    slots[token_of, slot_of] = y.mul_(weights)  # computed in fp32, stored in y's dtype: no fp32 copy of y
    return slots.sum(dim=1, dtype=torch.float32).to(hidden.dtype)


TOKEN_WISE_PARENTS = ("Linear", "Glm4MoeMLP", "Glm4MoeMoE")  # output row t depends on input row t only


def _tokens(batch: dict[str, Any]) -> int:
    import torch

    x = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() >= 2), None)
    return 0 if x is None else x.numel() // x.shape[-1]


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


def _merged_batches(
    batches: Any, token_wise: bool, budget: int, counts: dict[str, int], kind: str
) -> Iterator[dict[str, Any]]:
    """Consecutive cached batches merged into forwards of at most `budget` tokens (patch 7);
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


def _divided_smooth_weight(weight: Any, scales: Any) -> Any:
    """Stock's smoothing of a smooth layer's weight (`_apply_smoothing._smooth`), out of place:
    a norm is divided by the scales; a Linear has its last rows divided (v_proj smoothed for
    o_proj, up_proj for down_proj)."""
    if weight.ndim == 1:
        return weight.div(scales)
    fixed = weight.clone()
    fixed[-scales.size(0) :] = weight[-scales.size(0) :].div(scales.view(-1, 1))
    return fixed


class _SharedSmoothFix:
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
        awq_base.update_offload_parameter(layer, "weight", _divided_smooth_weight(weight, scales))
        if bias is not None:
            awq_base.update_offload_parameter(layer, "bias", bias.div(scales))


def _expert_chunk(bytes_per_expert: int, budget_bytes: int = 4 * 2**30) -> int:
    """Experts per batched search step, for the step's temporaries to fit `budget_bytes`."""
    return max(1, budget_bytes // max(1, bytes_per_expert))


def _gram(x: Any) -> Any:
    """X^T X in fp32 for rows X [tokens, in] (patch 10): bf16 products are exact in fp32, and
    on a GPU the sum runs on the tensor cores with fp32 accumulation."""
    import torch

    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(x.T, x, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    x = x.float()
    return x.T @ x


def _candidate_scales(x_mean: Any, w_mean: Any, ratio: float, duo: bool) -> Any:
    """AWQ's scales for one grid point (llm-compressor 0.14.0.1's `_compute_best_scale`), over
    the last dimension: one mapping's [in] or a batch of experts' [E, in]."""
    import torch

    if duo:
        sc = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        sc = x_mean.pow(ratio).clamp(min=1e-4)
    sc = sc / (sc.amax(dim=-1, keepdim=True) * sc.amin(dim=-1, keepdim=True)).sqrt()
    sc[torch.isinf(sc)] = 1
    sc[torch.isnan(sc)] = 1
    return sc


def _search_experts(
    grid: Any,
    w: Any,
    x_mean: Any,
    w_mean: Any,
    numel: Any,
    args: Any,
    like: Any,
    gram: tuple[Any, Any] | None,
    rows: tuple[Any, Any] | None,
    allreduce: Any,
) -> tuple[Any, Any, Any]:
    """AWQ's grid search for a batch of experts' down_proj (patches 8 and 10): per grid point one
    scale computation, one min/max, one `calculate_qparams`, one fake quantization and one batched
    product. The loss is tr(D G D^T) from `gram` = (G, fp32 W), or the error over `rows` = (X,
    X W^T), all-reduced with `allreduce` when ranks hold different rows. Returns the best scales,
    the first grid point's loss and the best loss, per expert."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.observers.helpers import flatten_for_calibration

    e, out_f, in_f = w.shape
    best_loss = torch.full((e,), float("inf"), device=w.device)
    first_loss = best = None
    for ratio, duo in grid:
        sc = _candidate_scales(x_mean, w_mean, ratio, duo)
        ws = (w * sc[:, None, :]).to(w.dtype).reshape(e * out_f, in_f)
        observed = flatten_for_calibration(ws, "weight", args)
        qscale, qzero = calculate_qparams(torch.amin(observed, dim=(0, -1)), torch.amax(observed, dim=(0, -1)), args)
        qscale = qscale.to(like.weight_scale.dtype)
        qzero = qzero.to(like.weight_zero_point.dtype)
        wq = (fake_quantize(ws, qscale, qzero, args).reshape(e, out_f, in_f) / sc[:, None, :]).to(w.dtype)
        if gram is not None:
            g, w32 = gram
            diff = wq.float() - w32
            err = (torch.bmm(diff, g) * diff).sum(dim=(1, 2))  # tr(D G D^T), per expert
            del diff
        else:
            x, ref = rows
            err = (ref - torch.bmm(x, wq.transpose(1, 2))).float().pow(2).sum(dim=(1, 2))
            if allreduce is not None:
                (err,) = allreduce([err])
        loss = err / numel
        first_loss = loss.clone() if first_loss is None else first_loss
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best = torch.where(better[:, None], sc, sc if best is None else best)
    return best, first_loss, best_loss


def _batched_expert_search(
    modifier: Any, maps: list[Any], stats_of: dict[str, Any], allreduce: Any, stats: ScaleStats, record: bool
) -> bool:
    """Patches 8 and 10: the routed experts' down_proj scale searches of one layer, batched
    across experts, then smoothing with stock's formulas (see the module docstring). The loss
    comes from each expert's Gram matrix (patch 10's GramCache) or from its sampled rows."""
    import torch
    from compressed_tensors.offload import align_modules
    from llmcompressor.modifiers.transform.awq import base as awq_base

    caches = [modifier._parent_args_cache[m.parent] for m in maps]
    gram = all(hasattr(c, "gram") for c in caches)
    if gram:
        inputs = {tuple(c.gram.shape) for c in caches}
    else:  # shapes of the (offloaded) sampled rows: onloading them is left to each chunk
        inputs = {tuple(c.batch_intermediates[0]["input"].value.shape) for c in caches}
    weights = {(tuple(m.parent.weight.shape), m.parent.bias is None) for m in maps}
    if len(inputs) != 1 or len(weights) != 1 or not all(getattr(m.parent, "quantization_scheme", None) for m in maps):
        if gram:
            raise RuntimeError(
                "glmrel's Gram expert search needs experts of one shape, each quantized; set awq.expert_search: sampled"
            )
        return False  # experts with different row counts or shapes: stock's loop does them
    grid = modifier._get_grid_search_params()
    ranks = _ranks()
    distributed = ranks > 1
    rank = 0
    if distributed:
        import torch.distributed as dist

        rank = dist.get_rank()
    split = gram and distributed  # the whole run's G on every rank: each searches its share of the experts
    (input_shape,) = inputs
    out_f, in_f = maps[0].parent.weight.shape
    if gram:  # w, w*s, its fake quantization, Wq, D and D@G, at most 4 bytes an element
        chunk = _expert_chunk(out_f * in_f * 22)
    else:  # reference, output and fp32 error of [rows, out]
        chunk = _expert_chunk(math.prod(input_shape[:-1]) * out_f * 12)
    for start in range(0, len(maps), chunk):
        group = maps[start : start + chunk]
        downs, ups = [m.parent for m in group], [m.smooth_layer for m in group]
        args = downs[0].quantization_scheme.weights
        with torch.no_grad(), align_modules(downs + ups):
            w = torch.stack([d.weight.detach() for d in downs])  # [E, out, in], the original weights
            up_orig = [u.weight.detach().clone() for u in ups]
            dev = w.device
            if gram:
                g = torch.stack([modifier._parent_args_cache[d].gram.to(dev) for d in downs])
                rows = torch.tensor([float(modifier._parent_args_cache[d].rows) for d in downs], device=dev)
                if distributed:  # every rank holds the whole run's G, and searches its share of the experts
                    g, rows = allreduce([g, rows])
                numel = rows * out_f
                w32 = w.float()
            else:
                x = torch.stack(
                    [next(iter(modifier._parent_args_cache[d]))["input"].reshape(-1, d.in_features) for d in downs]
                ).to(dev)
                ref = torch.bmm(x, w.transpose(1, 2))
                numel = torch.full((len(group),), float(ref[0].numel()), device=dev)
                if distributed:
                    (numel,) = allreduce([numel])
            sums = [allreduce(list(stats_of[m.smooth_name])) if distributed else stats_of[m.smooth_name] for m in group]
            x_mean = torch.stack([xs.to(dev) / n.to(dev) for xs, n in sums])
            w_mean = (
                torch.stack([modifier._compute_layer_means([d]).to(dev) for d in downs])
                if modifier.duo_scaling
                else None
            )
            # The Gram search has the whole run's G on every rank: each rank searches its share
            # of the experts, and the chosen scales are summed over the ranks (one rank's
            # nonzero, the others' zeros). With sampled rows each rank's loss covers only its rows.
            own = [i for i in range(len(group)) if not split or (start + i) % ranks == rank]
            stats.expert_searches_run += len(own)
            idx = torch.tensor(own, dtype=torch.long, device=dev)

            def mine(t: Any, idx: Any = idx) -> Any:
                return t.index_select(0, idx) if split else t

            found = None
            if own:
                found = _search_experts(
                    grid,
                    mine(w),
                    mine(x_mean),
                    None if w_mean is None else mine(w_mean),
                    mine(numel),
                    args,
                    downs[0],
                    (mine(g), mine(w32)) if gram else None,
                    None if gram else (x, ref),
                    allreduce if distributed and not gram else None,
                )
            if split:
                sc_dtype = x_mean.dtype if w_mean is None else torch.promote_types(x_mean.dtype, w_mean.dtype)
                full = [
                    torch.zeros(len(group), in_f, device=dev, dtype=sc_dtype),
                    torch.zeros(len(group), device=dev, dtype=torch.float32),
                    torch.zeros(len(group), device=dev, dtype=torch.float32),
                ]
                for t, part in zip(full, found or ()):
                    t[idx] = part.to(t.dtype)
                found = allreduce(full)
            best, first_loss, best_loss = found
            if not torch.isfinite(best_loss).all():
                raise RuntimeError(
                    "glmrel's batched expert search found no finite loss; set awq.expert_search: sampled"
                )
            first, best_err = first_loss.tolist(), best_loss.tolist()
            for i, (m, d, u) in enumerate(zip(group, downs, ups)):
                s_i = best[i]
                # through AWQ's module: patch 11 defers these writes as it does stock's
                awq_base.update_offload_parameter(d, "weight", w[i] * s_i.view(1, -1))
                awq_base.update_offload_parameter(u, "weight", _divided_smooth_weight(up_orig[i], s_i))
                modifier._error_metrics.append(
                    {
                        "layer_name": m.smooth_name,
                        "parent_name": m.parent_name,
                        "initial_error": first[i],
                        "best_error": best_err[i],
                        "reduction": best_err[i] / first[i] if first[i] > 0 else 1.0,
                    }
                )
                if record:
                    stats.scales[m.smooth_name] = s_i.detach().float().cpu().clone()
                del modifier._parent_args_cache[d]
        stats.batched_expert_searches += len(group)
    return True


def _balance_groups(layers: list[Any]) -> list[list[Any]] | None:
    """Patch 12: the balance layers stock's grid search quantizes (those with a weight scheme),
    grouped by weight shape, dtype, device and quantization arguments. None where one of them is
    not quantized row by row from its min/max (a per-tensor, block, global or dynamic scale, or
    an already compressed weight): stock's loop then runs."""
    import torch
    from compressed_tensors.quantization import QuantizationStatus, QuantizationStrategy

    row_wise = (QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP)
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for layer in layers:
        args = getattr(getattr(layer, "quantization_scheme", None), "weights", None)
        if args is None:
            continue  # stock leaves its weight alone during the search
        w = getattr(layer, "weight", None)
        status = getattr(layer, "quantization_status", None)
        if (
            not isinstance(w, torch.Tensor)
            or w.dim() != 2
            or args.strategy not in row_wise
            or args.dynamic is not False
            or status is None
            or status >= QuantizationStatus.COMPRESSED
            or not hasattr(layer, "weight_scale")
            or getattr(layer, "weight_global_scale", None) is not None
        ):
            return None
        groups.setdefault((tuple(w.shape), w.dtype, w.device, repr(args)), []).append(layer)
    return list(groups.values())


def _quantize_balance_group(
    layers: list[Any], orig: dict[Any, Any], scales: Any, budget_bytes: int = 2 * 2**30
) -> None:
    """Patch 12, one grid point for layers of one shape and scheme: what stock does layer by layer
    (W*s rounded to the weight's dtype, min/max observer, `calculate_qparams`, `forward_quantize`,
    then /s), for a chunk of layers at a time. Each layer's weight, and its onloaded scale and
    zero point, become tensors of their own, as stock's are: compressed-tensors' offload assumes
    a parameter owns its storage (on CPU ranks, whose onloaded parameter is the shared offloaded
    one, views of a chunk left the ranks' quantization scales unshared at the layer's end)."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.observers.helpers import flatten_for_calibration

    first = layers[0]
    args = first.quantization_scheme.weights
    out_f, in_f = first.weight.shape
    dtype, device = first.weight.dtype, scales.device
    # W*s in the weight's dtype and the fake quantization's intermediates: ~12 bytes an element.
    # Products and quotients are written straight into tensors of the weight's dtype (`out=`): the
    # arithmetic runs in the promoted dtype and is rounded once on the write, as stock's
    # `(orig * s)` copied into the weight and `(Q(W*s) / s).to(dtype)` are, without their
    # full-size fp32 temporaries.
    chunk = _expert_chunk(out_f * in_f * 12, budget_bytes)
    for start in range(0, len(layers), chunk):
        group = layers[start : start + chunk]
        ws = torch.empty((len(group) * out_f, in_f), dtype=dtype, device=device)
        for i, layer in enumerate(group):
            torch.mul(orig[layer].to(device), scales, out=ws[i * out_f : (i + 1) * out_f])
        observed = flatten_for_calibration(ws, "weight", args)
        qscale, qzero = calculate_qparams(torch.amin(observed, dim=(0, -1)), torch.amax(observed, dim=(0, -1)), args)
        fq = fake_quantize(ws, qscale, qzero, args)
        del ws, observed
        for i, layer in enumerate(group):
            rows = slice(i * out_f, (i + 1) * out_f)
            weight = torch.empty((out_f, in_f), dtype=dtype, device=device)  # stock: a new tensor per layer
            layer.weight.data = torch.div(fq[rows], scales, out=weight)
            layer.weight_scale.data = qscale[rows].clone()  # as update_qparams(only_update_onload=True)
            if getattr(layer, "weight_zero_point", None) is not None:
                layer.weight_zero_point.data = qzero[rows].clone()
        del fq


def _batched_balance_search(
    modifier: Any,
    mapping: Any,
    fp16_outputs: Any,
    orig_layer_weights: dict[Any, Any],
    groups: list[list[Any]],
    phases: dict[str, float],
    losses: list[float] | None = None,
) -> Any:
    """Patch 12: llm-compressor 0.14.0.1's `AWQModifier._compute_best_scale`, step for step (less
    its progress bar and debug log), but for the balance layers' quantization at each grid point
    (`_quantize_balance_group`); `phases` adds up its time by phase. Stock
    swaps in min/max weight observers for the search and fuses observers of TENSOR_GROUP layers
    only: `_balance_groups` admits neither observer state nor such layers, so neither applies."""
    import torch
    from llmcompressor.modifiers.transform.awq import base as awq_base

    history = []
    best_ratio = -1
    best_scales = None
    best_error = float("inf")
    initial_error = None
    device = awq_base.get_execution_device(mapping.parent)
    x_sum, count = modifier._smooth_activation_stats[mapping.smooth_name]
    if awq_base.is_distributed():
        x_sum, count = awq_base._allreduce_data_sum([x_sum, count])
    x_mean = x_sum.to(device) / count.to(device)
    w_mean = modifier._compute_layer_means(mapping.balance_layers).to(device) if modifier.duo_scaling else None
    for ratio, use_duo_scaling in modifier._get_grid_search_params():
        scales = _candidate_scales(x_mean.view(-1), w_mean, ratio, use_duo_scaling)
        scales_view = scales.view(1, -1).to(device)
        t = time.perf_counter()
        for group in groups:
            _quantize_balance_group(group, orig_layer_weights, scales_view)
        if scales_view.is_cuda:
            torch.cuda.synchronize(scales_view.device)
        now = time.perf_counter()
        phases["quantize"] = phases.get("quantize", 0.0) + now - t
        int_w_outputs = modifier._run_samples(mapping.parent)
        loss = modifier._compute_loss(fp16_outputs, int_w_outputs)  # .item(): waits for the GPU
        del int_w_outputs
        phases["forward_loss"] = phases.get("forward_loss", 0.0) + time.perf_counter() - now
        if initial_error is None:
            initial_error = loss
        history.append({"ratio": ratio, "duo_scaling": use_duo_scaling, "error": loss})
        if losses is not None:
            losses.append(float(loss))
        if loss < best_error:
            best_error = loss
            best_ratio = ratio
            best_scales = scales.clone()
    if best_ratio == -1:
        awq_base.logger.debug(history)
        raise RuntimeError(
            f"No finite loss was found in the AWQ grid search for {mapping.smooth_name}: NaN values in the "
            f"forward pass of {mapping.parent_name} (llm-compressor raises the same)"
        )
    err_reduction = best_error / initial_error if initial_error > 0 else 1.0
    modifier._error_metrics.append(
        {
            "layer_name": mapping.smooth_name,
            "parent_name": mapping.parent_name,
            "initial_error": initial_error,
            "best_error": best_error,
            "reduction": err_reduction,
        }
    )
    if torch.isnan(best_scales).sum() != 0:
        raise RuntimeError(f"NaN found in the AWQ scales of {mapping.smooth_name}")
    return best_scales.detach().cpu()


def _ranks() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _cpu_allreduce_sum(data: list[Any]) -> list[Any]:
    import torch.distributed as dist

    data = [datum.clone() for datum in data]
    for datum in data:
        dist.all_reduce(datum, op=dist.ReduceOp.SUM)
    return data


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


_LIBC: list[Any] = []


def _release_host_memory() -> None:
    """Patch 9: give the pinned blocks PyTorch keeps cached, and the freed pages glibc keeps in
    its heaps, back to the system."""
    import ctypes

    import torch

    if torch.cuda.is_available() and hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)


def _pinned_peak_gib() -> float:
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
            "re-read llmcompressor/modifiers/transform/awq/base.py and update release/awq_scale.py"
        )
    cls = awq_base.AWQModifier
    stats = ScaleStats()
    saved = {
        name: getattr(cls, name)
        for name in (
            "_run_samples",
            "_compute_best_scale",
            "_compute_loss",
            "_apply_smoothing",
            "_setup_activation_cache_hooks",
        )
    }
    stock_update = IntermediatesCache.update
    stock_write = awq_base.update_offload_parameter
    write_back = _WriteBack(check=options.check_write_back) if options.deferred_write_back else None

    def update_offload_parameter(module: Any, name: str, data: Any) -> None:
        """Patch 11: inside the smoothing step a write lands on the onloaded copy only."""
        if not (write_back is not None and _Search.smoothing and write_back.defer(module, name, data)):
            stock_write(module, name, data)

    deduplicating = options.resident_cache_gib != 0
    ledger = _Ledger(_resident_budget(options.resident_cache_gib) if deduplicating else 0)
    grams = _Ledger(math.inf)

    def _run_samples(self: Any, module: Any) -> Any:
        _Search.generation += 1  # balance weights change only between _run_samples calls
        cache = self._parent_args_cache[module]
        state = awq_base.active_session().state
        batches = cache.iter_prefetch() if state.sequential_prefetch else cache
        if options.search_batch_tokens and _Search.smoothing and not getattr(state, "loss_masks", None):
            kind = type(module).__name__
            token_wise = kind in TOKEN_WISE_PARENTS
            if token_wise or options.sdpa_in_search:
                batches = _merged_batches(batches, token_wise, options.search_batch_tokens, stats.merged_forwards, kind)
        outputs = (_first(module(**batch)) for batch in batches)
        if options.stream_loss and _Lazy.active:
            return outputs  # consumed one batch at a time by _compute_loss
        return list(outputs)

    def _compute_best_scale(self: Any, mapping: Any, fp16_outputs: Any, orig_layer_weights: Any) -> Any:
        if deduplicating and not isinstance(self._parent_args_cache.get(mapping.parent), (SampledCache, GramCache)):
            _release_host_memory()  # what earlier mappings pinned and freed
        _Lazy.active = options.stream_loss
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
            _Lazy.active = False
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
        flag = moe_context._CALIBRATE_ALL_EXPERTS
        if options.routed_experts_in_search:
            moe_context._CALIBRATE_ALL_EXPERTS = False
        _Search.active = options.routed_experts_in_search
        _Search.smoothing = True
        # compressed-tensors' offload wrapper calls the forward it captured at load time
        # (`_original_forward_func`), so the class-level patch alone does not reach it.
        swapped = []
        if options.batched_experts:
            for m in model.modules():
                if isinstance(m, LinearExperts2D) and m.__dict__.get("_original_forward_func") is stock_experts_forward:
                    m._original_forward_func = experts_forward
                    swapped.append(m)
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
            moe_context._CALIBRATE_ALL_EXPERTS = flag
            _Search.active = _Search.smoothing = False
            _Search.stacked = {}
            for m in swapped:
                m._original_forward_func = stock_experts_forward
            if write_back is not None:
                write_back.dirty.clear()  # flushed above; a failed smoothing leaves the CPU copies as they were
            if deduplicating:
                _release_host_memory()
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
            if not (options.search_batch_tokens and _Search.smoothing and input_names is None):
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
            if _Search.smoothing and getattr(getattr(model, "config", None), "_attn_implementation", None) == "eager":
                with patch_attr(model.config, "_attn_implementation", "sdpa"):
                    yield
            else:
                yield

    def experts_forward(self: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
        if not (_Search.active and options.batched_experts and stats.batched_experts_disabled is None):
            return stock_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        if not self.has_gate or not _batchable(self):
            return stock_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        out = _grouped_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        if id(self) not in _Search.checked:  # first call for this layer: compare with the loop
            _Search.checked.add(id(self))
            ref = stock_experts_forward(self, hidden_states, top_k_index, top_k_weights)
            err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
            if not err < 2e-2:
                stats.batched_experts_disabled = f"relative difference {err:.3g} against the loop"
                return ref
        stats.batched_expert_calls += 1
        return out

    patches = {"_run_samples": _run_samples, "_apply_smoothing": _apply_smoothing}
    patches["_compute_best_scale"] = _compute_best_scale  # also times each mapping
    if options.sampled_expert_rows is not None or options.expert_search == "gram" or deduplicating:
        patches["_setup_activation_cache_hooks"] = _setup_activation_cache_hooks
    if not options.keep_first_output and not options.stream_loss:
        patches.pop("_run_samples")
    host = _HostPeak()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _Search.checked = set()
    try:
        for name, fn in patches.items():
            setattr(cls, name, fn)
        if deduplicating:
            IntermediatesCache.update = update
        if options.batched_experts:
            LinearExperts2D.forward = experts_forward
        if options.sdpa_in_search:
            awq_base.calibration_forward_context = search_forward_context
        if write_back is not None:
            awq_base.update_offload_parameter = update_offload_parameter
        if cpu_ranks:
            # ranks on CPU (the test of the data-parallel path): stock moves the sums to the
            # accelerator before all-reducing them, and there is none; gloo sums CPU tensors
            awq_base._allreduce_data_sum = _cpu_allreduce_sum
        elif awq_base.is_distributed() and torch.cuda.is_available():
            awq_base._allreduce_data_sum = timed_allreduce
        clock["last"] = time.perf_counter()
        yield stats
    finally:
        for name, fn in saved.items():
            setattr(cls, name, fn)
        LinearExperts2D.forward = stock_experts_forward
        IntermediatesCache.update = stock_update
        awq_base.calibration_forward_context = stock_forward_context
        awq_base._allreduce_data_sum = stock_allreduce
        awq_base.update_offload_parameter = stock_write
        _Lazy.active = False
        _Search.active = _Search.smoothing = False
        _Search.stacked = {}
        host.stop()
        stats.resident_peak_gib = ledger.peak / 2**30
        stats.gram_gib = grams.peak / 2**30
        if write_back is not None:
            stats.deferred_writes = write_back.deferred
            stats.written_back_gib = write_back.bytes / 2**30
            stats.write_back_s = write_back.seconds
            stats.write_back_checked, stats.write_back_mismatches = write_back.checked, write_back.mismatches
            write_back.stages = []
