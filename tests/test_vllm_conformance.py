"""glmrel's serving verdicts (release/serving/rules.py) against the pinned vLLM release's own code.

For GLM-4.7 and the demo model, every tensor-parallel-sharded layer class x TP {1, 2, 4, 8, 16}
x expert parallel off/on x group size {32, 64, 128} x {SM90, SM80} x {bf16, fp16}: the linear
layers' kernel (vLLM's `choose_mp_linear_kernel` and its group-split check) must be the one
glmrel names, or both must refuse; the routed experts must be refused by both or by neither
(and on SM80 take the same Marlin / Triton backend). vLLM runs in its own environment
(`make vllm-env`: it pins other compressed-tensors and transformers versions than glmrel) via
tests/vllm_harness.py. Without that environment the test is skipped, saying so; with
GLMREL_REQUIRE_VLLM=1 (`make vllm-conformance`, the CI job) a missing environment fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from release.architecture import Glm4MoeArch
from release.serving.rules import TARGETS, TP_SIZES, VLLM_VERSION, layer_shapes, serve_verdicts

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO / ".vllm-env" / "bin" / "python"
GROUPS = (32, 64, 128)
ACTS = ("bfloat16", "float16")


def _archs() -> dict[str, Glm4MoeArch]:
    from test_architecture import GLM47

    from release.tiny import TINY_ARCH, VOCAB_SIZE

    demo = {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "vocab_size": VOCAB_SIZE, **TINY_ARCH}
    return {"GLM-4.7": Glm4MoeArch.from_config(GLM47), "demo": Glm4MoeArch.from_config(demo)}


def _cases() -> tuple[list[dict], list[tuple]]:
    """Every question, and glmrel's answer to each: (arch, tp, ep, gs, cc, act, layer, kernel)."""
    cases, ours = [], []
    for arch_name, arch in _archs().items():
        for gs in GROUPS:
            for act in ACTS:
                verdicts = {(v.tp, v.expert_parallel, v.target): v for v in serve_verdicts(arch, gs, act)}
                for label, cc in TARGETS:
                    for tp in TP_SIZES:
                        shapes = layer_shapes(arch, tp)
                        if isinstance(shapes, str):  # the model cannot be sharded: no layer to ask about
                            continue
                        for ep in (False, True):
                            layers = {x.layer: x for x in verdicts[(tp, ep, label)].layers}
                            for s in shapes:
                                cases.append(
                                    {
                                        "kind": "linear",
                                        "layer": s.name,
                                        "in_per_rank": s.in_per_rank,
                                        "out_per_rank": s.out_per_rank,
                                        "in_full": s.in_full,
                                        "out_full": s.out_per_rank * (tp if not s.input_sharded else 1),
                                        "group_size": gs,
                                        "cc": cc,
                                        "act": act,
                                    }
                                )
                                ours.append((arch_name, tp, ep, gs, cc, act, s.name, layers[s.name].kernel))
                            per_rank = arch.moe_intermediate_size if ep else arch.moe_intermediate_size // tp
                            cases.append(
                                {
                                    "kind": "moe",
                                    "layer": "routed experts",
                                    "hidden": arch.hidden_size,
                                    "inter_per_rank": per_rank,
                                    "group_size": gs,
                                    "cc": cc,
                                    "act": act,
                                }
                            )
                            ours.append(
                                (arch_name, tp, ep, gs, cc, act, "routed experts", layers["routed experts"].kernel)
                            )
    return cases, ours


def test_verdicts_match_the_pinned_vllm(tmp_path):
    if not VLLM_PYTHON.exists():
        if os.environ.get("GLMREL_REQUIRE_VLLM"):
            pytest.fail(f"no vLLM environment at {VLLM_PYTHON.parent.parent}: run `make vllm-env`")
        pytest.skip(f"skipped: no vLLM {VLLM_VERSION} environment (`make vllm-env` builds it; CI's vllm job runs this)")
    cases, ours = _cases()
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run(
        [
            str(VLLM_PYTHON),
            str(REPO / "tests" / "vllm_harness.py"),
            str(tmp_path / "cases.json"),
            str(tmp_path / "out.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["vllm"] == VLLM_VERSION, f"the environment holds vLLM {out['vllm']}, the rules are {VLLM_VERSION}'s"
    assert len(out["results"]) == len(cases)
    differ = []
    for mine, theirs in zip(ours, out["results"]):
        *key, layer, kernel = mine
        if (kernel is None) != (theirs["kernel"] is None) or (kernel is not None and kernel != theirs["kernel"]):
            differ.append(f"{key} {layer}: glmrel {kernel}, vLLM {theirs['kernel']} {theirs['reason']}")
    refused = sum(r["kernel"] is None for r in out["results"])
    print(f"{len(cases)} decisions compared with vLLM {out['vllm']}; {refused} refused by both")
    assert not differ, f"{len(differ)} of {len(cases)} verdicts differ from vLLM {VLLM_VERSION}:\n" + "\n".join(
        differ[:40]
    )
    assert 0 < refused < len(cases), "both answers and refusals are compared"
