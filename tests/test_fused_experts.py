"""The experts as batched and grouped products (release/awq/all_experts.py, and the grouped
search forward in experts.py) against llm-compressor's own per-expert loop: the same output to
float rounding, and every hook of every expert and Linear called in the loop's order with the
loop's inputs and outputs. (On a GPU these run by default; here the CPU is asked for them.)"""

from __future__ import annotations

import pytest
import torch


def _experts(n_experts: int = 6, hidden: int = 32, inter: int = 16, dtype=torch.float32):
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeExperts

    torch.manual_seed(0)
    cfg = Glm4MoeConfig(
        hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=n_experts, num_experts_per_tok=2
    )
    fused = Glm4MoeExperts(cfg)
    for p in fused.parameters():
        torch.nn.init.normal_(p, std=0.2)
    experts = LinearExperts2D.get_linear_experts_cls(type(fused)).from_experts_module(fused, cfg)
    return experts.to(dtype)


def _routing(n_tok: int, n_experts: int):
    """Uneven top-2 routing with one idle expert (the last) and a busy one (1)."""
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randint(0, n_experts - 1, (n_tok,), generator=g), torch.full((n_tok,), 1)], dim=1)
    idx[:, 1] = torch.where(idx[:, 0] == 1, 2, 1)
    return idx, torch.rand(n_tok, 2, generator=g)


def _record_hooks(experts):
    """A pre-hook (one with kwargs) and a forward hook on every expert and expert Linear, writing
    what each call saw to one list."""
    calls: list[tuple] = []
    handles = []
    for e in range(experts.num_experts):
        for name, m in [(f"{e}", experts[e])] + [
            (f"{e}.{p}", getattr(experts[e], p)) for p in ("gate_proj", "up_proj", "down_proj")
        ]:
            handles.append(
                m.register_forward_pre_hook(
                    lambda mod, args, kwargs, name=name: calls.append(("pre", name, args[0].double().sum().item())),
                    with_kwargs=True,
                )
            )
            handles.append(
                m.register_forward_hook(
                    lambda mod, args, out, name=name: calls.append(
                        ("post", name, tuple(args[0].shape), args[0].double().sum().item(), out.double().sum().item())
                    )
                )
            )
    return calls, handles


def test_all_experts_forward_is_the_loop_with_its_hooks():
    from llmcompressor.modeling.moe.context import moe_calibration_context

    from release.awq import all_experts
    from release.awq.state import RunState

    experts = _experts()
    hidden = torch.randn(40, 32)
    idx, weights = _routing(40, experts.num_experts)
    stock = type(experts).__mro__[1].forward  # LinearExperts2D.forward, llm-compressor's loop
    with moe_calibration_context(), torch.no_grad():
        calls, handles = _record_hooks(experts)
        ref = stock(experts, hidden, idx, weights)
        ref_calls = list(calls)
        calls.clear()
        run = RunState()
        assert all_experts.fusable(experts, hidden, ("cpu",)) and not all_experts.fusable(experts, hidden, ("cuda",))
        # a chunk budget of two experts: the chunks' seams are crossed
        per_expert = 40 * (3 * 16 + 32) * hidden.element_size()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(all_experts, "CHUNK_BYTES", 2 * per_expert)
            ours = all_experts.all_experts_forward(experts, hidden, idx, weights, run)
        for h in handles:
            h.remove()
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
    # every expert ran on every token (the idle one too), hooks in the loop's order and values
    assert [c[:2] for c in calls] == [c[:2] for c in ref_calls] and len(calls) == 6 * 4 * 2
    for ours_call, ref_call in zip(calls, ref_calls):
        assert ours_call[:2] == ref_call[:2]
        if ours_call[0] == "post":
            assert ours_call[2] == ref_call[2] and ours_call[2][0] == 40
        assert ours_call[-1] == pytest.approx(ref_call[-1], rel=1e-4, abs=1e-4)
    assert run.calibration_stack is not None and run.calibration_stack[0] == id(experts)


def test_a_hook_that_changes_an_output_is_refused_not_ignored():
    from release.awq.all_experts import HookRefused, all_experts_forward
    from release.awq.state import RunState

    experts = _experts()
    hidden = torch.randn(8, 32)
    idx, weights = _routing(8, experts.num_experts)
    handle = experts[2].down_proj.register_forward_hook(lambda mod, args, out: out * 2)
    try:
        with torch.no_grad(), pytest.raises(HookRefused, match="changes its output"):
            all_experts_forward(experts, hidden, idx, weights, RunState())
    finally:
        handle.remove()


def test_grouped_search_forward_equals_the_loop():
    """The search's routed experts through torch's grouped GEMM (no padding), in runs of experts
    split by a row budget, against the loop; bf16, as the GPU runs it."""
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    from release.awq.experts import _expert_chunks, grouped_experts_forward, grouped_gemm_works

    experts = _experts(dtype=torch.bfloat16)
    hidden = torch.randn(40, 32, dtype=torch.bfloat16)
    idx, weights = _routing(40, experts.num_experts)
    if not grouped_gemm_works(hidden):
        pytest.skip("torch._grouped_mm does not run on this CPU build of torch")
    with torch.no_grad():
        ref = LinearExperts2D.forward(experts, hidden, idx, weights.to(torch.bfloat16)).float()
        row_bytes = (2 * 32 + 5 * 16) * hidden.element_size()
        for budget in (4 * 2**30, 20 * row_bytes):
            ours = grouped_experts_forward(
                experts, hidden, idx, weights.to(torch.bfloat16), padded_bytes=budget, grouped=True
            ).float()
            assert ((ours - ref).norm() / ref.norm()).item() < 1e-2
    counts = [3, 0, 9, 2, 2, 40, 1, 1, 1, 0]
    runs = [(a, b) for a, b, _w in _expert_chunks(counts, 12, padded=False)]
    assert runs == [(0, 3), (3, 5), (5, 6), (6, 10)]
    assert [e for a, b in runs for e in range(a, b)] == list(range(len(counts)))
    assert all(sum(counts[a:b]) <= 12 or b - a == 1 for a, b in runs)


def test_the_propagation_pass_runs_routed_only_where_no_hook_listens():
    """`hooks_silent`: true only while every llm-compressor hook is off (its propagation pass)
    and any other hook on the experts is marked as counting a batch's first call only (glmrel's
    coverage); an unmarked hook keeps the loop, so it is called as it would be."""
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    from release.awq.all_experts import hooks_silent

    class Probe(HooksMixin):
        pass

    experts = _experts()
    probe = Probe()
    probe.register_hook(experts[3].down_proj, lambda mod, args, out: None, "forward")
    assert not hooks_silent(experts), "llm-compressor's hooks are on: the calibration pass"
    with HooksMixin.disable_hooks():
        assert hooks_silent(experts)
        marked = lambda mod, args, out: None  # noqa: E731
        marked.first_call_per_batch = True
        h1 = experts[0].gate_proj.register_forward_hook(marked)
        assert hooks_silent(experts)
        h2 = experts[5].up_proj.register_forward_hook(lambda mod, args, out: None)
        assert not hooks_silent(experts), "someone else's hook would see every call"
        h1.remove()
        h2.remove()
    probe.remove_hooks()
