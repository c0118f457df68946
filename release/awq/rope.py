"""GLM-4-MoE's rotary embedding as one GPU kernel per tensor, with transformers' bits.

transformers' `apply_rotary_pos_emb` (glm4_moe) rotates the first `rotary_dim` features of each
head of q and k and keeps the rest: it slices, multiplies by cos, builds `rotate_half` with a
negation and a `cat`, multiplies by sin, adds, and `cat`s the rotated part back to the rest.
That is about ten passes over q, most of them over a transposed view. In the grid search's
attention forwards at GLM-4.7's size the `mul`, `cat` and `copy_` kernels, the rotary
embedding's among them (every `cat`), took 158 of 438 ms of GPU time over 32 forwards, more
than SDPA's 52 ms (benchmarks/results/2026-12-03-h200-search-kernels, `call1-sf-new-1.log`).

`rope_fused` reads each element of q (or k) once, through its strides, and writes the
contiguous [batch, heads, seq, head_dim] tensor that transformers' `cat` returns, with the same
arithmetic: each product rounded to the dtype (`q * cos`, `rotate_half(q) * sin`), their sum
in fp32 rounded once, the features beyond `rotary_dim` copied. It is checked for equality with
transformers' function on a small case on each device and dtype before use (`RopeKernel`); any
other call (a CPU tensor, mixed dtypes, autograd, a layout it does not know) takes
transformers' function. Same bits, so where it is on (`fused_rope` with `triton_kernels`) it
runs in the calibration and propagation passes as in the search.

On by default (`fused_rope`). On an H100 (session 40, benchmarks/results/
2026-12-07-h100-fused-rope-and-offload-save-split) `tests/test_rope.py` passed, the search's
attention forward at GLM-4.7's size gave transformers' output bits and took 11.75 and 12.04 ms
a 16k-token batch against 13.80 and 13.88 ms, and a two-MoE-layer oneshot at 512 x 2048 chose
all 326 scales bit for bit with 2.4 s less smoothing a layer. On the CPU, Triton's interpreter
(where Triton is installed) runs it at GLM-4.7's shapes: transformers' tensors in fp16, and the
same arithmetic in bf16 under the interpreter's truncating cast (tests/test_rope.py); the
suite's CPU checks the fallback.
"""

from __future__ import annotations

import functools
from typing import Any

from .kernels import triton_on


@functools.cache
def _rope_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def rope_kernel(
        x_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        rows,
        heads,
        seq,
        xsb,
        xsh,
        xss,
        csb,
        css,
        ROTARY: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
    ):
        # output row r = ((b * heads) + h) * seq + s, contiguous [b, h, s, d]
        r = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
        d = tl.arange(0, HEAD_DIM)[None, :]
        inside = r < rows
        s = r % seq
        h = (r // seq) % heads
        b = r // (seq * heads)
        base = b * xsb + h * xsh + s * xss
        x = tl.load(x_ptr + base + d, mask=inside, other=0.0)
        half = ROTARY // 2
        rotated = d < ROTARY
        partner = tl.where(d < half, d + half, d - half)
        xp = tl.load(x_ptr + base + partner, mask=inside & rotated, other=0.0)
        trig = b * csb + s * css + d
        c = tl.load(cos_ptr + trig, mask=inside & rotated, other=0.0)
        sn = tl.load(sin_ptr + trig, mask=inside & rotated, other=0.0)
        # rotate_half: (-x2, x1); a negation is exact, and so its product rounds to minus the product's
        dtype = out_ptr.dtype.element_ty
        first = (x.to(tl.float32) * c.to(tl.float32)).to(dtype).to(tl.float32)
        second = (xp.to(tl.float32) * sn.to(tl.float32)).to(dtype).to(tl.float32)
        embed = (first + tl.where(d < half, -second, second)).to(dtype)
        tl.store(out_ptr + r * HEAD_DIM + d, tl.where(rotated, embed, x), mask=inside)

    return rope_kernel


def rope_fused(x: Any, cos: Any, sin: Any, block_rows: int = 16) -> Any:
    """`x` [b, h, s, d] (any strides, a unit last one) rotated by `cos`/`sin` [b, s, rotary]
    (a unit last stride) in its first `rotary` features, into a new contiguous tensor."""
    import triton

    b, h, s, d = x.shape
    out = x.new_empty(b, h, s, d)
    rows = b * h * s
    if rows:
        grid = (triton.cdiv(rows, block_rows),)
        _rope_kernel()[grid](
            x,
            cos,
            sin,
            out,
            rows,
            h,
            s,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            cos.stride(0),
            cos.stride(1),
            ROTARY=cos.shape[-1],
            HEAD_DIM=d,
            BLOCK_ROWS=block_rows,
        )
    return out


def fits(x: Any, cos: Any, sin: Any) -> bool:
    """Whether the kernel computes transformers' function for these arguments: CUDA tensors of
    one 16-bit float dtype, no autograd, a power-of-two head_dim with an even rotary part,
    cos/sin [b or 1, s, rotary] alike, unit last strides."""
    import torch

    if not (x.is_cuda and cos.is_cuda and sin.is_cuda) or x.dim() != 4 or cos.dim() != 3:
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) or cos.dtype != x.dtype or sin.dtype != x.dtype:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
        return False
    d, rotary = x.shape[-1], cos.shape[-1]
    if d & (d - 1) or rotary % 2 or not 0 < rotary <= d:
        return False
    if cos.shape != sin.shape or cos.stride() != sin.stride() or cos.shape[1] != x.shape[2]:
        return False
    if cos.shape[0] not in (1, x.shape[0]) or x.stride(-1) != 1 or cos.stride(-1) != 1:
        return False
    return True


