"""The side branches' grid search near the propagating branch's choice (release/awq/grid.py,
`awq.side_grid_window`): which points a window tries, and a pass that uses it on the demo."""

from __future__ import annotations

import pytest

from release.awq.grid import GridMemo, chosen_index, replay, window_order

# stock's grid for n_grid 20 and duo_scaling true: the identity point, then 19 duo points
DUO = [(0.0, False)] + [(i / 18, True) for i in range(19)]
PLAIN = [(i / 19, False) for i in range(20)]
BOTH = [(i / 9, duo) for i in range(10) for duo in (False, True)]


def _search(grid, centre, window, losses):
    """Drive `window_order` as stock's loop does: each loss heard before the next step."""
    heard: list[float] = []
    order = []
    for i in window_order(grid, centre, window, heard):
        order.append(i)
        heard.append(losses[i])
    return order, order[chosen_index(heard)]


def test_a_window_finds_the_whole_grids_minimum_of_a_one_minimum_loss_with_fewer_points():
    losses = [5.0] + [abs(i - 13) + 1.0 for i in range(19)]  # the duo family's minimum at its point 13 (index 14)
    for centre in (12, 14, 16, 1, 19):  # near it, on it, far from it: the window widens until it is inside
        order, picked = _search(DUO, centre, 2, losses)
        assert picked == chosen_index(losses) == 14, centre
        assert order[0] == 0, "the identity point is always tried, first as in stock's grid"
        assert len(order) < len(DUO) or centre == 1, (centre, order)
        assert len(set(order)) == len(order), "no point twice"
    order, _ = _search(DUO, 14, 2, losses)
    assert order == [0, 12, 13, 14, 15, 16], "a centred minimum: the identity and five points"


def test_a_window_keeps_a_local_minimum_and_replay_says_what_that_cost():
    """Two minima: the window around the centre keeps the nearer one, whose loss is higher
    than the whole grid's best. `replay` measures exactly that from whole-grid losses."""
    losses = list(PLAIN)
    losses = [3.0, 1.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0] + [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 1.5, 3.0, 4.0]
    order, picked = _search(PLAIN, 16, 2, losses)
    assert picked == 17 and chosen_index(losses) == 1
    assert 1 not in order
    stats = replay({"GS64": {"m": (PLAIN, 16, losses)}}, 2)
    assert stats["same_choice"] == 0 and stats["searches"] == 1
    assert stats["loss_excess_max"] == pytest.approx(0.5)
    assert stats["tried_points"] == len(order) and stats["of_points"] == 20


def test_the_whole_grid_where_the_families_interleave_or_a_loss_goes_unheard():
    losses = [float(i) for i in range(20)]
    order, _ = _search(BOTH, 7, 1, losses)
    assert order == list(range(20)), "duo_scaling 'both': no window"
    unheard = list(window_order(PLAIN, 10, 1, []))  # nothing heard after the first window: the rest follows
    assert sorted(unheard) == list(range(20)) and unheard[:3] == [9, 10, 11]


def test_the_memo_centres_side_searches_on_the_propagating_choice_and_leaves_other_searches_whole():
    memo = GridMemo(window=1)
    assert memo.points(PLAIN) == PLAIN, "outside a mapping's search (the routed experts' own): the whole grid"
    losses = [abs(i - 6) + 1.0 for i in range(20)]
    memo.begin("m")
    for _ in memo.points(PLAIN):  # the propagating branch: every point
        memo.loss(losses[len(memo._losses)])
    memo.end()
    assert memo.chosen == {"m": 6}
    memo.branch = "GS64"
    side = [abs(i - 7) + 1.0 for i in range(20)]
    memo.begin("m")
    tried = []
    for point in memo.points(PLAIN):
        i = PLAIN.index(point)
        tried.append(i)
        memo.loss(side[i])
    memo.end()
    assert tried == [5, 6, 7, 8], "the window around 6, widened once to reach the side's minimum at 7"
    assert memo.side_chosen == {"GS64": {"m": (7, 1)}}
    assert memo.searched == 4 and memo.full == 20 and memo.widened == 1
    assert memo.to_json()["side_distance"] == {"1": 1}
    memo.branch, memo.window = "GS128", None  # no window: the whole grid, its losses kept for the replay
    memo.begin("m")
    for point in memo.points(PLAIN):
        memo.loss(side[PLAIN.index(point)])
    memo.end()
    assert memo.to_json()["if_windowed"]["1"]["same_choice"] == 1
