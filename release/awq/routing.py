"""Routing reuse in the search: the MoE block's router computed once per merged batch of a
mapping's search, not at each of its 21 forwards.

In the grid search of a MoE block, only the balance layers' weights change between forwards
(the experts' and the shared expert's gate and up projections); the router (`mlp.gate`) is a
balance layer without a weight scheme, which the search leaves alone, and its input is the
cached one. So the top-k the reference forward computes for a merged batch is the top-k of
every grid point: the same bits, without the router's fp32 product, sigmoid and top-k (1.6 ms a
16k-token batch of GLM-4.7 on an H200, about a tenth of the block's forward).

A call is matched to the reference forward's call by its place in the search's sequence of
forwards (the cache is iterated in the same order each time) and must have the same router,
router weight (storage and version), input shape, dtype and device; the first reuse of each
mapping is recomputed and compared bit for bit, and a mismatch turns reuse off for the run.
The record is dropped when the mapping's search ends (`forget`), before smoothing changes the
router's weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def expert_counts(index: Any, n: int) -> Any:
    """How often each of 0..n-1 occurs in the integer tensor `index` (`torch.bincount(index,
    minlength=n)` where every value is below n), left on its device without waiting for it:
    CUDA's bincount first reads the input's maximum back to the host to size its output, one
    synchronization a call (two a sample in the MoE layer's calibration pass, 2.4 ms each in
    benchmarks/results/2026-12-06-profile-calibration-pass/call1)."""
    import torch

    flat = index.reshape(-1)
    counts = torch.zeros(n, dtype=torch.long, device=flat.device)
    return counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.long))


def _key(router: Any, hidden: Any) -> tuple[Any, ...]:
    weight = router.weight
    bias = getattr(router, "e_score_correction_bias", None)
    return (
        id(router),
        weight.data_ptr(),
        weight._version,
        None if bias is None else (bias.data_ptr(), bias._version),
        tuple(hidden.shape),
        hidden.dtype,
        hidden.device,
    )


def _equal(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return bool(a == b)


class RoutingMemo:
    """The router's outputs of one mapping's search, in call order."""

    def __init__(self) -> None:
        self.parent: Any = None  # the MoE block whose search is running (None: no reuse)
        self.calls: list[tuple[tuple[Any, ...], Any]] = []
        self.index = 0
        self.checked = False  # the mapping's first reuse was recomputed and compared
        self.disabled: str | None = None  # why reuse is off for the run
        self.reused = 0

    def start(self, parent: Any) -> None:
        """A forward pass of `parent` over the cache begins (the reference or a grid point)."""
        if self.disabled is not None:
            return
        if parent is not self.parent:
            self.forget()
            self.parent = parent
        self.index = 0

    def forget(self) -> None:
        self.parent, self.calls, self.index, self.checked = None, [], 0, False

    def route(self, router: Any, hidden: Any, stock: Callable[[Any, Any], Any]) -> Any:
        if self.parent is None or self.disabled is not None:
            return stock(router, hidden)
        key, i = _key(router, hidden), self.index
        self.index += 1
        if i < len(self.calls) and self.calls[i][0] == key:
            kept = self.calls[i][1]
            if not self.checked:
                self.checked = True
                if not _equal(stock(router, hidden), kept):
                    self.disabled = "a recomputed routing differed from the reference forward's"
                    self.forget()
                    return stock(router, hidden)
            self.reused += 1
            return kept
        out = stock(router, hidden)
        if i < len(self.calls):
            self.calls[i] = (key, out)
        else:
            self.calls.append((key, out))
        return out
