"""The experts as batched and grouped products (release/awq/all_experts.py, and the grouped
search forward in experts.py) against llm-compressor's own per-expert loop: the same output to
float rounding, and every hook of every expert and Linear called in the loop's order with the
loop's inputs and outputs. (On a GPU these run by default; here the CPU is asked for them.)"""

from __future__ import annotations

import itertools

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
    """The search's routed experts through torch's grouped GEMM (no padding) against the loop,
    bf16 as the GPU runs it; in steps of a row budget that cut experts in two (each part a group
    of its own step), the same bits as one step."""
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    from release.awq.experts import grouped_experts_forward, grouped_gemm_works

    experts = _experts(dtype=torch.bfloat16)
    hidden = torch.randn(40, 32, dtype=torch.bfloat16)
    idx, weights = _routing(40, experts.num_experts)
    if not grouped_gemm_works(hidden):
        pytest.skip("torch._grouped_mm does not run on this CPU build of torch")
    w = weights.to(torch.bfloat16)
    with torch.no_grad():
        ref = LinearExperts2D.forward(experts, hidden, idx, w).float()
        one = grouped_experts_forward(experts, hidden, idx, w, grouped=True)
        assert ((one.float() - ref).norm() / ref.norm()).item() < 1e-2
        row_bytes = (2 * 32 + 4 * 16) * hidden.element_size()
        for rows in (7, 13, 79):  # 80 routed rows: steps of 7, 13 and 79 rows end inside experts
            steps = grouped_experts_forward(experts, hidden, idx, w, padded_bytes=rows * row_bytes, grouped=True)
            assert torch.equal(steps, one), rows


def test_the_routed_sum_is_one_gather_of_the_weighted_rows():
    """The routed rows (sorted by expert) weighted, rounded to their dtype, gathered back to
    their tokens and summed in fp32 (kernels.py, torch's ops): the sum written out token by token.
    The values are exact in bf16 and in any order of addition, so the check is bit for bit."""
    from release.awq.kernels import fused_sum_works, weighted_slot_sum_torch

    g = torch.Generator().manual_seed(4)
    n_tok, k, hid = 11, 3, 40
    y = torch.randint(-8, 8, (n_tok * k, hid), generator=g).to(torch.bfloat16)
    weights = torch.randint(1, 5, (n_tok, k), generator=g).float() / 4
    order = torch.randperm(n_tok * k, generator=g)
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel())
    want = torch.zeros(n_tok, hid)
    for r, slot in enumerate(order.tolist()):  # sorted row r is token slot // k's slot slot % k
        want[slot // k] += (y[r].float() * weights[slot // k, slot % k]).to(torch.bfloat16).float()
    got = weighted_slot_sum_torch(y.clone(), weights, order, back, n_tok, k)
    assert got.dtype == torch.bfloat16 and torch.equal(got.float(), want)
    assert not fused_sum_works(y), "the Triton kernel is for CUDA devices only"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs a CUDA device")
def test_the_fused_sum_kernel_equals_torchs_ops():
    from release.awq.kernels import fused_sum_works, weighted_slot_sum_fused, weighted_slot_sum_torch

    like = torch.zeros(1, device="cuda", dtype=torch.bfloat16)
    if not fused_sum_works(like):
        pytest.skip("Triton is not installed or cannot build the kernel here")
    g = torch.Generator().manual_seed(5)
    n_tok, k, hid = 300, 8, 5120
    y = torch.randint(-8, 8, (n_tok * k, hid), generator=g).to("cuda", torch.bfloat16)
    weights = (torch.randint(1, 5, (n_tok, k), generator=g).float() / 4).cuda()
    order = torch.randperm(n_tok * k, generator=g).cuda()
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device="cuda")
    fused = weighted_slot_sum_fused(y, weights, back, n_tok, k)
    assert torch.equal(fused, weighted_slot_sum_torch(y.clone(), weights, order, back, n_tok, k))


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


