"""The grid search's forwards alone: one MoE block and one attention at a preset's dimensions,
run the way AWQ's smoothing runs them (merged batches, a reference output, a forward and an MSE
loss per grid point), timed and profiled without building a model or running oneshot.

The search is most of a layer's time (issue 28: 202 of a GLM-4.7 MoE layer's 231 s for three
group sizes), and a profile of the whole pipeline mixes it with loading, calibration and
offload. This isolates the two parents whose forwards the grid search repeats:

- `moe`: `Glm4MoeMoE` with its experts as llm-compressor's `LinearExperts2D` (what oneshot
  sees), the experts' forward as the engine runs it inside the search
  (`grouped_experts_forward`, torch's grouped GEMM where it works), router and shared expert
  included;
- `attention`: `Glm4MoeAttention` under SDPA on stacked samples, with the attention mask the
  calibration pipeline caches (`--mask eager`: the materialized [b, 1, q, k] causal mask eager
  attention builds) or none (`--mask none`: SDPA's own causal flag);
- `mlp` (with `--parts`): a dense layer's `Glm4MoeMLP`.

`--rope stock,fused` times attention with transformers' rotary embedding and with the engine's
kernel (release/awq/rope.py, patched in as the engine's run does), and checks that one batch's
attention output is the same bits both ways.

  python -m benchmarks.search_forward --preset glm47 --device cuda --batches 8 --grid 3 --profile

Weights are random (std 0.02) and each grid point bumps the run's weight generation, so the
experts are restacked as in the search; the weights' values do not change the kernels. The
figure `projected_s` scales the measured time per merged batch to `--project-samples` x
`--seq` tokens and 21 forwards (20 grid points and the reference), one branch's search of
this parent. `--experts-module FILE` runs another copy of release/awq/experts.py (e.g. an older
commit's) for a before/after on the same machine.

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import time
from pathlib import Path
from typing import Any


def _config(preset: str) -> Any:
    from transformers import Glm4MoeConfig

    from release.tiny import GLM4MOE_FEATURES

    from .synthetic import PRESETS

    p = dict(PRESETS[preset])
    p.pop("layers", None)
    p.pop("vocab_size", None)
    cfg = Glm4MoeConfig(num_hidden_layers=1, **{**GLM4MOE_FEATURES, "first_k_dense_replace": 0}, **p)
    cfg._attn_implementation = "sdpa"
    return cfg


def _experts_module(path: str | None) -> Any:
    """release/awq/experts.py, or the copy at `path` (loaded inside the package, for its
    relative imports)."""
    if path is None:
        from release.awq import experts

        return experts
    spec = importlib.util.spec_from_file_location("release.awq._other_experts", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _init(module: Any) -> None:
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)


def moe_block(cfg: Any, device: str, experts_module: Any, use_kernels: bool) -> tuple[Any, Any, dict[str, Any]]:
    """The MoE block with LinearExperts2D experts whose forward is the search's, the run
    state whose generation a grid point bumps, and the paths it takes (a dict the caller may
    change between forwards)."""
    import torch
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    from release.awq.state import RunState

    with torch.device(device):
        block = Glm4MoeMoE(cfg)
    _init(block)
    with torch.no_grad():
        block.gate.e_score_correction_bias.normal_(0, 0.01)
    linear = LinearExperts2D.get_linear_experts_cls(type(block.experts)).from_experts_module(block.experts, cfg)
    block.experts = linear.to(device)
    block.to(torch.bfloat16)
    block.gate.e_score_correction_bias.data = block.gate.e_score_correction_bias.float()
    run = RunState(routed=True, smoothing=True)
    like = next(block.parameters())
    paths: dict[str, Any] = {"grouped": experts_module.grouped_gemm_works(like)}
    if hasattr(experts_module, "Kernels"):  # an older copy has no kernels
        paths["kernels"] = experts_module.Kernels.on(like) if use_kernels else experts_module.TORCH_OPS

    def forward(self: Any, hidden: Any, top_k_index: Any, top_k_weights: Any) -> Any:
        return experts_module.grouped_experts_forward(self, hidden, top_k_index, top_k_weights, run=run, **paths)

    block.experts.forward = forward.__get__(block.experts)
    return block, run, paths


def attention(cfg: Any, device: str) -> tuple[Any, Any]:
    import torch
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeAttention, Glm4MoeRotaryEmbedding

    with torch.device(device):
        attn = Glm4MoeAttention(cfg, layer_idx=0)
        rope = Glm4MoeRotaryEmbedding(cfg)
    _init(attn)
    return attn.to(torch.bfloat16), rope


def _eager_mask(b: int, seq: int, device: str) -> Any:
    """The causal mask eager attention's pipeline caches: 0 where a query may attend, the
    dtype's minimum elsewhere, [b, 1, q, k]."""
    import torch

    keep = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(seq, seq, dtype=torch.bfloat16, device=device)
    mask.masked_fill_(~keep, torch.finfo(torch.bfloat16).min)
    return mask.expand(b, 1, seq, seq).contiguous()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _search(forward: Any, batches: list[Any], grid: int, run: Any, device: str) -> tuple[float, float]:
    """A reference forward, then `grid` grid points of forward + MSE sum; seconds per grid point."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        refs = [forward(b) for b in batches]
        _sync(device)
        t = time.perf_counter()
        total = 0.0
        for _ in range(grid):
            if run is not None:
                run.generation += 1
            loss = torch.zeros((), device=device)
            for b, ref in zip(batches, refs):
                loss += F.mse_loss(ref, forward(b), reduction="sum")
            total += loss.item()
        return (time.perf_counter() - t) / grid, total


@contextlib.contextmanager
def _rope(kind: str) -> Any:
    """transformers' rotary embedding (`stock`), or the engine's kernel patched in for the block
    (`fused`), as the engine's run patches it; yields the stats that count the kernel's calls."""
    from release.awq.hooks import HOOKS, Patches
    from release.awq.rope import RopeKernel
    from release.awq.stats import ScaleStats

    stats = ScaleStats()
    patches = Patches()
    if kind == "fused":
        patches.hook("rotary_embedding", RopeKernel(getattr(*HOOKS["rotary_embedding"].owner_and_name()), stats))
    elif kind != "stock":
        raise SystemExit(f"--rope {kind!r}: stock or fused")
    try:
        yield stats
    finally:
        patches.undo()


def _table(prof: Any, rows: int) -> str:
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70)


def _profiled(forward: Any, batches: list[Any], run: Any, device: str, rows: int) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        _search(forward, batches, 1, run, device)
    return _table(prof, rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="glm47")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--merge", type=int, default=8, help="samples per merged batch (search_batch_tokens / seq)")
    ap.add_argument("--batches", type=int, default=8, help="merged batches per grid point")
    ap.add_argument("--grid", type=int, default=3, help="grid points timed")
    ap.add_argument("--parts", default="moe,attention", help="any of moe, attention, mlp (a dense layer's)")
    ap.add_argument("--mask", default="eager,none", help="attention masks to time: eager and/or none")
    ap.add_argument("--experts-module", help="another copy of release/awq/experts.py to run")
    ap.add_argument("--torch-ops", action="store_true", help="torch's ops for the gate and the sum, not kernels.py")
    ap.add_argument("--rope", default="stock", help="attention's rotary embedding: stock and/or fused (rope.py)")
    ap.add_argument("--label", default="")
    ap.add_argument("--project-samples", type=int, default=512)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one grid point")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    cfg = _config(args.preset)
    dev = args.device
    gen = torch.Generator(device="cpu").manual_seed(0)
    hid = cfg.hidden_size
    shape = (args.merge, args.seq, hid)
    batches = [torch.randn(shape, generator=gen).to(dev, torch.bfloat16) for _ in range(args.batches)]
    scale = args.project_samples / (args.merge * args.batches) * 21
    out: dict[str, Any] = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name() if dev.startswith("cuda") else dev,
        "tokens_per_batch": args.merge * args.seq,
        "batches": args.batches,
        "grid": args.grid,
        "label": args.label,
        "experts_module": args.experts_module,
        "parts": {},
    }
    parts = args.parts.split(",")

    def timed(name: str, forward: Any, inputs: list[Any], run: Any, label: str = "") -> dict[str, Any]:
        """A warm-up grid point (kernels chosen, buffers made), then `args.grid` timed ones."""
        _search(forward, inputs[:1], 1, run, dev)
        s, loss = _search(forward, inputs, args.grid, run, dev)
        out["parts"][name] = {"s_per_grid_point": round(s, 4), "projected_s": round(s * scale, 2), "loss": loss}
        print(
            f"{label or name}: {s * 1e3 / args.batches:.2f} ms per merged batch, projected {s * scale:.2f} s",
            flush=True,
        )
        if args.profile:
            print(_profiled(forward, inputs, run, dev, args.rows), flush=True)
        return out["parts"][name]

    flat = [b.view(1, -1, hid) for b in batches]  # token-wise parents: one sample of 8 x 2048 tokens
    if "moe" in parts:
        block, run, paths = moe_block(cfg, dev, _experts_module(args.experts_module), not args.torch_ops)
        shown = {k: vars(v) if k == "kernels" else v for k, v in paths.items()}
        moe = timed("moe", block, flat, run, f"moe {shown}")
        moe["paths"] = shown
        used = paths.get("kernels")
        if used is not None and (used.weighted_sum or used.silu_gate):  # against torch's ops, one batch
            with torch.no_grad():
                fused = block(flat[0]).float()
                paths["kernels"] = type(used)()  # torch's ops
                ops = block(flat[0]).float()
                paths["kernels"] = used
            moe["kernels_vs_torch"] = {
                "max_abs_diff": (fused - ops).abs().max().item(),
                "max_abs": ops.abs().max().item(),
                "bit_equal_fraction": (fused == ops).float().mean().item(),
            }
            print(f"kernels against torch's ops: {moe['kernels_vs_torch']}", flush=True)
        del block, run, paths
    if "mlp" in parts:  # a dense layer's MLP, the parent of its gate/up mapping
        from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMLP

        with torch.device(dev):
            mlp = Glm4MoeMLP(cfg)
        _init(mlp)
        timed("mlp", mlp.to(torch.bfloat16), flat, None)
        del mlp
    if "attention" in parts:
        attn, rope = attention(cfg, dev)
        pos = torch.arange(args.seq, device=dev).expand(args.merge, -1)
        cos_sin = rope(batches[0], pos)
        for kind in args.mask.split(","):
            mask = _eager_mask(args.merge, args.seq, dev) if kind == "eager" else None

            def forward(x: Any, mask: Any = mask) -> Any:
                return attn(x, position_embeddings=cos_sin, attention_mask=mask)[0]

            for rope_kind in args.rope.split(","):
                name = f"attention_mask_{kind}" + ("_fused_rope" if rope_kind == "fused" else "")
                with _rope(rope_kind) as stats:
                    part = timed(name, forward, batches, None)
                    if rope_kind == "fused":  # one batch with the kernel, then (unpatched) without
                        with torch.no_grad():
                            first = forward(batches[0])
                if rope_kind == "fused":
                    with torch.no_grad():
                        stock = forward(batches[0])
                    part["fused_rope_calls"] = stats.fused_rope_calls
                    part["equal_to_stock"] = bool(torch.equal(first, stock))
                    print(
                        f"{name}: {stats.fused_rope_calls} kernel calls, output equal to stock's: "
                        f"{part['equal_to_stock']}",
                        flush=True,
                    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
