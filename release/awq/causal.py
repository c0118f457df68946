"""Causal attention in the search: a cached attention mask that is exactly the causal pattern is
left out of the grid search's attention forwards, so SDPA runs its causal kernel.

The calibration forward runs eager attention (llm-compressor forces it), whose pipeline caches
the causal mask materialized, [b, 1, q, k]: 0 where a query may attend and the dtype's minimum
elsewhere. Given a mask, transformers' SDPA path computes every query against every key, adds
the mask, and repeats the 8 key/value heads to 96 (no GQA kernel with a mask). Without one it
asks SDPA for `is_causal` and `enable_gqa`: half the products and no repeated heads. The two
compute the same softmax (a masked score's exp(min - max) is 0 in fp32, a skipped one is not
added), through different kernels, so the outputs agree up to the last bits of bf16: the
reference output and every grid point take the same path, so the loss compares like with like.

A mask is dropped only when it is exactly that pattern (queries = keys, every batch row the
same, 0 on and below the diagonal, -inf or the dtype's minimum above it, or the equivalent
boolean mask); padding, sliding windows or a cache offset keep their mask.

`causal_calibration_attention` (off by default) does the same in the pipeline's calibration and
propagation passes, which llm-compressor runs under eager attention: eager's function is
replaced, for the run, by one that hands a call whose mask is exactly the causal pattern to
transformers' SDPA attention without the mask (its causal GQA kernel), and every other call to
eager. Unlike the search, this changes the last bits of what the statistics and the next layer
see, so it waits for a GPU side-by-side of the chosen scales.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import Any

MASK_KEY = "attention_mask"


def is_causal_mask(mask: Any) -> bool:
    """Whether `mask` is exactly the causal pattern of a forward without a cache."""
    import torch

    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
        return False
    q, k = mask.shape[-2:]
    if q != k or q < 2:
        return False
    keep = torch.ones(q, k, dtype=torch.bool, device=mask.device).tril_()
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, keep.expand_as(mask)))
    if not mask.is_floating_point():
        return False
    lowest = torch.finfo(mask.dtype).min
    blocked = (mask == lowest) | torch.isneginf(mask)
    return bool(((mask == 0) == keep).all() and (blocked == ~keep).all())


def causal_sdpa(module: Any) -> bool:
    """Whether `module` is a causal attention that runs through SDPA now (where no mask means
    SDPA's causal kernel; eager attention without a mask would attend to every key)."""
    config = getattr(module, "config", None)
    return getattr(module, "is_causal", False) is True and getattr(config, "_attn_implementation", None) == "sdpa"


class CausalMasks:
    """Verdicts on the masks seen, by tensor (weakly held: a mask is checked once while it lives,
    and nothing is kept alive for it)."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref[Any], bool]] = {}
        self.checked = 0
        self.dropped = 0

    def causal(self, mask: Any) -> bool:
        held = self._seen.get(id(mask))
        if held is not None and held[0]() is mask:
            return held[1]
        verdict = is_causal_mask(mask)
        self.checked += 1
        if len(self._seen) > 256:  # masks made anew for each batch: forget the dead ones
            self._seen = {key: v for key, v in self._seen.items() if v[0]() is not None}
        self._seen[id(mask)] = (weakref.ref(mask), verdict)
        return verdict

    def dropped_from(self, batches: Iterable[dict[str, Any]], stats: Any) -> Iterator[dict[str, Any]]:
        """The batches, each with its attention mask left out where it is the causal pattern
        (a new dict: the cache's own is left as it was), counted in `stats.causal_search_forwards`."""
        for batch in batches:
            mask = batch.get(MASK_KEY)
            if mask is not None and self.causal(mask):
                self.dropped += 1
                stats.causal_search_forwards += 1
                yield {**batch, MASK_KEY: None}
            else:
                yield batch


def calibration_attention(stock: Any, masks: CausalMasks, stats: Any) -> Any:
    """Eager attention's replacement under `causal_calibration_attention` (module docstring):
    `stock` (eager) unless the call is a causal attention over its own keys (no cache offset)
    whose mask is exactly the causal pattern and no attention weights are asked for; those run
    SDPA's causal kernel, counted in `stats.causal_calibration_forwards`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        if (
            attention_mask is None
            or kwargs.get("output_attentions")
            or getattr(module, "is_causal", False) is not True
            or query.shape[-2] != key.shape[-2]
            or not masks.causal(attention_mask)
        ):
            return stock(module, query, key, value, attention_mask, **kwargs)
        stats.causal_calibration_forwards += 1
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    return attention
