"""Can vLLM serve a W4A16 GLM-4-MoE branch at a tensor-parallel size, and with which kernel?

The rules below were read from vLLM's source (main branch, read 2026-11-27; files and commits
named per rule). vLLM picks a kernel per layer in priority order and refuses to load if no
kernel can implement a layer. glmrel replays that choice for every tensor-parallel-sharded
layer class of GLM-4-MoE, so a verdict names the rule that decided it. Versions move: re-read
these files when vLLM changes and update VLLM_SOURCE.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .architecture import Glm4MoeArch

VLLM_SOURCE = {
    "marlin": "vllm/model_executor/layers/quantization/utils/marlin_utils.py @ 007d5005 "
    "(MARLIN_SUPPORTED_GROUP_SIZES, verify_marlin_supports_shape, check_moe_marlin_supports_layer)",
    "machete": "vllm/model_executor/layers/quantization/utils/machete_utils.py + kernels/mixed_precision/machete.py "
    "(SM90 only; group sizes -1/64/128 for fp16/bf16; in % 64, out % 128)",
    "exllama": "vllm/model_executor/layers/quantization/kernels/mixed_precision/exllama.py @ 09b8eba6 "
    "(float16 activations only; in % group; out % 8)",
    "order": "vllm/model_executor/layers/quantization/kernels/mixed_precision/__init__.py "
    "(_POSSIBLE_KERNELS priority: Machete, AllSpark, Marlin, Exllama; AllSpark is per-channel only)",
    "moe": "vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors_moe.py "
    "(WNA16: Marlin MoE if check_moe_marlin_supports_layer, else CompressedTensorsWNA16MoEMethod)",
    "sharding": "vllm/model_executor/parameter.py GroupQuantScaleParameter: group scales of an input-sharded "
    "weight are split across ranks, so input-per-rank must be a multiple of the group size",
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


def _sharding_rule(shape: LayerShape, group_size: int) -> str | None:
    if shape.input_sharded and group_size != -1 and group_size < shape.in_full and shape.in_per_rank % group_size:
        return f"input per rank {shape.in_per_rank} is not a multiple of group size {group_size} (group scales cannot be split)"
    return None


def _linear_kernel(shape: LayerShape, group_size: int, cc: int, act: str) -> LayerVerdict:
    """Replay choose_mp_linear_kernel: Machete, (AllSpark: per-channel only), Marlin, Exllama."""
    if reason := _sharding_rule(shape, group_size):
        return LayerVerdict(shape.name, None, reason)
    k, n = shape.in_per_rank, shape.out_per_rank
    reasons = []
    if cc != 90:
        reasons.append("Machete needs SM90")
    elif group_size not in (-1, 64, 128):
        reasons.append(f"Machete: group size {group_size} not in (-1, 64, 128)")
    elif k % 64:
        reasons.append(f"Machete: input {k} % 64 != 0")
    elif n % 128:
        reasons.append(f"Machete: output {n} % 128 != 0")
    else:
        return LayerVerdict(shape.name, "Machete", f"SM90, group {group_size}, in {k} % 64 == 0, out {n} % 128 == 0")
    if group_size not in (-1, 32, 64, 128):
        reasons.append(f"Marlin: group size {group_size} not in (-1, 32, 64, 128)")
    elif n % 64:
        reasons.append(f"Marlin: output per rank {n} % 64 != 0")
    elif k % 128:
        reasons.append(f"Marlin: input per rank {k} % 128 != 0")
    elif group_size != -1 and group_size < shape.in_full and k % group_size:
        reasons.append(f"Marlin: input per rank {k} % group size {group_size} != 0")
    else:
        return LayerVerdict(shape.name, "Marlin", f"out {n} % 64 == 0, in {k} % 128 == 0")
    if act != "float16":
        reasons.append(f"Exllama: needs float16 activations, model runs {act}")
    elif n % 8:
        reasons.append(f"Exllama: output {n} % 8 != 0")
    else:
        return LayerVerdict(shape.name, "Exllama", "; ".join(reasons) + "; Exllama takes float16")
    return LayerVerdict(shape.name, None, "no kernel: " + "; ".join(reasons))


def _moe_kernel(arch: Glm4MoeArch, intermediate_per_rank: int, group_size: int) -> LayerVerdict:
    """Replay the compressed-tensors WNA16 MoE choice: Marlin MoE, else the Triton WNA16 method."""
    name = "routed experts"
    need = max(64, group_size)
    if arch.hidden_size % 128:
        why = f"Marlin MoE: hidden_size {arch.hidden_size} % 128 != 0"
    elif intermediate_per_rank % need:
        why = f"Marlin MoE: moe_intermediate_size per rank {intermediate_per_rank} % max(64, {group_size}) != 0"
    else:
        return LayerVerdict(
            name, "MarlinMoE", f"hidden {arch.hidden_size} % 128 == 0, {intermediate_per_rank} % {need} == 0"
        )
    if group_size != -1 and intermediate_per_rank % group_size:
        return LayerVerdict(
            name,
            None,
            why
            + f"; Triton WNA16 MoE: {intermediate_per_rank} % group size {group_size} != 0 (w2 group scales cannot be split)",
        )
    return LayerVerdict(name, "TritonWNA16MoE", why)


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
                    verdicts.append(_moe_kernel(arch, per_rank, group_size))
                out.append(ServeVerdict(tp, ep, label, act_dtype, all(v.kernel for v in verdicts), verdicts))
    return out


def servable_tp(verdicts: list[ServeVerdict], target: str = TARGETS[0][0], expert_parallel: bool = False) -> list[int]:
    return [v.tp for v in verdicts if v.target == target and v.expert_parallel == expert_parallel and v.servable]
