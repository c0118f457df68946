"""MoE-aware calibration: every expert sees every token, and the layer output is top-k routing's."""

import json

import torch

from release.build.coverage import count_expert_tokens


def test_all_experts_see_every_token_and_outputs_are_unchanged(demo_assets):
    from llmcompressor.modeling.moe.context import moe_calibration_context
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stock = AutoModelForCausalLM.from_pretrained(demo_assets.model, dtype=torch.float32).eval()
    lin = linearize_moe(AutoModelForCausalLM.from_pretrained(demo_assets.model, dtype=torch.float32).eval())
    tok = AutoTokenizer.from_pretrained(demo_assets.model)
    rows = [json.loads(line) for line in demo_assets.calibration.read_text().splitlines()[:8]]
    batches = [
        tok(tok.apply_chat_template(r["messages"], tokenize=False), return_tensors="pt", add_special_tokens=False)[
            "input_ids"
        ][:, :128]
        for r in rows
    ]
    n_tokens = sum(b.numel() for b in batches)
    n_experts = stock.config.n_routed_experts

    results = {}
    for all_experts in (False, True):
        with torch.no_grad(), count_expert_tokens(lin, n_experts) as counts:
            ctx = moe_calibration_context() if all_experts else torch.no_grad()
            with ctx:
                diffs = [(stock(input_ids=b).logits - lin(input_ids=b).logits).abs().max().item() for b in batches]
        results[all_experts] = counts
        assert max(diffs) < 1e-4, f"layer output changed (all_experts={all_experts}): {max(diffs)}"

    top_k = stock.config.num_experts_per_tok
    for layer, calibrated in results[True]["calibrated"].items():
        assert calibrated == [n_tokens] * n_experts, f"layer {layer}: {calibrated}"
        assert sum(results[True]["routed"][layer]) == n_tokens * top_k
    uneven = 0
    for layer, calibrated in results[False]["calibrated"].items():
        assert calibrated == results[False]["routed"][layer]  # plain routing: an expert sees what it is sent
        uneven += max(calibrated) != min(calibrated)
    assert uneven == len(results[False]["calibrated"]), "routing on the trained demo model should be uneven"
