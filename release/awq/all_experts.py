"""The routed experts in the calibration forward, every expert on every token, as batched
products.

With `moe_calibrate_all_experts`, llm-compressor 0.14.0.1's `LinearExperts2D.forward` loops over
a layer's experts (160 in GLM-4.7): per expert a `torch.where` over the routing mask (a device
synchronization), the expert's three Linears called as modules (their hooks: AWQ's statistics
and cached inputs, glmrel's expert coverage), and an `index_add_` of its routed rows. Profiled on
an H200 at GLM-4.7 dims, that loop kept the GPU busy a third of the calibration forward.

In the pipeline's propagation pass (every llm-compressor hook off: `hooks_silent`) no statistic is
taken and only each token's top-k experts count in the output, so there the experts run on their
routed tokens only, through the search's grouped path (experts.py): the same sum, 20x fewer
expert products in GLM-4.7.

`all_experts_forward` reads the routing once per call; then, for chunks of experts, runs gate and
up as one product of every token with the chunk's stacked rows ([T, hid] x [hid, E x 2 inter]),
the gate activation once, and down as a batched product ([E, T, inter] x [E, inter, hid]); calls each expert's hooks, and its
Linears' hooks, with that expert's inputs and outputs in the order the modules would call them;
and adds the expert's routed rows to the output as stock does (same routing, weights and
`index_add_` order). A hook that would change a module's input or output cannot be honoured
here and stops the run with a message. The values are the loop's up to GEMM blocking (a batched
product may round an element's last bit otherwise than the expert's own product), so this runs
only on the device types `ScaleOptions.fused_expert_devices` names: a GPU by default, where the
time is; on the CPU the loop stays (the demo's pinned bits).

Batched hooks (`ScaleOptions.batched_expert_hooks`). Per expert and sample the hooks were the
host's work: at GLM-4.7 size 160 experts x (AWQ's activation sum, the Gram matrix of down_proj's
input, the coverage count) and an `index_add_`, some 15 small kernels and as many Python calls
each, ~80 ms a 2,048-token sample against ~20 ms of products. A hook may carry `over_experts`, a
function `f(pairs, inputs, outputs)` that does for every `(module, hook)` of `pairs` what calling
the hook with `inputs[i]` (and `outputs[i]`) would: `inputs` is [n, tokens, in] (an expanded
view, stride 0 on its first dimension, where every expert has the same input), `outputs`
[n, tokens, out] or None for a pre-hook. Where every hook on a chunk's experts and Linears has one
(glmrel's AWQ hooks, activations.py; the expert coverage, build/coverage.py) and llm-compressor's
hooks are on, each kind runs once per chunk; otherwise every hook is called per expert as before.
The routed rows go to each token's slot in ascending expert order, then k `index_add_` calls add
them in that order: the loop's additions, the same bits.

Without a wait (`ScaleOptions.sync_free_routing`, off until a GPU side-by-side). A chunk's
routed rows are a slice of the rows sorted by expert, and its bounds are the experts' counts,
copied to the host once a call (`tolist`): the host waits for the GPU there once a sample, and
the GPU then idles while the host queues the chunk's work (the per-sample pageable copies that
carried the host's waits in the H100 profile of 2026-12-07). With `sync_free`, every chunk takes
all rows under a mask of its experts instead (`_RowsInPlace`), and the routed-down product is
one grouped GEMM over every expert after the chunks: selections of the same values, so the
same output, with no count on the host.
"""

from __future__ import annotations

import itertools
from typing import Any

from .experts import batchable, effective_weight
from .kernels import TORCH_OPS, Kernels
from .routing import expert_counts
from .state import RunState

CHUNK_BYTES = 4 * 2**30  # the batched products' temporaries per chunk of experts


class HookRefused(RuntimeError):
    """A module hook returned a value: it would replace an input or output."""


def fusable(experts: Any, hidden: Any, devices: tuple[str, ...]) -> bool:
    """Whether `all_experts_forward` can stand in for `experts`' loop on this call."""
    import torch.nn.modules.module as nn_module

    if hidden.device.type not in devices or hidden.dim() != 2 or not getattr(experts, "has_gate", False):
        return False
    if not batchable(experts):  # gated, no biases, weights-only quantization
        return False
    # global hooks would see every module call: only the loop makes those calls
    return not (nn_module._global_forward_pre_hooks or nn_module._global_forward_hooks)


