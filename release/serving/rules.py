"""Can vLLM serve a W4A16 GLM-4-MoE branch at a tensor-parallel size, and with which kernel?

The rules below are those of one vLLM release, `VLLM_VERSION`, read from that release's wheel
(`pip download vllm==VLLM_VERSION --no-deps`; files named per rule). vLLM picks a kernel per
layer in priority order and refuses to load if no kernel can implement a layer, or if a layer's
quantization groups would be split across ranks. glmrel replays that choice for every
tensor-parallel-sharded layer class of GLM-4-MoE, so a verdict names the rule that decided it.

`tests/test_vllm_conformance.py` asks the pinned release's own code the same questions (in the
environment `make vllm-env` builds) and fails when any verdict differs: a new vLLM release that
changes a rule fails a test instead of printing a wrong card. To move to a new release: bump
VLLM_VERSION and the Makefile's pin, run `make vllm-env vllm-conformance`, fix what differs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..architecture import Glm4MoeArch

VLLM_VERSION = "0.33.0"
VLLM_SOURCE = {
    "order": "vllm/model_executor/kernels/linear/__init__.py (_POSSIBLE_KERNELS[CUDA]: CutlassW4A8, Machete, "
    "Marlin, Conch, Exllama, TritonW4A16, Humming; choose_mp_linear_kernel -> _resolve_backend_kernels -> "
    "layers/quantization/utils/humming/priority.py prioritize_humming: on SM90 Humming moves ahead of Marlin)",
    "cutlass_w4a8": "kernels/linear/mixed_precision/cutlass.py (FP8 e4m3 activations only)",
    "machete": "kernels/linear/mixed_precision/machete.py + layers/quantization/utils/machete_utils.py "
    "(SM90 exactly; groups -1/64/128 for fp16/bf16; in % 64, out % 128)",
    "marlin": "kernels/linear/mixed_precision/marlin.py (SM75+; groups -1/32/64/128; tiles zero-padded "
    "(marlin_utils.marlin_padded_nk); refuses only a group split across ranks)",
    "conch": "kernels/linear/mixed_precision/conch.py (groups -1/128; needs conch-triton-kernels, not a vLLM "
    "dependency)",
    "exllama": "kernels/linear/mixed_precision/exllama.py (float16 activations only)",
    "triton_w4a16": "kernels/linear/mixed_precision/triton_w4a16.py (fp16/bf16; out % 8; groups "
    "-1/32/64/128/256 or full K; in per rank % group)",
    "humming": "kernels/linear/mixed_precision/humming.py (SM75+; any shape and group; humming-kernels is a "
    "dependency of vLLM 0.33.0)",
    "group_split": "layers/quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py -> "
    "distributed/utils.py verify_group_size_divides_partition (after the kernel choice: ValueError unless "
    "the input per rank holds whole groups; per-channel row-parallel scales are repeated on all ranks)",
    "moe": "layers/quantization/compressed_tensors/compressed_tensors_moe/compressed_tensors_moe_wna16.py "
    "create_weights (hidden % group and intermediate-per-rank % group, else ValueError: 'use a compatible TP "
    "size or enable expert parallelism'); backend from layers/fused_moe/oracle/int_wna16.py "
    "(_get_priority_backends, Humming ahead of Marlin on SM90; Marlin MoE: "
    "marlin_utils.check_moe_marlin_supports_config with tile padding)",
}

TP_SIZES = (1, 2, 4, 8, 16)
# (label, compute capability) of the GPUs the report covers; activations are the model's dtype.
TARGETS = (("Hopper SM90 (H100/H200)", 90), ("Ampere SM80 (A100)", 80))


@dataclass(frozen=True)
class LayerShape:
    """One tensor-parallel-sharded layer class, per rank."""

    name: str
    in_per_rank: int
    out_per_rank: int
    in_full: int
    input_sharded: bool  # row-parallel: the group scales are split across ranks


@dataclass(frozen=True)
class LayerVerdict:
    layer: str
    kernel: str | None
    rule: str  # the rule that decided: why the chosen kernel could, or why the last one could not


@dataclass(frozen=True)
class ServeVerdict:
    tp: int
    expert_parallel: bool
    target: str
    act_dtype: str
    servable: bool
    layers: list[LayerVerdict] = field(default_factory=list)

    @property
    def failing(self) -> list[LayerVerdict]:
        return [v for v in self.layers if v.kernel is None]

    @property
    def degraded(self) -> list[LayerVerdict]:
        return [v for v in self.layers if v.kernel == "TritonWNA16MoE"]

    def summary(self) -> str:
        mode = f"TP{self.tp}{'+EP' if self.expert_parallel else ''}"
        if not self.servable:
            return f"{mode}: NOT servable — " + "; ".join(f"{v.layer}: {v.rule}" for v in self.failing)
        kernels = sorted({f"{v.layer}={v.kernel}" for v in self.layers})
        note = " (MoE falls back from Marlin: " + self.degraded[0].rule + ")" if self.degraded else ""
        return f"{mode}: servable [{', '.join(kernels)}]{note}"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = self.summary()
        return d


def _group_split(shape: LayerShape, group_size: int) -> str | None:
    """compressed_tensors_wNa16's check after the kernel choice: every rank's input holds whole
    quantization groups (per-channel scales of a row-parallel layer are repeated instead)."""
    if group_size == -1:
        return None
    if shape.in_per_rank % group_size:
        return (
            f"input per rank {shape.in_per_rank} is not a multiple of group size {group_size}: vLLM refuses "
            "(verify_group_size_divides_partition: 'Consider reducing tensor_parallel_size')"
        )
    return None


def _linear_kernel(shape: LayerShape, group_size: int, cc: int, act: str) -> LayerVerdict:
    """Replay vLLM's choose_mp_linear_kernel for a symmetric INT4 (uint4b8) layer, then the
    group-split check."""
    k, n, kf = shape.in_per_rank, shape.out_per_rank, shape.in_full
    grouped = group_size != -1 and group_size < kf
    chosen, rule = None, ""
    reasons = ["CutlassW4A8: FP8 activations only"]
    if cc != 90:
        reasons.append("Machete: needs SM90")
    elif group_size not in (-1, 64, 128):
        reasons.append(f"Machete: group size {group_size} not in (-1, 64, 128)")
    elif k % 64 or n % 128:
        reasons.append(f"Machete: needs in % 64 and out % 128 (in {k}, out {n})")
    else:
        chosen, rule = "Machete", f"SM90, group {group_size}, in {k} % 64 == 0, out {n} % 128 == 0"
    later: list[tuple[str, str | None]] = []  # (kernel, why not) in vLLM's order after Machete
    if group_size not in (-1, 32, 64, 128):
        later.append(("Marlin", f"group size {group_size} not in (-1, 32, 64, 128)"))
    elif grouped and k % group_size:
        later.append(("Marlin", f"a group split across ranks (in per rank {k} % {group_size})"))
    else:
        later.append(("Marlin", None))
    later.append(("Conch", "needs conch-triton-kernels (not a vLLM dependency)"))
    if act != "float16":
        later.append(("Exllama", "float16 activations only"))
    elif n % 8 or kf % max(group_size, 1) or group_size <= 0:
        later.append(("Exllama", f"out % 8, a positive group dividing in (out {n}, group {group_size})"))
    else:
        later.append(("Exllama", None))
    eff = group_size if group_size != -1 else k
    if n % 8:
        later.append(("TritonW4A16", f"out {n} % 8 != 0"))
    elif group_size not in (-1, 32, 64, 128, 256) and group_size != kf:
        later.append(("TritonW4A16", f"group size {group_size} not in (-1, 32, 64, 128, 256)"))
    elif k % eff:
        later.append(("TritonW4A16", f"in per rank {k} % group {eff} != 0"))
    else:
        later.append(("TritonW4A16", None))
    later.append(("Humming", None))  # any shape; a dependency of vLLM 0.33.0
    if cc == 90:  # prioritize_humming: on SM90 Humming is tried right before Marlin
        later.insert(0, later.pop())
    if chosen is None:
        for name, why in later:
            if why is None:
                chosen, rule = name, "; ".join(reasons) or "first in vLLM's order"
                break
            reasons.append(f"{name}: {why}")
    if chosen is None:
        return LayerVerdict(shape.name, None, "no kernel: " + "; ".join(reasons))
    if why_not := _group_split(shape, group_size):
        return LayerVerdict(shape.name, None, why_not)
    return LayerVerdict(shape.name, chosen, rule)


def _moe_kernel(arch: Glm4MoeArch, intermediate_per_rank: int, group_size: int, cc: int) -> LayerVerdict:
    """Replay compressed_tensors_moe_wna16's group checks and the WNA16 MoE oracle's first
    choice (Humming ahead of Marlin on SM90; Marlin MoE with tile padding, else Triton)."""
    name = "routed experts"
    if group_size != -1:
        if arch.hidden_size % group_size:
            return LayerVerdict(name, None, f"hidden_size {arch.hidden_size} % group size {group_size} != 0")
        if intermediate_per_rank % group_size:
            return LayerVerdict(
                name,
                None,
                f"moe_intermediate_size per rank {intermediate_per_rank} % group size {group_size} != 0: scale "
                "groups would cross TP shards (vLLM: 'use a compatible TP size or enable expert parallelism')",
            )
    if cc == 90:  # which of these is not replayed: the oracle asks each backend's kernel at load
        return LayerVerdict(name, "WNA16MoE", "groups fit; vLLM's MoE oracle tries Humming, Marlin, Triton on SM90")
    marlin = arch.hidden_size % 128 == 0 and group_size in (-1, 32, 64, 128)
    if marlin:
        return LayerVerdict(name, "MarlinMoE", f"hidden {arch.hidden_size} % 128 == 0, group {group_size}")
    return LayerVerdict(name, "TritonWNA16MoE", f"Marlin MoE: hidden {arch.hidden_size} % 128 or group {group_size}")


def layer_shapes(arch: Glm4MoeArch, tp: int) -> list[LayerShape] | str:
    """Per-rank shapes of every quantized layer class, or why vLLM cannot shard at this size."""
    if arch.num_attention_heads % tp:
        return f"{arch.num_attention_heads} attention heads are not divisible by TP {tp}"
    hd, h = arch.head_dim, arch.hidden_size
    q = arch.num_attention_heads * hd
    kv_per_rank = max(1, arch.num_key_value_heads // tp) * hd  # KV heads replicate when tp > kv heads
    shapes = [
        LayerShape("qkv_proj", h, q // tp + 2 * kv_per_rank, h, False),
        LayerShape("o_proj", q // tp, h, q, True),
    ]
    if arch.first_k_dense_replace:
        i = arch.intermediate_size
        if i % tp:
            return f"intermediate_size {i} is not divisible by TP {tp}"
        shapes += [
            LayerShape("dense gate_up_proj", h, 2 * i // tp, h, False),
            LayerShape("dense down_proj", i // tp, h, i, True),
        ]
    if arch.n_shared_experts:
        s = arch.moe_intermediate_size * arch.n_shared_experts
        if s % tp:
            return f"shared expert size {s} is not divisible by TP {tp}"
        shapes += [
            LayerShape("shared_experts gate_up_proj", h, 2 * s // tp, h, False),
            LayerShape("shared_experts down_proj", s // tp, h, s, True),
        ]
    return shapes


def serve_verdicts(arch: Glm4MoeArch, group_size: int, act_dtype: str = "bfloat16") -> list[ServeVerdict]:
    out = []
    for label, cc in TARGETS:
        for tp in TP_SIZES:
            for ep in (False, True):
                shapes = layer_shapes(arch, tp)
                if isinstance(shapes, str):
                    out.append(ServeVerdict(tp, ep, label, act_dtype, False, [LayerVerdict("model", None, shapes)]))
                    continue
                verdicts = [_linear_kernel(s, group_size, cc, act_dtype) for s in shapes]
                # with expert parallelism each routed expert stays whole on one rank
                per_rank = arch.moe_intermediate_size if ep else arch.moe_intermediate_size // tp
                if not ep and arch.moe_intermediate_size % tp:
                    verdicts.append(
                        LayerVerdict("routed experts", None, f"moe_intermediate_size not divisible by TP {tp}")
                    )
                else:
                    verdicts.append(_moe_kernel(arch, per_rank, group_size, cc))
                out.append(ServeVerdict(tp, ep, label, act_dtype, all(v.kernel for v in verdicts), verdicts))
    return out


def servable_tp(verdicts: list[ServeVerdict], target: str = TARGETS[0][0], expert_parallel: bool = False) -> list[int]:
    return [v.tp for v in verdicts if v.target == target and v.expert_parallel == expert_parallel and v.servable]


def serving_layout(verdicts: list[ServeVerdict], gpus: int, target: str = TARGETS[0][0]) -> tuple[int, int] | None:
    """(tensor-parallel, pipeline-parallel) sizes that use `gpus` GPUs where TP = gpus is refused:
    the largest servable TP that divides `gpus`, the rest as pipeline stages (vLLM splits the
    decoder layers between stages; the kernels and group checks see only the TP shard)."""
    servable = servable_tp(verdicts, target)
    if gpus in servable:
        return (gpus, 1)
    fits = [t for t in servable if t < gpus and gpus % t == 0]
    return (max(fits), gpus // max(fits)) if fits else None
