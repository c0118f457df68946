"""Which of the engine's patches are on (`ScaleOptions`), and the llm-compressor it targets."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, get_args

from ..config import AwqSpec, ExpertSearch

TARGET_VERSION = "0.14.0.1"
EXPERT_SEARCHES = get_args(ExpertSearch)
# The engine knobs a release config sets (`awq:` in the YAML, config.AwqSpec): the same names and
# defaults here, mapped in one place (`ScaleOptions.from_spec`). AwqSpec's other fields are the
# recipe's (n_grid, duo_scaling) or choose the engine itself (engine).
CONFIG_FIELDS = (
    "max_expert_tokens",
    "expert_search",
    "resident_cache_gib",
    "deferred_write_back",
    "batched_balance_layers",
    "fused_gpu_experts",
    "batched_expert_hooks",
    "search_batch_tokens",
    "causal_search_attention",
    "triton_kernels",
    "side_grid_window",
)
_DEFAULT = AwqSpec()


@dataclass
class ScaleOptions:
    """Which patches are on. `stock()` is llm-compressor as released."""

    keep_first_output: bool = True
    stream_loss: bool = True
    routed_experts_in_search: bool = True
    max_expert_tokens: int | None = _DEFAULT.max_expert_tokens
    batched_experts: bool = True
    sdpa_in_search: bool = True
    # causal.py: a cached mask that is exactly the causal pattern left out of the search's
    # attention forwards (SDPA's causal GQA kernel): the last bits of attention's output change,
    # so, as the fused experts, only on `fused_expert_devices` (the CPU's demo bits are pinned)
    causal_search_attention: bool = _DEFAULT.causal_search_attention
    triton_kernels: bool = _DEFAULT.triton_kernels  # kernels.py, on fused_expert_devices where each checks out
    # grid.py: a side branch searches each mapping near the propagating branch's choice (None: every point)
    side_grid_window: int | None = _DEFAULT.side_grid_window
    reuse_routing: bool = True  # routing.py: the search's router outputs computed once per batch (same bits)
    search_batch_tokens: int | None = _DEFAULT.search_batch_tokens
    # routed experts' down_proj scale search: "gram" (Gram search: every token, no rows kept),
    # "sampled" (the sampled expert rows' rows, stock's per-expert loop), "sampled-batched" (sampled expert rows, searched together)
    expert_search: ExpertSearch = _DEFAULT.expert_search
    resident_cache_gib: float | None = _DEFAULT.resident_cache_gib  # resident caches: None = 35 % of the GPU; 0 = stock
    deferred_write_back: bool = (
        _DEFAULT.deferred_write_back
    )  # deferred write-back: smoothed weights to the CPU once a layer
    batched_balance_layers: bool = (
        _DEFAULT.batched_balance_layers
    )  # batched balance layers: same-shape balance layers together
    # on a GPU, the experts as batched products in the calibration forward (all_experts.py) and
    # as grouped products in the search (experts.py): the last bits of an expert's output may
    # differ from the per-expert loop's, so the CPU (the demo's pinned bits) keeps the loop
    # unless `fused_on_cpu` (tests) asks
    fused_gpu_experts: bool = _DEFAULT.fused_gpu_experts
    fused_on_cpu: bool = False
    # with the experts fused: each kind of hook once per chunk of experts (all_experts.py)
    batched_expert_hooks: bool = _DEFAULT.batched_expert_hooks
    device_activation_sums: bool = True  # activations.py: AWQ's sums added on the device, same bits
    # caches.py, batched hooks on a GPU: each sample's Gram matrices of the experts' down_proj inputs
    # added into their sums by the GEMM (baddbmm, fp32 out) instead of a temporary and a sum; off
    # until a GPU side-by-side of the chosen scales (the GEMM may block the sum otherwise)
    gram_by_gemm: bool = False
    # all_experts.py, the fused calibration forward: each chunk's routed rows taken under a mask
    # instead of a slice whose bounds the host reads from the GPU (one wait a sample); off until a
    # GPU side-by-side of the chosen scales (one grouped GEMM over every expert for the chunks')
    sync_free_routing: bool = False
    # causal.py: the calibration and propagation passes' attention through SDPA's causal kernel
    # where the pipeline's cached mask is exactly the causal pattern, instead of the eager
    # attention llm-compressor forces there (fp32 scores of every head); the last bits of what
    # the next layer sees change, so off until a GPU side-by-side of the chosen scales and KL
    causal_calibration_attention: bool = False
    # rope.py, with triton_kernels on a GPU: GLM's rotary embedding of q and k as one kernel each,
    # checked against transformers' function on the device first (same bits), in every pass. On an
    # H100 at 512 x 2048 it chose all 326 scales of two MoE layers bit for bit and took 2.4 s off
    # each layer's smoothing (benchmarks/results/2026-12-07-h100-fused-rope-and-offload-save-split)
    fused_rope: bool = True
    read_ahead: bool = True  # read_ahead.py: the next layer's disk-offloaded weights read ahead (a hint)
    # read_ahead.py: the next layer's offloaded weights onloaded by a helper thread while the
    # current layer's outputs propagate, where the onload device is of these types (same bytes)
    onload_ahead: tuple[str, ...] = ("cuda",)
    # ... a CPU offload's weights through two pinned staging buffers (read_ahead.PinnedStages), not
    # the driver's own staging of a pageable copy, which held the main thread's kernel launches
    onload_ahead_pinned: bool = True
    check_write_back: bool = (
        False  # deferred write-back, benchmarks: compare every CPU copy with the GPU's after each layer
    )
    record_scales: bool = False  # keep every chosen scale vector (tests, small models only)

    @classmethod
    def from_spec(cls, awq: AwqSpec) -> ScaleOptions:
        """What a release config's `awq:` section asks of the engine."""
        if awq.engine == "stock":
            return cls.stock()
        return cls(**{name: getattr(awq, name) for name in CONFIG_FIELDS})

    @classmethod
    def stock(cls, record_scales: bool = False) -> ScaleOptions:
        return cls(
            keep_first_output=False,
            stream_loss=False,
            routed_experts_in_search=False,
            max_expert_tokens=None,
            batched_experts=False,
            sdpa_in_search=False,
            causal_search_attention=False,
            reuse_routing=False,
            triton_kernels=False,
            fused_rope=False,
            side_grid_window=None,
            search_batch_tokens=None,
            expert_search="sampled",  # with max_expert_tokens None: every token, as stock
            resident_cache_gib=0,
            deferred_write_back=False,
            batched_balance_layers=False,
            fused_gpu_experts=False,
            batched_expert_hooks=False,
            device_activation_sums=False,
            read_ahead=False,
            onload_ahead=(),
            record_scales=record_scales,
        )

    def __post_init__(self) -> None:
        if self.expert_search not in EXPERT_SEARCHES:
            raise ValueError(f"expert_search {self.expert_search!r} is not one of {EXPERT_SEARCHES}")

    @property
    def fused_expert_devices(self) -> tuple[str, ...]:
        """Device types on which the experts run fused (batched or grouped products)."""
        return (("cuda",) if self.fused_gpu_experts else ()) + (("cpu",) if self.fused_on_cpu else ())

    @property
    def batched_expert_search(self) -> bool:
        return self.expert_search in ("gram", "sampled-batched")

    @property
    def sampled_expert_rows(self) -> int | None:
        """The sampled expert rows' budget, where the expert search replays rows."""
        return None if self.expert_search == "gram" else self.max_expert_tokens

    @classmethod
    def memory_only(cls, record_scales: bool = False) -> ScaleOptions:
        """Only the patches that leave AWQ's arithmetic unchanged (1, 2, 9, 11 and 12, the
        activation sums on the device and the search's routing reuse)."""
        return dataclasses.replace(
            cls.stock(record_scales),
            keep_first_output=True,
            stream_loss=True,
            resident_cache_gib=None,
            deferred_write_back=True,
            batched_balance_layers=True,
            device_activation_sums=True,
            reuse_routing=True,
        )

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("record_scales", "check_write_back")}
        if self.expert_search == "gram":
            out["max_expert_tokens"] = None  # unused: the Gram search keeps no rows
        return out
