"""How many calibration tokens each routed expert saw: by the router vs. by MoE-aware calibration."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any


@dataclass(frozen=True)
class ExpertCoverage:
    """Per MoE layer, tokens per expert: `routed` = what top-k routing sent it,
    `calibrated` = what its gate_proj actually saw during calibration."""

    total_tokens: int
    routed: dict[int, list[int]]
    calibrated: dict[int, list[int]]
    moe_calibrate_all_experts: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "total_tokens": self.total_tokens,
            "moe_calibrate_all_experts": self.moe_calibrate_all_experts,
            "layers": {
                str(layer): {"routed": self.routed[layer], "calibrated": self.calibrated[layer]}
                for layer in sorted(self.routed)
            },
            "summary": self.summary(),
        }

    def summary(self, thresholds: tuple[int, ...] = (0, 16, 128)) -> dict[str, Any]:
        routed = [c for counts in self.routed.values() for c in counts]
        calibrated = [c for counts in self.calibrated.values() for c in counts]
        return {
            "experts": len(routed),
            "routed_min": min(routed, default=0),
            "routed_max": max(routed, default=0),
            "calibrated_min": min(calibrated, default=0),
            "calibrated_max": max(calibrated, default=0),
            "routed_below": {str(t): sum(c <= t if t == 0 else c < t for c in routed) for t in thresholds},
            "calibrated_below": {str(t): sum(c <= t if t == 0 else c < t for c in calibrated) for t in thresholds},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExpertCoverage:
        layers = data["layers"]
        return cls(
            total_tokens=data["total_tokens"],
            routed={int(k): v["routed"] for k, v in layers.items()},
            calibrated={int(k): v["calibrated"] for k, v in layers.items()},
            moe_calibrate_all_experts=data["moe_calibrate_all_experts"],
        )


ROUTER = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.gate$")
EXPERT_GATE_PROJ = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj$")


@contextmanager
def count_expert_tokens(model, num_experts: int, calls_per_module: int | None = None) -> Iterator[dict]:
    """Count tokens routed to, and seen by, each expert of each MoE layer while the model runs.

    Hooks the router (`mlp.gate`, whose third output is the top-k expert indices) and each
    linearized expert's `gate_proj`. With `calls_per_module` set, only the first that many
    calls of each module count: llm-compressor's sequential pipeline runs every batch once
    through a layer before AWQ's grid search and the propagation pass call it again, so this
    measures exactly the calibration pass. Yields a dict filled on exit with `routed` and
    `calibrated` ({layer: [tokens per expert]}).
    """
    routed: dict[int, list[int]] = defaultdict(lambda: [0] * num_experts)
    calibrated: dict[int, list[int]] = defaultdict(lambda: [0] * num_experts)
    calls: dict[int, int] = defaultdict(int)
    handles = []

    def counted(module) -> bool:
        calls[id(module)] += 1
        return calls_per_module is None or calls[id(module)] <= calls_per_module

    def router_hook(mod, _inp, out, layer):
        if counted(mod):
            counts = out[2].reshape(-1).bincount(minlength=num_experts).tolist()
            row = routed[layer]
            for e, c in enumerate(counts):
                row[e] += int(c)

    def expert_hook(mod, inp, _out, layer, expert):
        if counted(mod):
            calibrated[layer][expert] += inp[0].numel() // inp[0].shape[-1]

    for name, module in model.named_modules():
        if m := ROUTER.search(name):
            hook = partial(router_hook, layer=int(m[1]))
        elif m := EXPERT_GATE_PROJ.search(name):
            hook = partial(expert_hook, layer=int(m[1]), expert=int(m[2]))
        else:
            continue
        handles.append(module.register_forward_hook(hook))
    result: dict = {}
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
        result.update(routed=dict(routed), calibrated=dict(calibrated))
