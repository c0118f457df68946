"""One AWQ grid point's quantization of a MoE block's balance layers: stock llm-compressor's
per-layer path against glmrel's batched balance layers (release/awq/), same inputs, same outputs.

At GLM-4.7 size the MoE block's AWQ mapping balances 322 Linears (160 experts' gate and up
projections and the shared expert's, each [1536, 5120]) and quantizes all of them at each of
its 20 grid points, on every data-parallel rank: a cost that does not shrink with more GPUs.

  python -m benchmarks.balance_quant --device cuda                   # GLM-4.7's MoE block
  python -m benchmarks.balance_quant --experts 8 --out 32 --in 256   # CPU, seconds

Prints milliseconds per grid point for each path and whether the weights, scales and zero points
they leave are equal bit for bit; `--profile` adds the GPU kernels of glmrel's step. Nothing here
asserts a speed.
"""

from __future__ import annotations

import argparse
import time


def quantized_linears(
    shapes: list[tuple[int, int]],
    preset: str = "W4A16",
    group_size: int | str | None = None,
    device: str = "cpu",
    std: float = 0.02,
) -> list:
    """bf16 Linears [out, in] initialised for `preset` (group size `group_size`; None: the
    preset's; "channel": one scale per output row), with the min/max weight observers AWQ's
    grid search gives them: as llm-compressor leaves balance layers for that search."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from llmcompressor.observers.base import Observer

    torch.manual_seed(0)
    layers = []
    for out_f, in_f in shapes:
        lin = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16)
        torch.nn.init.normal_(lin.weight, std=std)
        scheme = preset_name_to_scheme(preset, ["Linear"])
        if group_size == "channel":
            scheme.weights = QuantizationArgs(num_bits=scheme.weights.num_bits, symmetric=True, strategy="channel")
        elif group_size is not None:
            scheme.weights.group_size = group_size
        initialize_module_for_quantization(lin, scheme)
        lin.quantization_status = QuantizationStatus.CALIBRATION
        observer = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=scheme.weights)
        lin.register_module("weight_observer", observer)
        layers.append(lin)
    return layers


def build(experts: int, out_f: int, in_f: int, group_size: int, device: str) -> list:
    """2 x experts + 2 balance layers: gate and up of each expert and of one shared expert."""
    return quantized_linears([(out_f, in_f)] * (2 * experts + 2), "W4A16", group_size, device)


def stock_step(layers: list, orig: dict, scales) -> None:
    """llmcompressor 0.14.0.1's `_compute_best_scale`, the balance layers' part of one grid point."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from llmcompressor.modifiers.quantization.calibration import observe, update_qparams

    for lin in layers:
        lin.weight.data.copy_(orig[lin] * scales)
        lin.weight_observer.delete_statistics(check_fused=False)
    observe(layers, "weight")
    update_qparams(layers, "weight", only_update_onload=True)
    for lin in layers:
        args = lin.quantization_scheme.weights
        lin.weight.data = (forward_quantize(lin, lin.weight, "weight", args) / scales).to(lin.weight.dtype)


def glmrel_step(groups: list, orig: dict, scales) -> None:
    from release.awq.balance import _quantize_balance_group

    for group in groups:
        _quantize_balance_group(group, orig, scales)


def timed(fn, reps: int, device: str) -> float:
    """Mean seconds of `fn()` over `reps` runs after one warm-up, to the device's completion."""
    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


def snapshot(layers: list) -> list:
    return [
        tuple(getattr(lin, n).detach().clone() for n in ("weight", "weight_scale", "weight_zero_point"))
        for lin in layers
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=160)
    ap.add_argument("--out", type=int, default=1536, help="an expert's intermediate size (moe_intermediate_size)")
    ap.add_argument("--in", dest="in_f", type=int, default=5120, help="hidden size")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="also list the GPU kernels of one glmrel step")
    a = ap.parse_args()

    import torch

    from release.awq.balance import balance_groups

    layers = build(a.experts, a.out, a.in_f, a.group_size, a.device)
    orig = {lin: lin.weight.detach().clone() for lin in layers}
    scales = (torch.rand(1, a.in_f, device=a.device) * 2 + 0.1).float()
    groups = balance_groups(layers)
    with torch.no_grad():
        stock_s = timed(lambda: stock_step(layers, orig, scales), a.reps, a.device)
        stock_out = snapshot(layers)
        ours_s = timed(lambda: glmrel_step(groups, orig, scales), a.reps, a.device)
        ours_out = snapshot(layers)
    same = all(torch.equal(x, y) for s, o in zip(stock_out, ours_out) for x, y in zip(s, o))
    gib = sum(lin.weight.numel() for lin in layers) * 2 / 2**30
    where = torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device
    print(f"{len(layers)} balance layers [{a.out}, {a.in_f}] bf16 ({gib:.2f} GiB), W4A16 GS{a.group_size}, on {where}")
    print(f"stock, layer by layer:  {stock_s * 1e3:9.1f} ms per grid point")
    print(f"glmrel (batched balance layers):      {ours_s * 1e3:9.1f} ms per grid point ({stock_s / ours_s:.1f}x)")
    print(f"bit for bit: {same}")
    if a.profile and a.device.startswith("cuda"):
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            glmrel_step(groups, orig, scales)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))


if __name__ == "__main__":
    main()
