import pytest

from release.architecture import Glm4MoeArch
from release.errors import ReleaseError

# GLM-4.7's config.json fields that glmrel reads (from the public model card / config).
GLM47 = {
    "architectures": ["Glm4MoeForCausalLM"],
    "model_type": "glm4_moe",
    "hidden_size": 5120,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 92,
    "first_k_dense_replace": 3,
    "n_routed_experts": 160,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "num_attention_heads": 96,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151552,
    "num_nextn_predict_layers": 1,
    "attention_bias": True,
    "use_qk_norm": True,
    "tie_word_embeddings": False,
}


def test_glm47_layout():
    a = Glm4MoeArch.from_config(GLM47)
    assert a.dense_layers == [0, 1, 2]
    assert a.moe_layers == list(range(3, 92))
    assert a.mtp_layers == [92]
    shapes = a.quantized_linear_shapes(3)
    assert shapes["self_attn.q_proj"] == (12288, 5120)
    assert shapes["self_attn.o_proj"] == (5120, 12288)
    assert shapes["mlp.experts.159.down_proj"] == (5120, 1536)
    assert shapes["mlp.shared_experts.up_proj"] == (1536, 5120)
    assert len(shapes) == 4 + 160 * 3 + 3
    for gs in (32, 64, 128, -1):
        a.check_group_size(gs)


def test_not_glm_is_rejected_with_a_hint():
    with pytest.raises(ReleaseError) as e:
        Glm4MoeArch.from_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    assert "not a GLM-4-MoE model" in e.value.message
    assert "Glm4MoeForCausalLM" in e.value.hint


def test_group_size_must_divide_every_quantized_input_dim():
    a = Glm4MoeArch.from_config({**GLM47, "moe_intermediate_size": 1504})
    a.check_group_size(32)
    with pytest.raises(ReleaseError, match="group_size 64 of branch B does not divide the input dimension 1504"):
        a.check_group_size(64, "B")


def test_missing_config_json(tmp_path):
    with pytest.raises(ReleaseError, match="has no config.json"):
        Glm4MoeArch.from_dir(tmp_path)


def test_the_demo_corpus_is_the_pinned_bytes(monkeypatch):
    """The demo's weights are pinned to the shipped corpus: other bytes are refused by name."""
    import release.tiny as tiny
    from release.errors import ReleaseError

    train, heldout = tiny.corpus_texts()
    assert len(train) == 48 and len(heldout) == 8 and sum(map(len, train)) > 1_500_000
    monkeypatch.setattr(tiny, "CORPUS_SHA256", "0" * 64)
    with pytest.raises(ReleaseError) as e:
        tiny.corpus_bytes()
    assert "demo_corpus.json.xz has sha256 0bd0fcf962c1, not the pinned 000000000000" in e.value.message
    assert "git checkout release/data" in (e.value.hint or "")
