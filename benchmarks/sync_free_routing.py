"""The fused calibration forward's routed rows (release/awq/all_experts.py) sliced by the
experts' counts, which the host reads back from the device once a call, against taken under a
mask of each chunk's experts (`ScaleOptions.sync_free_routing`): one MoE block's experts with
GLM-4.7's dimensions (160 experts top-8, hidden 5120, intermediate 1536) on one 2,048-token
sample, random weights and routing.

  python -m benchmarks.sync_free_routing --device cuda
  python -m benchmarks.sync_free_routing --experts 8 --hidden 64 --inter 32 --tokens 64   # CPU

Prints whether the two outputs are equal bit for bit (with torch's grouped GEMM where it works
on the device: the routed-down product per chunk against one over every expert), and the
milliseconds a call of each, `--iters` calls back to back per timing, the modes alternated
`--repeats` times. No hook is registered here, so the host queues little work after the wait;
in the calibration pass AWQ's and the coverage's batched hooks follow it. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import time


def experts_module(n_experts: int, hidden: int, inter: int, top_k: int, device: str, dtype: object) -> object:
    """llm-compressor's per-expert Linears (LinearExperts2D) from transformers' GLM-4-MoE experts,
    weights drawn on `device`."""
    import torch
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeExperts

    cfg = Glm4MoeConfig(
        hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=n_experts, num_experts_per_tok=top_k
    )
    with torch.device(device):
        fused = Glm4MoeExperts(cfg).to(dtype)
        gen = torch.Generator(device=device).manual_seed(0)
        for p in fused.parameters():
            p.data.normal_(0, 0.02, generator=gen)
        experts = LinearExperts2D.get_linear_experts_cls(type(fused)).from_experts_module(fused, cfg)
    del fused
    return experts.to(device, dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--experts", type=int, default=160)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--inter", type=int, default=1536)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-bytes", type=int, default=None, help="the chunks' budget (default: the engine's)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import torch

    from release.awq import all_experts
    from release.awq.all_experts import all_experts_forward
    from release.awq.experts import grouped_gemm_works
    from release.awq.kernels import TORCH_OPS
    from release.awq.state import RunState

    if a.chunk_bytes:
        all_experts.CHUNK_BYTES = a.chunk_bytes
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    experts = experts_module(a.experts, a.hidden, a.inter, a.top_k, a.device, dtype)
    gen = torch.Generator(device=a.device).manual_seed(1)
    hidden = torch.randn(a.tokens, a.hidden, device=a.device, dtype=dtype, generator=gen)
    logits = torch.randn(a.tokens, a.experts, device=a.device, generator=gen)
    weights, index = torch.topk(logits.softmax(-1), a.top_k, dim=-1)
    run = RunState()
    grouped = grouped_gemm_works(hidden)
    built_s = time.perf_counter() - t0

    def call(sync_free: bool) -> torch.Tensor:
        return all_experts_forward(
            experts, hidden, index, weights, run, True, None, grouped, TORCH_OPS, sync_free=sync_free
        )

    def sync() -> None:
        if hidden.is_cuda:
            torch.cuda.synchronize()

    with torch.no_grad():
        sliced, masked = call(False), call(True)
        equal = bool(torch.equal(sliced, masked))
        max_diff = (sliced.float() - masked.float()).abs().max().item()
        ms: dict[str, list[float]] = {"sliced": [], "masked": []}
        for _ in range(a.repeats):
            for name, free in (("sliced", False), ("masked", True)):
                sync()
                t = time.perf_counter()
                for _ in range(a.iters):
                    call(free)
                sync()
                ms[name].append(round((time.perf_counter() - t) * 1000 / a.iters, 3))
    per_expert = a.tokens * (5 * a.inter + a.hidden) * hidden.element_size()
    record = {
        "device": torch.cuda.get_device_name() if hidden.is_cuda else "cpu",
        "shape": {k: getattr(a, k) for k in ("experts", "top_k", "hidden", "inter", "tokens")},
        "chunks": -(-a.experts // max(1, all_experts.CHUNK_BYTES // per_expert)),
        "grouped_gemm": grouped,
        "bit_equal": equal,
        "max_abs_diff": max_diff,
        "ms_per_call": ms,
        "iters": a.iters,
        "built_s": round(built_s, 1),
    }
    print(json.dumps(record, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