def hooks_silent(experts: Any) -> bool:
    """Whether no hook on the experts or their Linears would do anything on this call: every
    llm-compressor hook (HooksMixin) is off, as in the pipeline's propagation pass, and any
    other hook is marked `first_call_per_batch` (glmrel's expert coverage, which counts only
    a batch's calibration call). Then the experts need only their routed tokens."""
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    if not HooksMixin._HOOKS_DISABLED or HooksMixin._HOOKS_KEEP_ENABLED:
        return False
    for e in range(experts.num_experts):
        expert = experts[e]
        for m in (expert, expert.gate_proj, expert.up_proj, expert.down_proj):
            for hook in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()):
                code = getattr(hook, "__code__", None)
                llm_compressor = (
                    code is not None
                    and code.co_name == "wrapped_hook"
                    and code.co_filename.replace("\\", "/").endswith("llmcompressor/modifiers/utils/hooks.py")
                )
                if not (llm_compressor or getattr(hook, "first_call_per_batch", False)):
                    return False
    return True


def _call_pre_hooks(module: Any, args: tuple[Any, ...]) -> None:
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, {})
        else:
            result = hook(module, args)
        if result is not None:
            raise HookRefused(f"a forward pre-hook on {type(module).__name__} changes its input")


def _call_hooks(module: Any, args: tuple[Any, ...], output: Any) -> None:
    for hook_id, hook in list(module._forward_hooks.items()):
        if hook_id in module._forward_hooks_with_kwargs:
            result = hook(module, args, {}, output)
        else:
            result = hook(module, args, output)
        if result is not None:
            raise HookRefused(f"a forward hook on {type(module).__name__} changes its output")


def _stacked(experts: Any, run: RunState) -> tuple[Any, Any]:
    """The layer's expert weights as [E, 2 x inter, hid] (gate rows, then up rows: the order
    stock concatenates their outputs) and [E, hid, inter]. Weights change only inside AWQ's
    smoothing, which drops the stack (`RunState.calibration_stack`): the calibration forward
    stacks a layer once, and the propagation pass after the smoothing once more."""
    import torch

    if run.calibration_stack is not None and run.calibration_stack[0] == id(experts):
        return run.calibration_stack[1], run.calibration_stack[2]
    run.calibration_stack = None  # the previous layer's stack freed before the new one
    run.stacked = {}  # and the routed path's (the previous layer's propagation)
    trios = [(experts[i].gate_proj, experts[i].up_proj, experts[i].down_proj) for i in range(experts.num_experts)]
    gate_up = torch.stack([torch.cat([effective_weight(g), effective_weight(u)]) for g, u, _ in trios])
    down = torch.stack([effective_weight(d) for _, _, d in trios])
    run.calibration_stack = (id(experts), gate_up, down)
    return gate_up, down


HOOK_ORDER = (  # the order the modules call their hooks in the loop
    ("expert", "pre"),
    ("gate_proj", "pre"),
    ("gate_proj", "post"),
    ("up_proj", "pre"),
    ("up_proj", "post"),
    ("down_proj", "pre"),
    ("down_proj", "post"),
    ("expert", "post"),
)


def _module(expert: Any, role: str) -> Any:
    return expert if role == "expert" else getattr(expert, role)


def _hook_plan(experts: Any, first: int, last: int) -> list[tuple[str, str, list[tuple[Any, list[Any]]]]] | None:
    """Batched hooks: per (role, phase) of HOOK_ORDER, the chunk's hooks grouped by their
    `over_experts`; None where a hook has none (then every hook is called per expert)."""
    plan = []
    for role, phase in HOOK_ORDER:
        groups: dict[Any, list[Any]] = {}
        for e in range(first, last):
            module = _module(experts[e], role)
            hooks = module._forward_pre_hooks if phase == "pre" else module._forward_hooks
            for hook in hooks.values():
                over = getattr(hook, "over_experts", None)
                if over is None:
                    return None
                groups.setdefault(over, []).append((module, hook))
        if groups:
            plan.append((role, phase, list(groups.items())))
    return plan


def _reads_outputs(plan: list[tuple[str, str, list[tuple[Any, list[Any]]]]]) -> bool:
    """Whether a hook of `plan` reads a down_proj's or an expert's output (a batched form
    says it does not with `over_experts.uses_output = False`)."""
    return any(
        getattr(over, "uses_output", True)
        for role, phase, groups in plan
        if phase == "post" and role in ("down_proj", "expert")
        for over, _pairs in groups
    )


def _hooks_enabled() -> bool:
    """llm-compressor's hooks run (its wrapped hooks return early while they are disabled)."""
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    return not HooksMixin._HOOKS_DISABLED


