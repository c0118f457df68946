"""Routing reuse in the search (release/awq/routing.py): the reference forward's router outputs
answer the grid points' calls in the same order, and nothing else."""

from __future__ import annotations

import torch

from release.awq.routing import RoutingMemo


class _Router(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 6))
        self.e_score_correction_bias = torch.zeros(4)
        self.calls = 0


def _stock(router: _Router, hidden: torch.Tensor):
    router.calls += 1
    logits = hidden @ router.weight.T + router.e_score_correction_bias
    return logits, logits.topk(2).values, logits.topk(2).indices


def _pass(memo: RoutingMemo, parent, router, batches):
    memo.start(parent)
    return [memo.route(router, b, _stock) for b in batches]


def test_the_grid_points_reuse_the_reference_forwards_routing():
    memo, router, parent = RoutingMemo(), _Router(), object()
    batches = [torch.randn(5, 6), torch.randn(3, 6)]
    reference = _pass(memo, parent, router, batches)
    assert router.calls == 2
    first = _pass(memo, parent, router, batches)  # the first reuse is recomputed and compared
    assert router.calls == 3 and memo.checked
    for _ in range(3):
        again = _pass(memo, parent, router, batches)
        assert all(a is r for a, r in zip(again, reference))
    assert router.calls == 3 and memo.reused == 8 and first[0] is reference[0]
    memo.forget()  # the mapping's search ended: its smoothing changes the router next
    _pass(memo, parent, router, batches)
    assert router.calls == 5


def test_a_changed_router_or_batch_is_routed_anew():
    memo, router, parent = RoutingMemo(), _Router(), object()
    batches = [torch.randn(5, 6), torch.randn(3, 6)]
    _pass(memo, parent, router, batches)
    with torch.no_grad():
        router.weight.mul_(2)  # smoothed in place: its version moves
    _pass(memo, parent, router, batches)
    assert router.calls == 4 and memo.reused == 0
    _pass(memo, parent, router, [batches[1], batches[0]])  # other shapes at each place
    assert router.calls == 6 and memo.reused == 0
    _pass(memo, object(), router, [batches[1], batches[0]])  # another parent: a record of its own
    assert router.calls == 8 and memo.reused == 0


def test_outside_a_search_the_router_runs_as_it_is():
    memo, router = RoutingMemo(), _Router()
    x = torch.randn(5, 6)
    memo.route(router, x, _stock)
    memo.route(router, x, _stock)
    assert router.calls == 2 and memo.reused == 0


def test_a_reuse_that_would_differ_turns_reuse_off():
    """Were the router's input not the cached one (a bug in the matching), the checked first reuse
    differs from what the router gives now: reuse stops for the run, and the fresh output is used."""
    memo, router, parent = RoutingMemo(), _Router(), object()
    _pass(memo, parent, router, [torch.randn(5, 6)])
    other = torch.randn(5, 6)
    (out,) = _pass(memo, parent, router, [other])
    assert memo.disabled and memo.reused == 0
    assert torch.equal(out[0], _stock(router, other)[0])
    _pass(memo, parent, router, [other])
    assert memo.reused == 0


def test_expert_counts_are_bincounts_without_a_wait():
    """The counts the fused experts and the coverage hook take (expert_counts) are bincount's,
    for any shape of top-k index, including experts no token chose."""
    from release.awq.routing import expert_counts

    gen = torch.Generator().manual_seed(0)
    for n, shape in ((160, (2048, 8)), (7, (5, 2)), (4, (0, 2))):
        index = torch.randint(0, max(1, n - 2), shape, generator=gen)  # the last experts unchosen
        counts = expert_counts(index, n)
        assert counts.dtype == torch.long and counts.shape == (n,)
        assert torch.equal(counts, torch.bincount(index.reshape(-1), minlength=n))
