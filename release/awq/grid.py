"""The side branches' grid search near the propagating branch's choice (`awq.side_grid_window`).

A side branch differs from the propagating one only in the group size, and the grid point a
mapping's search picks moves little with it: AWQ's loss over the ratio is smooth, and the
group size shifts its minimum by a step or two. So the propagating branch searches each
mapping over the whole grid, as stock does, and each side branch then searches the points
within `window` steps of that choice, widening the window a step at a time while its best
point lies on an edge the grid goes past. The result is the whole grid's choice whenever the
side branch's loss has one local minimum along the ratio (ties aside: the points are tried
window first, and stock keeps the first of equal losses); a side branch whose minimum lies
elsewhere gets a local one.

Points of another family than the propagating choice (with `duo_scaling: true`, the identity
point `(0.0, False)` stock adds to the duo points) are always searched; so is the whole grid
where the propagating branch chose such a point, or where `duo_scaling` is "both" (its two
families interleave). The routed experts' per-expert searches (experts.py) read the grid
outside `begin`/`end` and always get all of it.

`GridMemo` is the run's (RunState.grid): `begin` and `end` bracket one mapping's search
(`MoeAWQModifier._compute_best_scale`), `loss` hears each grid point's loss
(`_compute_loss`), and `points` is what `_get_grid_search_params` returns. Stock's loop
consumes the points lazily, so each point after the first window is chosen knowing the losses
before it. Every rank gets the same losses (AWQ all-reduces them), so every rank searches the
same points.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

GridPoint = tuple[float, bool]  # (ratio, duo scaling), as `_get_grid_search_params` gives them


def chosen_index(losses: list[float]) -> int | None:
    """The point stock's loop keeps: the first strictly smallest loss (a NaN never)."""
    best, at = float("inf"), None
    for i, loss in enumerate(losses):
        if loss < best:
            best, at = loss, i
    return at


@dataclass
class GridMemo:
    """One run's record of the propagating branch's choices, and the side branches' windows.
    `window` None: every search covers the whole grid (the choices are still recorded)."""

    window: int | None = None
    branch: str | None = None  # the side branch whose layer is being smoothed; None: the propagating one
    chosen: dict[str, int] = field(default_factory=dict)  # smooth name -> the propagating branch's point
    # branch -> smooth name -> (the point chosen, its distance in steps from the propagating choice)
    side_chosen: dict[str, dict[str, tuple[int, int | None]]] = field(default_factory=dict)
    # branch -> smooth name -> (grid, the propagating choice, every point's loss): whole-grid side searches
    side_losses: dict[str, dict[str, tuple[list[GridPoint], int, list[float]]]] = field(default_factory=dict)
    searched: int = 0  # grid points the side branches' searches evaluated ...
    full: int = 0  # ... of this many in their whole grids
    widened: int = 0  # side searches whose window had to grow
    _name: str | None = None
    _grid: list[GridPoint] = field(default_factory=list)
    _order: list[int] = field(default_factory=list)  # grid indices, in the order they were handed out
    _losses: list[float] = field(default_factory=list)

    def begin(self, name: str) -> None:
        self._name, self._grid, self._order, self._losses = name, [], [], []

    def loss(self, value: float) -> None:
        if self._name is not None:
            self._losses.append(float(value))

    def points(self, grid: list[GridPoint]) -> list[GridPoint] | Iterator[GridPoint]:
        """What one search evaluates: all of `grid` outside a mapping's search, for the
        propagating branch, or without a window; else the window (a lazy iterator)."""
        if self._name is None:
            return grid
        self._grid = list(grid)
        centre = self.chosen.get(self._name)
        if self.branch is None or self.window is None or centre is None or centre >= len(grid):
            self._order = list(range(len(grid)))
            return grid
        return self._windowed(grid, centre, self.window)

    def _windowed(self, grid: list[GridPoint], centre: int, window: int) -> Iterator[GridPoint]:
        steps = window_order(grid, centre, window, self._losses)
        for i in steps:
            self._order.append(i)
            yield grid[i]
        self.widened += steps_widened(grid, centre, window, len(self._order))

    def end(self) -> None:
        """The search is over: the propagating branch's choice is kept for the side branches;
        a side branch's is recorded, with its losses where it searched the whole grid (what
        each window would have chosen is then known: `to_json`)."""
        name, self._name = self._name, None
        if name is None or not self._order or len(self._losses) != len(self._order):
            return
        picked = chosen_index(self._losses)  # in the order tried, as stock's loop keeps it
        if picked is None:
            return
        index = self._order[picked]
        if self.branch is None:
            self.chosen[name] = index
            return
        self.searched += len(self._order)
        self.full += len(self._grid)
        self.side_chosen.setdefault(self.branch, {})[name] = (
            index,
            _distance(self._grid, self.chosen.get(name), index),
        )
        if self._order == list(range(len(self._grid))) and name in self.chosen:
            self.side_losses.setdefault(self.branch, {})[name] = (self._grid, self.chosen[name], list(self._losses))

    def to_json(self) -> dict[str, object]:
        distances: dict[str, int] = {}
        for by_name in self.side_chosen.values():
            for _, d in by_name.values():
                key = "other family" if d is None else str(d)
                distances[key] = distances.get(key, 0) + 1
        out: dict[str, object] = {
            "window": self.window,
            "searched_points": self.searched,
            "full_points": self.full,
            "widened": self.widened,
            # how far each side branch's choice lay from the propagating branch's, in grid steps
            "side_distance": dict(sorted(distances.items(), key=lambda kv: (kv[0] == "other family", kv[0]))),
        }
        if self.side_losses:
            out["if_windowed"] = {str(w): replay(self.side_losses, w) for w in REPLAYED_WINDOWS}
        return out