class _RowsInPlace:
    """`all_experts_forward(sync_free=True)`: every routed row of `where` (expert, slot, token, by
    expert) taken from its chunk's products under a mask of the chunk's experts, in place of the
    chunk's slice of `where`, whose bounds are counts the host would wait for. Dense chunks give
    their rows of down_proj's output at once; routed-down chunks give their rows of its input, and
    `finish` makes their product as one grouped GEMM over every expert (the same rows and offsets,
    `ends`, as the chunks' own products). Selection only: the same values as the slices'."""

    def __init__(self, where: Any, hidden: Any, inter: int) -> None:
        self.experts, self.tokens = where[:, 0], where[:, 2]
        self.n_tok, self.inter = hidden.shape[0], inter
        self.rows = hidden.new_empty(where.shape[0], hidden.shape[1])  # down_proj's output, by row
        self.picked: Any = None  # down_proj's input of the routed-down chunks' rows
        self.from_picked: Any = None  # which rows those are

    def take_chunk(self, first: int, last: int, act: Any, down: Any) -> None:
        """Chunk [first, last)'s rows: of down_proj's dense output `down`, or (None: the routed
        rows only) of its input `act`, whose product waits for `finish`."""
        import torch

        in_chunk = ((self.experts >= first) & (self.experts < last)).unsqueeze(1)
        index = (self.experts - first).clamp(0, last - first - 1) * self.n_tok + self.tokens  # in range for all
        if down is not None:
            self.rows = torch.where(in_chunk, down.view(-1, down.shape[-1])[index], self.rows)
            return
        if self.picked is None:
            self.picked = act.new_zeros(self.experts.shape[0], self.inter)
            self.from_picked = torch.zeros_like(in_chunk)
        self.picked = torch.where(in_chunk, act.view(-1, self.inter)[index], self.picked)
        self.from_picked |= in_chunk

    def finish(self, down_w: Any, ends: Any) -> Any:
        """Every row's down_proj output."""
        import torch

        if self.picked is None:
            return self.rows
        out = torch._grouped_mm(self.picked, down_w.transpose(1, 2), offs=ends)
        return torch.where(self.from_picked, out, self.rows)


