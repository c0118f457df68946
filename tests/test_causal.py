"""Causal attention in the search (release/awq/causal.py): which masks are dropped, and that
dropping one leaves attention's output as it was."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from release.awq.causal import CausalMasks, causal_sdpa, is_causal_mask


def _eager(q: int, dtype=torch.float32, b: int = 1) -> torch.Tensor:
    """The mask eager attention's pipeline caches: 0 where a query attends, the minimum elsewhere."""
    return torch.full((q, q), torch.finfo(dtype).min, dtype=dtype).triu(1).expand(b, 1, q, q).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_eager_causal_mask_is_recognized(dtype):
    assert is_causal_mask(_eager(9, dtype))
    assert is_causal_mask(_eager(9, dtype, b=3))
    inf = torch.zeros(9, 9, dtype=dtype).masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    assert is_causal_mask(inf[None, None])
    assert is_causal_mask(torch.ones(9, 9, dtype=torch.bool).tril()[None, None])


def test_any_other_mask_is_kept():
    base = _eager(8)
    padded = base.clone()
    padded[..., :, 0] = torch.finfo(torch.float32).min  # a left-padded first token
    window = base.clone()
    window[..., 7, 0] = torch.finfo(torch.float32).min  # a sliding window
    soft = base.clone()
    soft[..., 3, 1] = -1.0  # an additive bias, not a mask
    weak = base.clone()
    weak[..., 0, 5] = -1e4  # a large negative that is not the minimum
    rows = _eager(8, b=2)
    rows[1, ..., 6, 2] = torch.finfo(torch.float32).min  # one batch row padded
    offset = torch.zeros(1, 1, 4, 8)  # queries after a cache: not SDPA's top-left causal pattern
    for mask in (padded, window, soft, weak, rows, offset, base[0], base.long(), None, _eager(1)):
        assert not is_causal_mask(mask)
    assert not is_causal_mask(torch.ones(8, 8, dtype=torch.bool)[None, None])


def test_a_verdict_is_kept_while_its_mask_lives():
    masks, stats = CausalMasks(), SimpleNamespace(causal_search_forwards=0)
    mask = _eager(6)
    batches = [{"hidden_states": torch.zeros(1, 6, 4), "attention_mask": mask} for _ in range(3)]
    out = list(masks.dropped_from(iter(batches), stats))
    assert [b["attention_mask"] for b in out] == [None] * 3
    assert masks.checked == 1 and masks.dropped == 3 and stats.causal_search_forwards == 3
    assert all(b["attention_mask"] is mask for b in batches), "the cache's own batches are left as they were"
    other = _eager(6)  # an equal mask, another tensor: checked on its own
    list(masks.dropped_from(iter([{"attention_mask": other}]), stats))
    assert masks.checked == 2
    kept = [{"attention_mask": torch.zeros(1, 1, 6, 6)}, {"hidden_states": torch.zeros(1, 6, 4)}]
    assert list(masks.dropped_from(iter(kept), stats)) == kept


def _tiny_attention(implementation: str):
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeAttention, Glm4MoeRotaryEmbedding

    from release.tiny import TINY_ARCH

    torch.manual_seed(0)
    smaller = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    cfg = Glm4MoeConfig(**{**TINY_ARCH, **smaller, "num_hidden_layers": 1})
    cfg._attn_implementation = implementation
    return Glm4MoeAttention(cfg, layer_idx=0).eval(), Glm4MoeRotaryEmbedding(cfg)


def test_dropping_the_causal_mask_leaves_the_output_as_it_was():
    """Under SDPA, no mask is its causal kernel: the same attention as the eager mask's, to fp32
    rounding, sample by sample and in merged batches."""
    from release.awq.merge import merged_batches

    attn, rope = _tiny_attention("sdpa")
    assert causal_sdpa(attn)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        h = torch.randn(1, 10, 32, generator=g)
        pos = torch.arange(10)[None]
        batches.append({"hidden_states": h, "position_embeddings": rope(h, pos), "attention_mask": _eager(10)})
    stats = SimpleNamespace(causal_search_forwards=0)
    with torch.no_grad():
        masked = torch.cat([attn(**b)[0] for b in batches])
        dropped = list(merged_batches(CausalMasks().dropped_from(iter(batches), stats), False, 10**6, {}, "attn"))
        assert len(dropped) == 1 and dropped[0]["attention_mask"] is None
        causal = attn(**dropped[0])[0]
    assert stats.causal_search_forwards == 3
    assert torch.allclose(causal, masked, atol=1e-6, rtol=1e-5)


def test_eager_attention_keeps_its_mask():
    """Eager attention adds the mask it is given and nothing else: without one it attends to later
    tokens, so only SDPA's causal attention has its mask dropped."""
    attn, rope = _tiny_attention("eager")
    assert not causal_sdpa(attn)
    h = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(2))
    args = {"hidden_states": h, "position_embeddings": rope(h, torch.arange(10)[None])}
    with torch.no_grad():
        assert not torch.allclose(attn(**args, attention_mask=None)[0], attn(**args, attention_mask=_eager(10))[0])
    attn.is_causal = False
    attn.config._attn_implementation = "sdpa"
    assert not causal_sdpa(attn)


def test_the_passes_causal_attention_takes_only_the_causal_pattern(monkeypatch):
    """causal.calibration_attention (`causal_calibration_attention`): eager attention's function
    replaced so that a call whose mask is exactly the causal pattern runs SDPA's causal kernel,
    the same attention to fp32 rounding; a padded mask, a non-causal module and a call asking for
    attention weights stay eager."""
    from transformers.models.glm4_moe import modeling_glm4_moe

    from release.awq.causal import calibration_attention

    attn, rope = _tiny_attention("eager")
    h = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(3))
    args = {"hidden_states": h, "position_embeddings": rope(h, torch.arange(10)[None])}
    padded = _eager(10).clone()
    padded[..., :2] = torch.finfo(torch.float32).min  # the first two keys are padding
    with torch.no_grad():
        eager = {name: attn(**args, attention_mask=m)[0] for name, m in (("causal", _eager(10)), ("padded", padded))}
    stock = modeling_glm4_moe.eager_attention_forward
    stats = SimpleNamespace(causal_calibration_forwards=0)
    monkeypatch.setattr(
        modeling_glm4_moe, "eager_attention_forward", calibration_attention(stock, CausalMasks(), stats)
    )
    with torch.no_grad():
        causal = attn(**args, attention_mask=_eager(10))[0]
        assert stats.causal_calibration_forwards == 1
        assert torch.allclose(causal, eager["causal"], atol=1e-6, rtol=1e-5) and not torch.equal(
            causal, eager["padded"]
        )
        assert torch.equal(attn(**args, attention_mask=padded)[0], eager["padded"]), "padding keeps eager"
        _out, weights = attn(**args, attention_mask=_eager(10), output_attentions=True)
        assert weights is not None, "attention weights asked for: eager"
        attn.is_causal = False
        assert torch.equal(attn(**args, attention_mask=_eager(10))[0], eager["causal"])
    assert stats.causal_calibration_forwards == 1