def _exact_experts(n_experts: int = 6, hidden: int = 32, inter: int = 16):
    """bf16 experts whose every product is exact in any blocking: integer weights and inputs
    keep each sum an integer below 2^24, and gate rows of ones with inputs >= 1 put gate >= 32,
    where silu(x) is x. Only the routing weights' products and their sums round, so two paths
    that add the weighted expert outputs in the same order give the same bits, on any CPU."""
    experts = _experts(n_experts, hidden, inter, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for e in range(n_experts):
            experts[e].gate_proj.weight.fill_(1)
            experts[e].up_proj.weight.copy_(torch.randint(-1, 2, (inter, hidden), generator=g))
            experts[e].down_proj.weight.copy_(torch.randint(-1, 2, (hidden, inter), generator=g))
    x = torch.randint(1, 3, (40, hidden), generator=g).to(torch.bfloat16)
    return experts, x


def test_the_routed_sum_keeps_the_loops_order_and_bits():
    """The routed rows are added per token in ascending expert order, as the loop's
    `index_add_` calls add them: the same bf16 output, bit for bit, with and without batched
    hooks and across chunk seams."""
    from llmcompressor.modeling.moe.context import moe_calibration_context

    from release.awq import all_experts
    from release.awq.experts import grouped_gemm_works
    from release.awq.state import RunState

    experts, hidden = _exact_experts()
    g = torch.Generator().manual_seed(3)  # top-4 of 6 (two terms would add alike in any order)
    idx = torch.stack([torch.randperm(6, generator=g)[:4] for _ in range(40)])
    weights = torch.rand(40, 4, generator=g) * torch.tensor([1.0, 100.0, 0.01, 7.0])
    stock = type(experts).__mro__[1].forward
    with moe_calibration_context(), torch.no_grad():
        ref = stock(experts, hidden, idx, weights)
        per_expert = 40 * (5 * 16 + 32) * hidden.element_size()
        # (grouped: down_proj on the routed rows only, by torch's grouped GEMM, where it runs here)
        groupeds = (False, True) if grouped_gemm_works(hidden) else (False,)
        for chunk_bytes in (4 * 2**30, 2 * per_expert):
            for batched, grouped, sync_free in itertools.product((True, False), groupeds, (False, True)):
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(all_experts, "CHUNK_BYTES", chunk_bytes)
                    if sync_free:  # no count read back to the host: no wait for the GPU
                        mp.setattr(torch.Tensor, "tolist", _no_wait)
                    ours = all_experts.all_experts_forward(
                        experts, hidden, idx, weights, RunState(), batched, None, grouped, sync_free=sync_free
                    )
                assert torch.equal(ours, ref), (chunk_bytes, batched, grouped, sync_free)


def _no_wait(self):
    raise AssertionError("a tensor read back to the host (the host would wait for the GPU)")


class _Mapping:
    def __init__(self, smooth_name, balance_layers, parent):
        self.smooth_name, self.balance_layers, self.parent = smooth_name, balance_layers, parent
        self.activation_hook_target = None
        self.parent_name = "layers.0.mlp.experts.x.down_proj"


def _hooked(experts, model, gram_by_gemm=False):
    """glmrel's AWQ calibration hooks as a GLM-4-MoE layer has them on its experts (each
    expert's up_proj -> down_proj mapping, its parent the down_proj with a Gram cache; the MoE
    block's mapping hooked on expert 0's gate_proj), and the expert coverage."""
    from types import SimpleNamespace
    from typing import Any

    from llmcompressor.modifiers.utils.hooks import HooksMixin

    from release.awq import ScaleOptions
    from release.awq.activations import register_calibration_hooks
    from release.awq.caches import Ledger, cache_classes

    class Modifier(HooksMixin):
        offload_device: Any = None

    modifier = Modifier()
    modifier._smooth_activation_stats = {}
    modifier._parent_args_cache = {}
    modifier._resolved_mappings = [_Mapping("mlp_block", [experts[0].gate_proj], experts)] + [
        _Mapping(f"{e}.up_proj", [experts[e].down_proj], experts[e].down_proj) for e in range(experts.num_experts)
    ]
    register_calibration_hooks(modifier)
    engine = SimpleNamespace(
        grams=Ledger(float("inf")),
        stats=SimpleNamespace(tokens_seen=0, tokens_kept=0, gpu_kernels={}),
        options=ScaleOptions(gram_by_gemm=gram_by_gemm),
        gram_by_gemm=None,
    )
    gram = cache_classes()[1]
    for e in range(experts.num_experts):
        modifier._parent_args_cache[experts[e].down_proj] = gram(engine, None)
    return modifier


def test_batched_hooks_leave_what_each_expert_hook_leaves():
    """glmrel's own hooks once per chunk of experts (`over_experts`): AWQ's activation sums and
    counts, each expert's Gram matrix and token count, and the coverage counts are what the
    per-expert calls leave (sums to fp32 rounding), and no hook is called per expert. None of
    them reads a down_proj's output, so with torch's grouped GEMM down_proj runs on the routed
    rows only: the same statistics, bit for bit, and the same output to bf16 rounding."""
    from types import SimpleNamespace

    from llmcompressor.modeling.moe.context import moe_calibration_context

    from release.awq import all_experts
    from release.awq.experts import grouped_gemm_works
    from release.awq.state import RunState
    from release.build.coverage import count_expert_tokens

    variants = {
        "loop": (False, False),
        "batched": (True, False),
        "stacked grams": (True, False),
        "batched, sync free": (True, False),
    }
    if grouped_gemm_works(torch.zeros(1, dtype=torch.bfloat16)):
        variants["routed down"] = (True, True)
        variants["routed down, sync free"] = (True, True)
    results = {}
    for name, (batched, grouped) in variants.items():
        sync_free = name.endswith("sync free")
        experts = _experts(dtype=torch.bfloat16)
        model = torch.nn.Module()
        model.layers = torch.nn.ModuleList([torch.nn.Module()])
        model.layers[0].mlp = torch.nn.Module()
        model.layers[0].mlp.experts = experts
        modifier = _hooked(experts, model, gram_by_gemm=name == "stacked grams")
        stats = SimpleNamespace(batched_hook_chunks=0, per_expert_hook_chunks=0, routed_down_chunks=0)
        outputs = []
        with (
            moe_calibration_context(),
            torch.no_grad(),
            count_expert_tokens(model, experts.num_experts) as counts,
            pytest.MonkeyPatch.context() as mp,
        ):
            if batched:
                mp.setattr(all_experts, "_call_hooks", None)  # a per-expert call would fail
                mp.setattr(all_experts, "_call_pre_hooks", None)
            for seed in (0, 1):  # two samples: the second adds to the first
                g = torch.Generator().manual_seed(seed)
                hidden = torch.randn(40, 32, generator=g).to(torch.bfloat16)
                idx, weights = _routing(40, experts.num_experts)
                outputs.append(
                    all_experts.all_experts_forward(
                        experts, hidden, idx, weights, RunState(), batched, stats, grouped, sync_free=sync_free
                    )
                )
        modifier.remove_hooks()
        caches = modifier._parent_args_cache
        results[name] = {
            "stats": {k: (v[0].clone(), int(v[1])) for k, v in modifier._smooth_activation_stats.items()},
            "grams": [(caches[experts[e].down_proj].gram, caches[experts[e].down_proj].rows) for e in range(6)],
            "coverage": counts["calibrated"],
            "outputs": outputs,
            "chunks": stats,
        }
    loop, ours = results["loop"], results["batched"]
    assert loop["stats"].keys() == ours["stats"].keys() and len(ours["stats"]) == 7
    for name, (total, count) in loop["stats"].items():
        assert ours["stats"][name][1] == count == 80
        assert torch.allclose(ours["stats"][name][0], total, rtol=1e-6, atol=1e-5), name
    for (g_loop, rows_loop), (g_ours, rows_ours) in zip(loop["grams"], ours["grams"]):
        assert rows_ours == rows_loop == 80
        assert torch.allclose(g_ours, g_loop, rtol=1e-6, atol=1e-4)
    assert ours["coverage"] == loop["coverage"] == {0: [80] * 6}
    assert all(torch.equal(a, b) for a, b in zip(ours["outputs"], loop["outputs"]))
    assert (loop["chunks"].per_expert_hook_chunks, ours["chunks"].batched_hook_chunks) == (2, 2)
    # `gram_by_gemm` keeps a chunk's Gram sums as views of one stack (on a GPU the GEMM adds into
    # it; on the CPU the same sum as without): the same matrices, bit for bit
    # `sync_free`: the chunks' rows taken under masks instead of slices, the same values
    for plain, free in (("batched", "batched, sync free"), ("routed down", "routed down, sync free")):
        if free not in results:
            continue
        a, b = results[plain], results[free]
        assert all(torch.equal(x, y) for x, y in zip(a["outputs"], b["outputs"])), free
        assert all(torch.equal(a["stats"][k][0], b["stats"][k][0]) for k in a["stats"]), free
        assert all(torch.equal(x[0], y[0]) for x, y in zip(a["grams"], b["grams"])), free
        assert a["coverage"] == b["coverage"] and a["chunks"] == b["chunks"], free
    stacked = results["stacked grams"]
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(stacked["grams"], ours["grams"]))
    assert stacked["grams"][0][0]._base is not None and stacked["grams"][0][0]._base is stacked["grams"][1][0]._base
    if "routed down" not in results:
        return
    routed = results["routed down"]
    assert routed["chunks"].routed_down_chunks == 2 and ours["chunks"].routed_down_chunks == 0
    for name, (total, count) in ours["stats"].items():
        assert torch.equal(routed["stats"][name][0], total) and routed["stats"][name][1] == count
    assert all(torch.equal(a[0], b[0]) for a, b in zip(routed["grams"], ours["grams"]))
    for a, b in zip(routed["outputs"], ours["outputs"]):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_a_hook_without_a_batched_form_is_called_per_expert():
    """One foreign hook on one expert's Linear: the chunk's hooks all go back to per-expert
    calls, so that hook sees every call the loop would make."""
    from llmcompressor.modeling.moe.context import moe_calibration_context

    from release.awq.all_experts import all_experts_forward
    from release.awq.state import RunState

    experts = _experts(dtype=torch.bfloat16)
    model = torch.nn.Module()
    modifier = _hooked(experts, model)
    seen = []
    handle = experts[4].up_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    hidden = torch.randn(40, 32).to(torch.bfloat16)
    idx, weights = _routing(40, experts.num_experts)
    with moe_calibration_context(), torch.no_grad():
        all_experts_forward(experts, hidden, idx, weights, RunState(), True)
    handle.remove()
    modifier.remove_hooks()
    assert seen == [(40, 16)]
    assert int(modifier._smooth_activation_stats["4.up_proj"][1]) == 40
    assert modifier._parent_args_cache[experts[4].down_proj].rows == 40