def all_experts_forward(
    experts: Any,
    hidden: Any,
    top_k_index: Any,
    top_k_weights: Any,
    run: RunState,
    batched_hooks: bool = True,
    stats: Any = None,
    grouped: bool = False,
    kernels: Kernels = TORCH_OPS,
    sync_free: bool = False,
) -> Any:
    """`LinearExperts2D.forward` under `moe_calibrate_all_experts`, batched (module docstring);
    `stats` (a ScaleStats) counts the chunks whose hooks ran batched and per expert. `grouped`
    (torch's grouped GEMM works here): where no hook of a chunk reads a down_proj's or an
    expert's output, down_proj runs on the routed rows only (1/20 of its product at GLM-4.7's
    top-8 of 160), as the propagation pass runs it. `kernels`: the gate as one kernel where it was
    checked (kernels.py). `sync_free`: no synchronization (module docstring, "Without a wait")."""
    import torch

    n_exp = experts.num_experts
    final = torch.zeros_like(hidden)
    # stock's routing: per expert, torch.where over its [k, tokens] mask, row-major; all experts
    # at once is the same (expert, slot, token) order, with one synchronization
    mask = torch.nn.functional.one_hot(top_k_index, n_exp).permute(2, 1, 0)
    # one row per (token, slot): its size is known, so no synchronization to learn it
    try:
        where = torch.nonzero_static(mask, size=top_k_index.numel())
    except NotImplementedError:  # a backend without it: the same rows, one more synchronization
        where = mask.nonzero()
    by_expert = expert_counts(where[:, 0], n_exp)  # (torch.bincount would synchronize here too)
    ends = by_expert.cumsum(0).to(torch.int32)  # each expert's end in `where`, for the grouped product's offsets
    if not sync_free:
        counts = by_expert.tolist()  # the call's one synchronization
        starts = [0, *itertools.accumulate(counts)]  # each expert's first row in `where`
    # each (token, slot)'s place among the token's experts in ascending order: the loop adds a
    # token's expert outputs in that order
    k = top_k_index.shape[1]
    rank = (top_k_index.unsqueeze(2) > top_k_index.unsqueeze(1)).sum(dim=2)
    gate_up_w, down_w = _stacked(experts, run)
    n_tok, hid = hidden.shape
    # top-k gives each token k distinct experts, so the chunks write every (token, slot) once
    routed = torch.empty(n_tok, k, hid, dtype=final.dtype, device=hidden.device)
    inter = down_w.shape[-1]
    per_expert = n_tok * (5 * inter + hid) * hidden.element_size()  # gate_up (and torch's gate's copy), act, down
    chunk = max(1, CHUNK_BYTES // per_expert)
    by_row = _RowsInPlace(where, hidden, inter) if sync_free else None

    def into_slots(rows_out: Any, tokens: Any, slots: Any) -> None:
        """Routed rows, weighted as the loop weights them, into each token's slot."""
        routed[tokens, rank[tokens, slots]] = (rows_out * top_k_weights[tokens, slots, None]).to(final.dtype)

    args = (hidden,)
    use_plan = batched_hooks and _hooks_enabled()
    for first in range(0, n_exp, chunk):
        last = min(n_exp, first + chunk)
        # one product of every token with the chunk's gate and up rows, read per expert as a
        # strided [E, tokens, 2 x inter] view (the gate kernel reads it so; no copy)
        gate_up = (
            torch.mm(hidden, gate_up_w[first:last].reshape(-1, hid).T)
            .view(n_tok, last - first, 2 * inter)
            .transpose(0, 1)
        )
        act = kernels.gate(experts, gate_up).contiguous()  # [E, tokens, inter] (torch's gate may keep the view's order)
        plan = _hook_plan(experts, first, last) if use_plan else None
        routed_down = plan is not None and grouped and not _reads_outputs(plan)
        # down_proj for every token (None: on the routed rows only, below or in `finish`)
        down = None if routed_down else torch.bmm(act, down_w[first:last].transpose(1, 2))
        routed_out = None
        if by_row is not None:  # the chunk's rows taken into place under a mask
            by_row.take_chunk(first, last, act, down)
        else:
            # the chunk's routed rows: (expert, slot, token), by expert
            rows = where[starts[first] : starts[last]]
            experts_of, slots, tokens = rows[:, 0] - first, rows[:, 1], rows[:, 2]
            if down is not None:
                routed_out = down.view(-1, hid)[experts_of * n_tok + tokens]
            else:
                offs = ends[first:last] - starts[first]  # (no copy from host memory: that would synchronize)
                picked = act.view(-1, inter)[experts_of * n_tok + tokens]
                if picked.shape[0]:
                    routed_out = torch._grouped_mm(picked, down_w[first:last].transpose(1, 2), offs=offs)
                else:  # no token routed to the chunk's experts
                    routed_out = hidden.new_empty(0, hid)
                del picked
        if stats is not None:
            stats.routed_down_chunks += routed_down
            stats.batched_hook_chunks += plan is not None
            stats.per_expert_hook_chunks += plan is None
        if plan is not None:
            shared = hidden.expand(last - first, n_tok, hid)
            outputs = {"gate_proj": gate_up[:, :, :inter], "up_proj": gate_up[:, :, inter:], "down_proj": down}
            # (down None: no hook reads it)
            for role, phase, groups in plan:
                inputs = act if role == "down_proj" else shared
                out = None if phase == "pre" else outputs.get(role, down)
                for over, pairs in groups:
                    over(pairs, inputs, out)
        else:
            assert down is not None  # per-expert hooks: the product for every token was made
            for e in range(first, last):
                i = e - first
                expert = experts[e]
                gate_proj, up_proj, down_proj = expert.gate_proj, expert.up_proj, expert.down_proj
                _call_pre_hooks(expert, args)
                _call_pre_hooks(gate_proj, args)
                _call_hooks(gate_proj, args, gate_up[i, :, :inter])
                _call_pre_hooks(up_proj, args)
                _call_hooks(up_proj, args, gate_up[i, :, inter:])
                _call_pre_hooks(down_proj, (act[i],))
                _call_hooks(down_proj, (act[i],), down[i])
                _call_hooks(expert, args, down[i])
        if routed_out is not None:  # the chunk's routed rows into their slots
            into_slots(routed_out, tokens, slots)
        del gate_up, act, down, routed_out
    if by_row is not None:  # every routed row at once
        into_slots(by_row.finish(down_w, ends), where[:, 2], where[:, 1])
    every = torch.arange(n_tok, device=hidden.device)
    for r in range(k):  # a token's experts in ascending order, as the loop's index_add_ calls add them
        final.index_add_(0, every, routed[:, r])
    return final
