"""release/awq/rope.py: GLM's rotary embedding as one kernel, with transformers' bits, and
transformers' own function wherever the kernel does not apply."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Glm4MoeConfig
from transformers.models.glm4_moe import modeling_glm4_moe as glm

from release.awq.hooks import HOOKS
from release.awq.rope import RopeKernel, fits, kernel_gives_stock_bits
from release.awq.stats import ScaleStats

ROOT = Path(__file__).resolve().parent.parent
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs a CUDA device")


def _glm47_qk(device: str, dtype: torch.dtype, b: int = 2, seq: int = 256) -> tuple[torch.Tensor, ...]:
    """q and k as GLM-4.7's attention makes them (transposed views of the projections'
    [b, s, heads, 128]), and cos/sin from its own rotary embedding (partial rotary 0.5)."""
    cfg = Glm4MoeConfig(hidden_size=5120, num_attention_heads=96, num_key_value_heads=8, head_dim=128)
    cfg.partial_rotary_factor = 0.5
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = (torch.randn(b, seq, 96 * 128, generator=gen) * 3).to(device, dtype).view(b, seq, 96, 128).transpose(1, 2)
    k = (torch.randn(b, seq, 8 * 128, generator=gen) * 3).to(device, dtype).view(b, seq, 8, 128).transpose(1, 2)
    with torch.device(device):
        rope = glm.Glm4MoeRotaryEmbedding(cfg)
    pos = torch.arange(seq, device=device).expand(b, -1)
    cos, sin = rope(q.transpose(1, 2), pos)
    return q, k, cos, sin


def test_the_hook_names_transformers_function():
    owner, name = HOOKS["rotary_embedding"].owner_and_name()
    assert getattr(owner, name) is glm.apply_rotary_pos_emb and HOOKS["rotary_embedding"].exact


def test_off_the_gpu_every_call_is_transformers_function():
    """On CPU tensors (and wherever `fits` says no) the call is transformers' own, unchanged, and
    the kernel is counted nowhere."""
    stats = ScaleStats()
    rope = RopeKernel(glm.apply_rotary_pos_emb, stats)
    q, k, cos, sin = _glm47_qk("cpu", torch.bfloat16, b=1, seq=16)
    assert not fits(q, cos, sin)
    got, want = rope(q, k, cos, sin), glm.apply_rotary_pos_emb(q, k, cos, sin)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert stats.fused_rope_calls == 0
    assert not kernel_gives_stock_bits(glm.apply_rotary_pos_emb, q), "no CUDA device: never the kernel"


@GPU
def test_the_kernel_gives_transformers_bits_at_glm47_size():
    """On a GPU, at GLM-4.7's attention (96 query and 8 key/value heads of 128, rotary 64): the
    same tensors bit for bit and in the same layout as transformers' function, in bf16 and fp16,
    with one row of positions for every batch row too; fp32 cos/sin (mixed dtypes) stay stock."""
    stock = glm.apply_rotary_pos_emb
    for dtype in (torch.bfloat16, torch.float16):
        stats = ScaleStats()
        rope = RopeKernel(stock, stats)
        q, k, cos, sin = _glm47_qk("cuda", dtype)
        assert kernel_gives_stock_bits(stock, q)
        for c, s in ((cos, sin), (cos[:1], sin[:1])):
            got, want = rope(q, k, c, s), stock(q, k, c, s)
            for g, w in zip(got, want):
                assert g.dtype == w.dtype and g.stride() == w.stride() and torch.equal(g, w)
        assert stats.fused_rope_calls == 2
        rope(q, k, cos.float(), sin.float())
        assert stats.fused_rope_calls == 2, "mixed dtypes promote in torch: transformers' function"


INTERPRETED = """
import torch
from transformers.models.glm4_moe import modeling_glm4_moe as glm
from release.awq.rope import rope_fused
from tests.test_rope import _glm47_qk

def truncated(x32):  # the interpreter's fp32 -> bf16 cast drops the low 16 bits (a GPU rounds to nearest even)
    return (x32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)

def same_arithmetic(x, cos, sin):  # each product rounded, their fp32 sum rounded, the rest copied
    rd, h = cos.shape[-1], cos.shape[-1] // 2
    c, s, xr = cos[:, None].float(), sin[:, None].float(), x[..., :rd].float()
    rot = torch.cat((-xr[..., h:], xr[..., :h]), -1)
    return torch.cat((truncated(truncated(xr * c).float() + truncated(rot * s).float()), x[..., rd:]), -1)

for b, seq in ((2, 37), (1, 64)):
    q, k, cos, sin = _glm47_qk("cpu", torch.float16, b=b, seq=seq)  # numpy's fp16 cast rounds as a GPU does
    for c, s in ((cos, sin), (cos[:1].expand(b, -1, -1), sin[:1].expand(b, -1, -1))):
        for x, want in zip((q, k), glm.apply_rotary_pos_emb(q, k, c, s)):
            got = rope_fused(x, c, s)
            assert got.stride() == want.stride() and torch.equal(got, want), (b, seq)
    q, k, cos, sin = _glm47_qk("cpu", torch.bfloat16, b=b, seq=seq)
    for x in (q, k):
        assert torch.equal(rope_fused(x, cos, sin), same_arithmetic(x, cos, sin)), (b, seq)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (CPU torch ships none)")
def test_the_kernel_under_tritons_interpreter_indexes_and_rounds_as_transformers():
    """Where Triton is installed, its interpreter runs the kernel on the CPU (TRITON_INTERPRET=1):
    in fp16, whose cast the interpreter rounds as a GPU does, the kernel gives transformers'
    tensors at GLM-4.7's shapes (every index, the rotated half's sign, the copied rest, one row
    of positions for every batch row); in bf16 it gives the same arithmetic under the
    interpreter's truncating cast. The GPU test checks the bits on a device."""
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