def test_the_gate_kernel_is_chosen_only_for_silu_gates_on_a_gpu():
    """kernels.py computes transformers' default gate with SiLU; GLM-4.7's experts have it. On a
    CPU (no Triton, no CUDA) the experts keep torch's ops, and those are the experts' own gate."""
    from release.awq.kernels import TORCH_OPS, Kernels, silu_gate

    experts = _experts(dtype=torch.bfloat16)
    assert silu_gate(experts)
    experts.act_fn = torch.nn.GELU()
    assert not silu_gate(experts)
    experts = _experts(dtype=torch.bfloat16)
    assert Kernels.on(torch.zeros(1, dtype=torch.bfloat16)) == TORCH_OPS
    x = torch.randn(7, 32, dtype=torch.bfloat16)
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(TORCH_OPS.gate(experts, x), torch.nn.functional.silu(gate) * up)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs a CUDA device")
def test_the_gate_kernel_gives_torchs_bits():
    from release.awq.kernels import gate_kernel_works, silu_and_mul_fused

    like = torch.zeros(1, device="cuda", dtype=torch.bfloat16)
    if not gate_kernel_works(like):
        pytest.skip("Triton is not installed or cannot build the kernel here")
    x = (torch.randn(4096, 2 * 1536, generator=torch.Generator().manual_seed(6)) * 8).to("cuda", torch.bfloat16)
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(silu_and_mul_fused(x), torch.nn.functional.silu(gate) * up)
