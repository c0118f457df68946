"""Resident caches (release/awq/caches.py): values equal for every sample stored once, and a
parent cache that is handed the very tensors of the previous sample neither copies nor compares
them (a compare is a wait for the GPU there)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


@pytest.fixture
def equal_calls(monkeypatch):
    """torch.equal, counted."""
    calls = []
    real = torch.equal

    def counted(a, b):
        calls.append(tuple(a.shape))
        return real(a, b)

    monkeypatch.setattr(torch, "equal", counted)
    return calls


def _sample(seed: int, mask, rotary):
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(1, 6, 4, generator=g), "wrapped_0": mask, "model_rotary_emb": rotary}


def test_the_pipelines_cache_stores_its_traced_names_once_and_stops_comparing_what_differs(equal_calls):
    """The sequential pipeline's cache names the causal mask and the rotary tables by the traced
    graph's names: each sample's own tensors, equal to the previous sample's, are stored once;
    the hidden states differ, so after the first compare they are never compared again."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    from release.awq.dedup import deduplicate_batch

    cache, unequal = IntermediatesCache(None, None), set()
    mask = torch.triu(torch.full((1, 1, 6, 6), -1e9), 1)
    rotary = (torch.randn(1, 6, 2), torch.randn(1, 6, 2))
    for i in range(4):  # every sample brings fresh but equal tensors, as the embeddings' subgraph makes them
        cache.append(_sample(i, mask.clone(), tuple(t.clone() for t in rotary)))
        deduplicate_batch(cache, i, unequal)
    first = cache.batch_intermediates[0]
    for b in cache.batch_intermediates[1:]:
        assert b["wrapped_0"].value is first["wrapped_0"].value
        assert all(x.value is y.value for x, y in zip(b["model_rotary_emb"].value, first["model_rotary_emb"].value))
        assert b["hidden_states"].value is not first["hidden_states"].value
    assert unequal == {"hidden_states"} and not any(k.startswith("_glmrel") for k in vars(cache))
    # samples 1-3: the mask and both tables each time, the hidden states once
    assert sorted(equal_calls).count((1, 6, 4)) == 1 and len(equal_calls) == 3 * 3 + 1


def _resident_cache():
    from llmcompressor.pipelines.cache import IntermediatesCache

    from release.awq.caches import Ledger, cache_classes
    from release.awq.stats import ScaleStats

    engine = SimpleNamespace(ledger=Ledger(2**30), stats=ScaleStats(), stock_update=IntermediatesCache.update)
    return cache_classes()[2](engine, torch.device("cpu")), engine


def test_a_parent_cache_handed_the_same_tensors_neither_copies_nor_compares_them(equal_calls):
    """AWQ's cache of an attention's inputs, as the pipeline hands it one mask and one pair of
    rotary tables for every sample (stored once above): from the second sample on it keeps the
    first sample's stored values without a copy or a compare, and a tensor written in place
    since is copied and compared again."""
    cache, engine = _resident_cache()
    mask = torch.triu(torch.full((1, 1, 6, 6), -1e9), 1)
    rotary = (torch.randn(1, 6, 2), torch.randn(1, 6, 2))
    for i in range(3):
        cache.append({**_sample(i, mask, tuple(rotary)), "position_ids": None})
    stored = cache.batch_intermediates
    assert stored[0]["wrapped_0"].value is not mask, "the resident cache keeps copies"
    assert stored[1]["wrapped_0"] is stored[2]["wrapped_0"] is stored[0]["wrapped_0"]
    assert stored[2]["model_rotary_emb"] is stored[0]["model_rotary_emb"]
    assert equal_calls == [(1, 6, 4)], "only the hidden states, once, to learn that they differ"
    assert engine.stats.resident_batches == 3 and engine.stats.deduplicated_values >= 4
    held = engine.ledger.used
    mask[0, 0, 0, 1] = 0.0  # written in place: not the tensor the last sample brought any more
    cache.append({**_sample(3, mask, tuple(rotary)), "position_ids": None})
    assert stored[3]["wrapped_0"] is not stored[0]["wrapped_0"]
    assert torch.equal(stored[3]["wrapped_0"].value, mask) and not torch.equal(stored[0]["wrapped_0"].value, mask)
    assert stored[3]["model_rotary_emb"] is stored[0]["model_rotary_emb"]
    assert engine.ledger.used - held == stored[3]["hidden_states"].value.nbytes + mask.nbytes
    # every sample's values keep the order the sample brought them in, those stored once among them
    assert all(list(b) == list(stored[0]) for b in stored), [list(b) for b in stored]
