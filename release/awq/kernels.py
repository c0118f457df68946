"""Two steps of the experts as single GPU kernels (Triton), where torch's ops take several passes.

**The weighted sum of the routed rows** (`weighted_slot_sum_*`).

After the grouped products, each routed row y[r] (sorted by expert) is multiplied by its routing
weight, rounded to y's dtype, put back in token order and the token's k slots summed in fp32,
then rounded once. In torch that is `y.mul_(w)` (a bf16 x fp32 broadcast, which runs on
PyTorch's slow dynamic-cast path: 3.0 ms a 16k-token batch of GLM-4.7 on an H200), a row gather,
the fp32 sum and the cast: four passes over 1.3 GB. Here one kernel reads each row once and
writes the token's sum, with the same roundings (product rounded to y's dtype, fp32 sum, one
rounding at the end); only the order in which the k slots are added may differ from torch's
reduction, so the result agrees with `weighted_slot_sum_torch` to fp32 rounding before the
final cast.

**The gate** (`silu_and_mul`). transformers' `_default_apply_gate` splits [gate; up] into two
strided halves and runs `silu(gate) * up` as two non-vectorized passes (0.6 ms each a 16k-token
batch of GLM-4.7, at 131k routed rows); the kernel reads each row once and writes the product,
with torch's arithmetic (`x / (1 + exp(-x))` in fp32 with an IEEE division and libdevice's exp,
rounded to the dtype, then the product in fp32 rounded once). It is checked bit for bit against
torch's ops on a small case before use; on an H200 at GLM-4.7's dimensions a few of a MoE
block's outputs still differed from torch's by one bf16 ulp (an exp rounded otherwise), and a
side-by-side build chose the same scales for all 163 mappings with the same KL
(benchmarks/results/2026-12-03-h200-search-kernels). Only for experts whose gate is that
function with SiLU; `awq.triton_kernels: false` keeps torch's ops.

Triton ships with CUDA builds of torch, not CPU ones: elsewhere (and wherever a kernel fails
its first check against torch's ops on a small case) the torch ops run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any


def weighted_slot_sum_torch(y: Any, weights: Any, order: Any, back: Any, n_tok: int, k: int) -> Any:
    """Torch's ops: `y` rows sorted by expert (`order`: sorted position -> token x k + slot;
    `back`: its inverse), `weights` [n_tok, k]. Overwrites `y`."""
    import torch

    y.mul_(weights.reshape(-1)[order, None])  # computed in fp32, stored in y's dtype: no fp32 copy of y
    slots = y.index_select(0, back).view(n_tok, k, y.shape[-1])
    return slots.sum(dim=1, dtype=torch.float32).to(y.dtype)


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def weighted_slot_sum_kernel(y_ptr, w_ptr, back_ptr, out_ptr, hid, K: tl.constexpr, BLOCK: tl.constexpr):
        token = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < hid
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            row = tl.load(back_ptr + token * K + j).to(tl.int64)
            weight = tl.load(w_ptr + token * K + j).to(tl.float32)
            value = tl.load(y_ptr + row * hid + cols, mask=inside, other=0.0).to(tl.float32)
            acc += (value * weight).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + token.to(tl.int64) * hid + cols, acc.to(out_ptr.dtype.element_ty), mask=inside)

    return weighted_slot_sum_kernel


def weighted_slot_sum_fused(y: Any, weights: Any, back: Any, n_tok: int, k: int, block: int = 1024) -> Any:
    """The Triton kernel: the same sum without touching `y`."""
    import triton

    hid = y.shape[-1]
    out = y.new_empty(n_tok, hid)
    if n_tok:
        w = weights.reshape(-1).contiguous()
        grid = (n_tok, triton.cdiv(hid, block))
        _kernel()[grid](y, w, back.contiguous(), out, hid, K=k, BLOCK=block)
    return out


def triton_on(like: Any) -> bool:
    """A CUDA tensor and an importable Triton (CPU builds of torch ship none)."""
    if not like.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_sum_works(like: Any) -> bool:
    """Whether the kernel runs on `like`'s device (Triton present, a CUDA device) and agrees with
    torch's ops on a small case with uneven routing (tried once per caller's cache)."""
    import torch

    if not triton_on(like):
        return False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        n_tok, k, hid = 37, 3, 1100  # a partial column block, rows not a multiple of anything
        y = torch.randn(n_tok * k, hid, generator=gen).to(like.device, like.dtype)
        weights = torch.rand(n_tok, k, generator=gen).to(like.device)
        order = torch.randperm(n_tok * k, generator=gen).to(like.device)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        fused = weighted_slot_sum_fused(y, weights, back, n_tok, k).float()
        ref = weighted_slot_sum_torch(y.clone(), weights, order, back, n_tok, k).float()
        torch.cuda.synchronize(like.device)
    except Exception:  # a Triton or driver that cannot build it: torch's ops instead
        return False
    # equal but for the order of k fp32 additions, then one rounding to y's dtype: a unit in the last place
    ulp = ref.abs().clamp_min(1e-30) * torch.finfo(like.dtype).eps
    return bool(((fused - ref).abs() <= ulp).all())


@functools.cache
def _gate_kernel() -> Any:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def silu_and_mul_kernel(x_ptr, out_ptr, inter, rows_inner, outer_stride, inner_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # the output's row: (outer, inner) of the input's two row axes
        start = (row // rows_inner) * outer_stride + (row % rows_inner) * inner_stride
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < inter
        gate = tl.load(x_ptr + start + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + start + inter + cols, mask=inside, other=0.0)
        act = tl.math.div_rn(gate, 1.0 + libdevice.exp(-gate)).to(up.dtype)
        tl.store(out_ptr + row * inter + cols, (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype), mask=inside)

    return silu_and_mul_kernel


def silu_and_mul_fused(gate_up: Any, block: int = 1024) -> Any:
    """silu(gate) * up of `gate_up` [..., 2 x inter] (a unit last stride), as one kernel, into a
    new contiguous tensor. Two leading axes are read through their strides, so the experts'
    [E, tokens, 2 x inter] view of one [tokens, E x 2 x inter] product needs no copy first."""
    import triton

    two_inter = gate_up.shape[-1]
    if gate_up.dim() == 3 and gate_up.stride(2) == 1:
        rows = gate_up
        inner, outer_stride, inner_stride = gate_up.shape[1], gate_up.stride(0), gate_up.stride(1)
    else:
        rows = gate_up.reshape(-1, two_inter)  # a view where the leading axes allow it
        inner, outer_stride, inner_stride = max(1, rows.shape[0]), 0, rows.stride(0)
    out = gate_up.new_empty(*gate_up.shape[:-1], two_inter // 2)
    if out.numel():
        grid = (out.numel() // (two_inter // 2), triton.cdiv(two_inter // 2, block))
        _gate_kernel()[grid](rows, out, two_inter // 2, inner, outer_stride, inner_stride, BLOCK=block)
    return out


def silu_gate(experts: Any) -> bool:
    """Whether `experts`' gate is transformers' default split with SiLU (what the kernel computes)."""
    try:
        from transformers.activations import SiLUActivation
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return False
    gate = getattr(experts[0], "_apply_gate", None)
    owner = getattr(gate, "__self__", None)
    return (
        getattr(gate, "__func__", None) is _default_apply_gate
        and type(getattr(owner, "act_fn", None)) is SiLUActivation
    )


def gate_kernel_works(like: Any) -> bool:
    """Whether the gate kernel runs on `like`'s device and gives torch's bits on a small case
    (odd widths, a partial column block, values across SiLU's range)."""
    import torch

    if not triton_on(like):
        return False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = (torch.randn(67, 2 * 1100, generator=gen) * 6).to(like.device, like.dtype)
        gate, up = x.chunk(2, dim=-1)
        ref = torch.nn.functional.silu(gate) * up
        fused = silu_and_mul_fused(x)
        # the experts' layout: [tokens, E x 2 x inter] read as [E, tokens, 2 x inter]
        by_expert = x.view(67, 2, 1100).transpose(0, 1)
        g, u = by_expert.chunk(2, dim=-1)
        ref_by_expert = torch.nn.functional.silu(g) * u
        fused_by_expert = silu_and_mul_fused(by_expert)
        torch.cuda.synchronize(like.device)
    except Exception:  # a Triton or driver that cannot build it: torch's ops instead
        return False
    return bool(torch.equal(fused, ref) and torch.equal(fused_by_expert, ref_by_expert))


@dataclass(frozen=True)
class Kernels:
    """Which of this module's kernels the experts use on a device (each checked there first)."""

    weighted_sum: bool = False
    silu_gate: bool = False

    @classmethod
    def on(cls, like: Any) -> Kernels:
        return cls(weighted_sum=fused_sum_works(like), silu_gate=gate_kernel_works(like))

    def gate(self, experts: Any, gate_up: Any) -> Any:
        """The experts' activation of [gate; up]: the kernel where it computes their gate."""
        if self.silu_gate and silu_gate(experts):
            return silu_and_mul_fused(gate_up)
        return experts[0]._apply_gate(gate_up)


TORCH_OPS = Kernels()