class RopeKernel:
    """transformers' `apply_rotary_pos_emb` for glm4_moe, replaced for the engine's run: the
    kernel where `fits` and where it gave transformers' bits on this device and dtype (checked
    once each), else `stock`. Its uses are counted in `stats.fused_rope_calls`."""

    def __init__(self, stock: Any, stats: Any) -> None:
        self.stock = stock
        self.stats = stats
        self._works: dict[tuple[Any, ...], bool] = {}

    def works(self, like: Any) -> bool:
        key = (like.device, like.dtype)
        if key not in self._works:
            self._works[key] = kernel_gives_stock_bits(self.stock, like)
        return self._works[key]

    def __call__(self, q: Any, k: Any, cos: Any, sin: Any, unsqueeze_dim: int = 1) -> Any:
        if unsqueeze_dim != 1 or not (fits(q, cos, sin) and fits(k, cos, sin)) or not self.works(q):
            return self.stock(q, k, cos, sin, unsqueeze_dim)
        if cos.shape[0] != q.shape[0]:  # one row of positions for every batch row
            cos, sin = cos.expand(q.shape[0], -1, -1), sin.expand(q.shape[0], -1, -1)
        self.stats.fused_rope_calls += 1
        return rope_fused(q, cos, sin), rope_fused(k, cos, sin)


def kernel_gives_stock_bits(stock: Any, like: Any) -> bool:
    """Whether the kernel runs on `like`'s device and returns `stock`'s tensors, bit for bit and
    in its layout, on small cases of GLM's shapes: q and k as transposed views of the
    projections' [b, s, heads, d], a partial and a full rotary part, uneven rows, values of
    both signs and magnitudes."""
    import torch

    if not triton_on(like):
        return False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        for rotary in (64, 128):
            b, s, hq, hk, d = 2, 37, 5, 3, 128
            q = (torch.randn(b, s, hq, d, generator=gen) * 4).to(like.device, like.dtype).transpose(1, 2)
            k = (torch.randn(b, s, hk, d, generator=gen) * 4).to(like.device, like.dtype).transpose(1, 2)
            angles = torch.rand(b, s, rotary, generator=gen) * 50
            cos, sin = (f(angles).to(like.device, like.dtype) for f in (torch.cos, torch.sin))
            want = stock(q, k, cos, sin)
            got = (rope_fused(q, cos, sin), rope_fused(k, cos, sin))
            for w, g in zip(want, got):
                if w.dtype != g.dtype or w.stride() != g.stride() or not torch.equal(w, g):
                    return False
        torch.cuda.synchronize(like.device)
    except Exception:  # a Triton or driver that cannot build it: transformers' function instead
        return False
    return True
