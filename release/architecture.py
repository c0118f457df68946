"""What a GLM-4-MoE checkpoint must contain, derived from its own config.json.

Light on purpose (no torch): `check` uses it in CI, `quantize` uses it to reject a model or
group size before any heavy work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ReleaseError

GLM4_MOE_ARCHITECTURES = ("Glm4MoeForCausalLM",)


@dataclass(frozen=True)
class Glm4MoeArch:
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_nextn_predict_layers: int
    attention_bias: bool
    use_qk_norm: bool
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, cfg: dict, source: str = "config.json") -> Glm4MoeArch:
        archs = cfg.get("architectures") or []
        if cfg.get("model_type") != "glm4_moe" and not any(a in GLM4_MOE_ARCHITECTURES for a in archs):
            raise ReleaseError(
                f"{source} describes model_type={cfg.get('model_type')!r} {archs}, not a GLM-4-MoE model",
                hint="glmrel builds Glm4MoeForCausalLM checkpoints (GLM-4.5/4.6/4.7); point base_model at one",
            )
        try:
            heads = int(cfg["num_attention_heads"])
            return cls(
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                first_k_dense_replace=int(cfg.get("first_k_dense_replace", 0)),
                n_routed_experts=int(cfg["n_routed_experts"]),
                n_shared_experts=int(cfg.get("n_shared_experts") or 0),
                num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads", heads)),
                head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
                vocab_size=int(cfg["vocab_size"]),
                num_nextn_predict_layers=int(cfg.get("num_nextn_predict_layers") or 0),
                attention_bias=bool(cfg.get("attention_bias", False)),
                use_qk_norm=bool(cfg.get("use_qk_norm", False)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise ReleaseError(f"{source} lacks the GLM-4-MoE field {e.args[0]!r}") from e

    @classmethod
    def from_dir(cls, model_dir: Path) -> Glm4MoeArch:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ReleaseError(
                f"{model_dir} has no config.json",
                hint="base_model.path must be a Hugging Face model folder (config.json, *.safetensors, tokenizer)",
            )
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
            raise ReleaseError(
                f"{path} is not readable JSON: {e}",
                hint="base_model.path must be a Hugging Face model folder; download the model again",
            ) from e
        return cls.from_config(cfg, str(path))

    @property
    def dense_layers(self) -> list[int]:
        return list(range(min(self.first_k_dense_replace, self.num_hidden_layers)))

    @property
    def moe_layers(self) -> list[int]:
        return list(range(self.first_k_dense_replace, self.num_hidden_layers))

    @property
    def mtp_layers(self) -> list[int]:
        n = self.num_hidden_layers
        return list(range(n, n + self.num_nextn_predict_layers))

    def quantized_linear_shapes(self, layer: int) -> dict[str, tuple[int, int]]:
        """Every Linear that W4A16 quantizes in decoder layer `layer`: suffix -> (out, in)."""
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        shapes = {
            "self_attn.q_proj": (q, h),
            "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q),
        }
        if layer < self.first_k_dense_replace:
            i = self.intermediate_size
            shapes |= {"mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
        else:
            m = self.moe_intermediate_size
            for e in range(self.n_routed_experts):
                shapes |= {
                    f"mlp.experts.{e}.gate_proj": (m, h),
                    f"mlp.experts.{e}.up_proj": (m, h),
                    f"mlp.experts.{e}.down_proj": (h, m),
                }
            if self.n_shared_experts:
                s = m * self.n_shared_experts
                shapes |= {
                    "mlp.shared_experts.gate_proj": (s, h),
                    "mlp.shared_experts.up_proj": (s, h),
                    "mlp.shared_experts.down_proj": (h, s),
                }
        return shapes

    def quantized_input_dims(self) -> dict[str, int]:
        """Distinct input dimensions of quantized Linears, keyed by an example module."""
        dims: dict[str, int] = {}
        for layer in sorted({0, self.first_k_dense_replace} & set(range(self.num_hidden_layers))):
            for name, (_, in_dim) in self.quantized_linear_shapes(layer).items():
                dims.setdefault(f"model.layers.{layer}.{name}", in_dim)
        return dims

    def check_group_size(self, group_size: int, branch: str = "") -> None:
        if group_size == -1:
            return
        for module, in_dim in self.quantized_input_dims().items():
            if in_dim % group_size:
                raise ReleaseError(
                    f"group_size {group_size}{f' of branch {branch}' if branch else ''} does not divide the input "
                    f"dimension {in_dim} of {module}",
                    hint="choose a group size that divides every quantized layer's input dimension",
                )