# the windows a whole-grid pass replays from its side branches' losses (`GridMemo.to_json`)
REPLAYED_WINDOWS = (1, 2, 3, 4, 6)


def window_order(grid: list[GridPoint], centre: int, window: int, heard: list[float]) -> Iterator[int]:
    """The grid indices a side search tries, in order: the points of other families than the
    centre's and the centre's family within `window` steps of it, ascending; then one step
    further out while the best of the family's tried points lies on an edge the grid goes past.
    `heard` holds the losses of the points tried so far, in order (it grows between steps);
    where it falls behind, the rest of the grid is tried. The whole grid where the families
    interleave (duo_scaling "both")."""
    if not _separate(grid):
        yield from range(len(grid))
        return
    family, lo, hi, order = _first_window(grid, centre, window)
    yield from order
    while True:
        if len(heard) != len(order):
            tried = set(order)
            yield from (i for i in range(len(grid)) if i not in tried)
            return
        seen = dict(zip(order, heard))
        best = chosen_index([seen[i] for i in family[lo : hi + 1]])
        if best == 0 and lo > 0:
            lo -= 1
            order.append(family[lo])
        elif best is not None and best == hi - lo and hi < len(family) - 1:
            hi += 1
            order.append(family[hi])
        else:
            return
        yield order[-1]


def steps_widened(grid: list[GridPoint], centre: int, window: int, tried: int) -> int:
    """1 where a window search tried more points than its first window, else 0."""
    return int(_separate(grid) and tried > len(_first_window(grid, centre, window)[3]))


def replay(searches: dict[str, dict[str, tuple[list[GridPoint], int, list[float]]]], window: int) -> dict[str, object]:
    """What `window` would have chosen in whole-grid side searches: the points it would have
    tried, how many choices equal the whole grid's, and how much higher the loss of the others
    is than the whole grid's best (relative; a measure of what the window costs)."""
    tried = total = same = 0
    excess: list[float] = []
    for by_name in searches.values():
        for grid, centre, losses in by_name.values():
            heard: list[float] = []
            order = []
            for i in window_order(grid, centre, window, heard):
                order.append(i)
                heard.append(losses[i])
            picked = chosen_index(heard)
            best = chosen_index(losses)
            if picked is None or best is None:
                continue
            tried += len(order)
            total += len(grid)
            if order[picked] == best:
                same += 1
            else:
                excess.append(losses[order[picked]] / losses[best] - 1 if losses[best] > 0 else 0.0)
    searches_n = sum(len(v) for v in searches.values())
    return {
        "tried_points": tried,
        "of_points": total,
        "same_choice": same,
        "searches": searches_n,
        "loss_excess_max": round(max(excess, default=0.0), 6),
        "loss_excess_mean": round(sum(excess) / searches_n, 6) if searches_n else 0.0,
    }


def _separate(grid: list[GridPoint]) -> bool:
    """Each family of grid points one run of consecutive points (stock's duo_scaling true or
    false), not interleaved (duo_scaling "both")."""
    flags = [p[1] for p in grid]
    changes = sum(a != b for a, b in zip(flags, flags[1:]))
    return changes <= 1


def _family(grid: list[GridPoint], index: int) -> list[int]:
    """The grid indices with the same duo-scaling flag as `index`, in grid order."""
    return [i for i, p in enumerate(grid) if p[1] == grid[index][1]]


def _first_window(grid: list[GridPoint], centre: int, window: int) -> tuple[list[int], int, int, list[int]]:
    """The centre's family, the first window's bounds in it, and the points the window tries
    first: the other families' and the family's within `window` steps of the centre, ascending."""
    family = _family(grid, centre)
    at = family.index(centre)
    lo, hi = max(0, at - window), min(len(family) - 1, at + window)
    others = [i for i in range(len(grid)) if grid[i][1] != grid[centre][1]]
    return family, lo, hi, sorted(others + family[lo : hi + 1])


def _distance(grid: list[GridPoint], centre: int | None, index: int) -> int | None:
    """Grid steps from `centre` to `index` within their family; None across families."""
    if centre is None or grid[index][1] != grid[centre][1]:
        return None
    family = _family(grid, centre)
    return family.index(index) - family.index(centre)
