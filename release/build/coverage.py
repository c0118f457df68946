"""How many calibration tokens each routed expert saw: by the router vs. by MoE-aware calibration."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

# "routed" / "calibrated" -> MoE layer -> tokens per expert
ExpertCounts = dict[str, dict[int, list[int]]]


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


def _current_batch() -> int | None:
    """The batch llm-compressor's sequential pipeline is running (None outside one)."""
    try:
        from llmcompressor.core import active_session

        batch = getattr(active_session().state, "current_batch_idx", -1)
    except ImportError:
        return None
    return None if batch is None or batch < 0 else batch


@contextmanager
def count_expert_tokens(model, num_experts: int, calls_per_module: int | None = None) -> Iterator[ExpertCounts]:
    """Count tokens routed to, and seen by, each expert of each MoE layer while the model runs.

    Hooks the router (`mlp.gate`, whose third output is the top-k expert indices) and each
    linearized expert's `gate_proj`. Inside llm-compressor's sequential pipeline, each batch's
    first call through a module counts (the calibration pass: AWQ's grid search and the
    propagation pass call it again); elsewhere the first `calls_per_module` calls. Yields a
    dict filled on exit with `routed` and `calibrated` ({layer: [tokens per expert]}).
    """
    from release.awq.routing import expert_counts

    # per module: the counts of each batch the pipeline named (the first call of a batch), and
    # of the calls made outside a named batch, in order
    batched: dict[tuple[str, int, int], dict[int, Any]] = defaultdict(dict)  # counts: a list or a device tensor
    unbatched: dict[tuple[str, int, int], list[Any]] = defaultdict(list)
    handles = []

    def record(key: tuple[str, int, int], counts: Any) -> None:
        batch = _current_batch()
        if batch is None:
            unbatched[key].append(counts)
        else:
            batched[key].setdefault(batch, counts)

    def router_hook(mod, _inp, out, layer):
        # left on the device until the end: a .tolist() here (or CUDA's bincount, which reads the
        # input's maximum back first) would stall the GPU once per MoE call
        record(("routed", layer, -1), expert_counts(out[2], num_experts))

    def expert_hook(mod, inp, _out, layer, expert):
        record(("calibrated", layer, expert), [inp[0].numel() // inp[0].shape[-1]])

    def experts_over(pairs, inputs, _outputs):
        # release/awq/all_experts.py's batched hooks: expert_hook for each expert, inputs [n, tokens, in]
        rows = inputs[0].numel() // inputs.shape[-1]
        for _module, hook in pairs:
            record(("calibrated", hook.keywords["layer"], hook.keywords["expert"]), [rows])

    experts_over.uses_output = False  # type: ignore[attr-defined]

    for name, module in model.named_modules():
        if m := ROUTER.search(name):
            hook = partial(router_hook, layer=int(m[1]))
        elif m := EXPERT_GATE_PROJ.search(name):
            hook = partial(expert_hook, layer=int(m[1]), expert=int(m[2]))
            # counts a batch's first call only: the engine may skip the calls after it (release/awq/all_experts.py)
            hook.first_call_per_batch = True  # type: ignore[attr-defined]
            hook.over_experts = experts_over  # type: ignore[attr-defined]
        else:
            continue
        handles.append(module.register_forward_hook(hook))
    result: ExpertCounts = {}
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
        routed: dict[int, list[int]] = defaultdict(lambda: [0] * num_experts)
        calibrated: dict[int, list[int]] = defaultdict(lambda: [0] * num_experts)
        for key in set(batched) | set(unbatched):
            kind, layer, expert = key
            # Inside llm-compressor's sequential pipeline every batch is named: its first call
            # through each module is the calibration pass (the grid search and the propagation
            # call it again), and a call outside any batch (with the base weights offloaded,
            # layer 1's router ran once more before batch 0) is not calibration. Elsewhere, the
            # first `calls_per_module` calls.
            if batched.get(key):
                calls = list(batched[key].values())[:calls_per_module]
            else:
                calls = unbatched[key][:calls_per_module]
            for counts in calls:
                if not isinstance(counts, list):
                    counts = counts.tolist()
                if kind == "routed":
                    routed[layer] = [a + b for a, b in zip(routed[layer], counts)]
                else:
                    calibrated[layer][expert] += counts[0]
        result.update(routed=dict(routed), calibrated=dict(calibrated))
