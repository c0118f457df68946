"""glmrel's layer-aware AWQ mappings vs. llm-compressor's registry mappings for GLM-4-MoE."""

import re
from pathlib import Path

import pytest
import torch
import yaml

from release.architecture import Glm4MoeArch
from release.build.recipe import recipe_weight_args, render_recipe
from release.config import AwqSpec, BranchSpec
from tests.test_architecture import GLM47

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "recipes" / "glm4moe_awq_w4a16.yaml.j2"


def _mappings(recipe_text: str) -> list[dict]:
    return yaml.safe_load(recipe_text)["quant_stage"]["quant_modifiers"]["AWQModifier"]["mappings"]


def test_glm47_recipe_is_layer_aware():
    text = render_recipe(TEMPLATE, Glm4MoeArch.from_config(GLM47), BranchSpec(name="B", group_size=64), AwqSpec())
    maps = {m["smooth_layer"]: m["balance_layers"] for m in _mappings(text)}
    dense = r"re:.*layers\.(0|1|2)\.post_attention_layernorm$"
    moe = r"re:.*layers\.(" + "|".join(map(str, range(3, 92))) + r")\.post_attention_layernorm$"
    assert maps[dense] == ["re:.*mlp.gate_proj$", "re:.*mlp.up_proj$"]
    assert set(maps[moe]) == {
        "re:.*mlp.gate$",
        "re:.*mlp.experts.*.gate_proj$",
        "re:.*mlp.experts.*.up_proj$",
        "re:.*mlp.shared_experts.gate_proj$",
        "re:.*mlp.shared_experts.up_proj$",
    }
    w = recipe_weight_args(text)
    assert w == {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": 64,
        "dynamic": False,
    }
    ignore = yaml.safe_load(text)["quant_stage"]["quant_modifiers"]["QuantizationModifier"]["ignore"]
    assert "lm_head" in ignore


def test_no_dense_prefix_renders_no_dense_mapping():
    arch = Glm4MoeArch.from_config({**GLM47, "first_k_dense_replace": 0})
    text = render_recipe(TEMPLATE, arch, BranchSpec(name="B", group_size=32), AwqSpec())
    assert not any("mlp.gate_proj$" in b for m in _mappings(text) for b in m["balance_layers"])


@pytest.fixture(scope="module")
def tiny_linearized(demo_assets):
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_assets.model, dtype=torch.float32).eval()
    linearize_moe(model)
    arch = Glm4MoeArch.from_dir(demo_assets.model)
    text = render_recipe(TEMPLATE, arch, BranchSpec(name="B", group_size=32), AwqSpec())
    # find the consumers on the clean model: the quantization config below adds fake-quant
    # with uninitialised scales to the forward pass
    consumers = {layer: _norm_consumers(model, layer) for layer in range(arch.num_hidden_layers)}
    qm = yaml.safe_load(text)["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    apply_quantization_config(model, QuantizationConfig(config_groups=qm["config_groups"], ignore=qm["ignore"]))
    return model, arch, text, consumers


def _resolve(model, mappings):
    from llmcompressor.modifiers.transform.awq import AWQModifier

    mod = AWQModifier(mappings=mappings)
    mod._set_resolved_mappings(model)
    return {m.smooth_name: set(m.balance_names) for m in mod._resolved_mappings}


def test_stock_registry_mappings_fail_on_a_dense_prefix(tiny_linearized):
    """The bug glmrel works around (llm-compressor 0.14.0.1)."""
    from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY

    model, arch, _, _ = tiny_linearized
    assert arch.first_k_dense_replace == 1
    with pytest.raises(ValueError, match="AWQ needs to match a single smoothlayer"):
        _resolve(model, AWQ_MAPPING_REGISTRY["Glm4MoeForCausalLM"])


def _norm_consumers(model, layer: int) -> set[str]:
    """Modules whose input *is* post_attention_layernorm's output, found by running the model."""
    from llmcompressor.modeling.moe.context import moe_calibration_context

    block = model.model.layers[layer]
    seen: dict[str, torch.Tensor] = {}
    consumers: set[str] = set()
    handles = [block.post_attention_layernorm.register_forward_hook(lambda m, i, o: seen.__setitem__("norm", o))]
    prefix = f"model.layers.{layer}."
    for name, mod in block.mlp.named_modules():
        if isinstance(mod, torch.nn.Linear) or name == "gate":

            def pre(m, args, name=name):
                x = args[0]
                ref = seen["norm"].reshape(-1, seen["norm"].shape[-1])
                if x.reshape(-1, x.shape[-1]).shape == ref.shape and torch.equal(x.reshape(ref.shape), ref):
                    consumers.add(prefix + "mlp." + name)

            handles.append(mod.register_forward_pre_hook(pre))
    with torch.no_grad(), moe_calibration_context():
        model(input_ids=torch.arange(40)[None] + 100)
    for h in handles:
        h.remove()
    return consumers


def test_glmrel_mappings_compensate_every_consumer_of_each_smoothed_norm(tiny_linearized):
    model, arch, text, all_consumers = tiny_linearized
    resolved = _resolve(model, _mappings(text))
    for layer in range(arch.num_hidden_layers):
        norm = f"model.layers.{layer}.post_attention_layernorm"
        consumers = all_consumers[layer]
        assert consumers, f"no consumers found for {norm}"
        assert resolved[norm] == consumers, (
            f"{norm}: smoothed {sorted(resolved[norm])} != consumers {sorted(consumers)}"
        )
        if layer in arch.moe_layers:
            assert f"model.layers.{layer}.mlp.gate" in consumers
            assert f"model.layers.{layer}.mlp.shared_experts.up_proj" in consumers
            assert sum(bool(re.search(r"experts\.\d+\.gate_proj$", c)) for c in consumers) == arch.n_routed_experts
