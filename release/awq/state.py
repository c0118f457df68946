"""The state one `oneshot` call's patches share, passed explicitly (`RunState`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .causal import CausalMasks
from .grid import GridMemo
from .routing import RoutingMemo


@dataclass
class RunState:
    """What the patches of one run share while AWQ runs; made by `scaled_awq`, gone with it.

    The flags say where in AWQ the call stack is: a patched forward behaves differently inside
    the smoothing step's grid search than in the calibration forward.
    """

    lazy: bool = False  # streamed loss: `_run_samples` called from inside the grid search
    routed: bool = False  # routed experts in the search, batched experts: experts run on their routed tokens only
    smoothing: bool = (
        False  # inside AWQModifier._apply_smoothing (SDPA in the search, merged batches, deferred write-back)
    )
    generation: int = 0  # balance weights change only between `_run_samples` calls (batched experts)
    stacked: dict[int, tuple[int, Any]] = field(default_factory=dict)  # batched experts: one layer's stacked weights
    checked: set[int] = field(default_factory=set)  # batched experts: expert layers compared once with the loop
    # all_experts.py: (id of the experts module, [E, 2 x inter, hid], [E, hid, inter]) of the layer being
    # calibrated; dropped when a smoothing starts and ends (the only place weights change)
    calibration_stack: tuple[int, Any, Any] | None = None
    causal_masks: CausalMasks = field(default_factory=CausalMasks)  # causal.py: the masks' verdicts
    routing: RoutingMemo = field(default_factory=RoutingMemo)  # routing.py: a MoE block search's top-k
    grid: GridMemo = field(default_factory=GridMemo)  # grid.py: the propagating choices, the side branches' windows


def first(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output
