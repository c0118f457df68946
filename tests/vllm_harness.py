"""vLLM's own serving decisions for the cases glmrel's rules judge (run by the pinned vLLM's
Python, in the environment `make vllm-env` builds; never imported by glmrel).

    .vllm-env/bin/python tests/vllm_harness.py CASES.json OUT.json

For each case it asks vLLM's code, with the platform set to a CUDA GPU of the case's compute
capability (no GPU is needed: these are the pure-Python decisions vLLM takes before it
allocates anything):
- a linear layer: `choose_mp_linear_kernel` (every kernel's `can_implement`, in vLLM's order),
  then `compressed_tensors_wNa16`'s group-split check (`marlin_repeat_scales_on_all_ranks`,
  `verify_group_size_divides_partition`);
- the routed experts: `CompressedTensorsWNA16MoEMethod.create_weights`'s group checks (run on a
  one-expert layer) and `check_moe_marlin_supports_config`, as `select_wna16_moe_backend`
  calls it (tile padding allowed).
Writes {"vllm": version, "results": [{"kernel": name or null, "reason": text}, ...]}.
"""

from __future__ import annotations

import json
import logging
import sys
import types


def _fake_cuda(capability: list[int]):
    from vllm.platforms.interface import DeviceCapability, Platform, PlatformEnum

    class FakeCuda(Platform):
        _enum = PlatformEnum.CUDA
        device_name = "cuda"
        device_type = "cuda"

        @classmethod
        def get_device_capability(cls, device_id: int = 0) -> DeviceCapability:
            return DeviceCapability(*capability)

    return FakeCuda()


def main() -> None:
    logging.disable(logging.WARNING)
    cases = json.loads(open(sys.argv[1]).read())
    import vllm.platforms as platforms

    capability = [9, 0]
    platform = platforms._current_platform = _fake_cuda(capability)  # before any module binds it
    from vllm.platforms.interface import PlatformEnum

    platform._enum = PlatformEnum.UNSPECIFIED  # while importing: no CUDA-only imports (flash-attn, ...)
    import vllm._custom_ops as ops

    # import-time probes of compiled CUDA ops (fp8 GEMM support) that a CPU host cannot answer;
    # none of them takes part in a W4A16 decision
    for probe in (
        "cutlass_scaled_mm_supports_block_fp8",
        "cutlass_scaled_mm_supports_fp8",
        "cutlass_group_gemm_supported",
    ):
        if hasattr(ops, probe):
            setattr(ops, probe, lambda *a, **k: False)
    import torch
    import vllm
    from vllm.distributed.utils import verify_group_size_divides_partition
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
    from vllm.model_executor.layers.quantization.utils.marlin_utils import (
        check_moe_marlin_supports_config,
        marlin_repeat_scales_on_all_ranks,
    )
    from vllm.scalar_type import scalar_types

    moe_method = _moe_group_check()
    platform._enum = PlatformEnum.CUDA  # deciding: every module holds this one platform object
    results = []
    for c in cases:
        capability[:] = [c["cc"] // 10, c["cc"] % 10]
        act = getattr(torch, c["act"])
        gs = c["group_size"]
        if c["kind"] == "linear":
            cfg = MPLinearLayerConfig(
                full_weight_shape=(c["in_full"], c["out_full"]),
                partition_weight_shape=(c["in_per_rank"], c["out_per_rank"]),
                weight_type=scalar_types.uint4b8,  # compressed-tensors' symmetric int4
                act_type=act,
                group_size=gs,
                zero_points=False,
                out_type=act,
            )
            try:
                kernel = choose_mp_linear_kernel(cfg, c["cc"]).__name__.removesuffix("LinearKernel")
                if not marlin_repeat_scales_on_all_ranks(gs, c["in_per_rank"] != c["in_full"]):
                    verify_group_size_divides_partition(c["in_per_rank"], gs if gs != -1 else c["in_full"], c["layer"])
                results.append({"kernel": kernel, "reason": ""})
            except ValueError as e:
                results.append({"kernel": None, "reason": str(e).splitlines()[0][:300]})
        else:
            try:
                moe_method(c["hidden"], c["inter_per_rank"], gs, act)
            except ValueError as e:
                results.append({"kernel": None, "reason": str(e)[:300]})
                continue
            moe = types.SimpleNamespace(
                hidden_dim=c["hidden"], intermediate_size_per_partition_unpadded=c["inter_per_rank"]
            )
            if c["cc"] == 90:  # Humming first (prioritize_humming); its choice is made by the kernels at load
                results.append({"kernel": "WNA16MoE", "reason": ""})
                continue
            marlin = check_moe_marlin_supports_config(moe, gs, allow_tile_padding=True)
            results.append({"kernel": "MarlinMoE" if marlin else "TritonWNA16MoE", "reason": ""})
    json.dump({"vllm": vllm.__version__, "results": results}, open(sys.argv[2], "w"), indent=1)


def _moe_group_check():
    """CompressedTensorsWNA16MoEMethod.create_weights on a one-expert layer: its ValueErrors are
    vLLM's refusals of a group size for the MoE shapes (on the meta device: nothing allocated)."""
    import torch
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_wna16 as m,
    )

    cls = m.CompressedTensorsWNA16MoEMethod

    def check(hidden: int, inter: int, gs: int, act) -> None:
        method = cls.__new__(cls)  # the attributes create_weights reads, as __init__ sets them
        method.num_bits, method.packed_factor, method.group_size = 4, 8, gs
        method.strategy = "group" if gs != -1 else "channel"
        method.symmetric, method.actorder, method.has_bias = True, None, False
        method.moe = types.SimpleNamespace(has_bias=False, is_act_and_mul=True)
        layer = torch.nn.Module()
        with torch.device("meta"):
            method.create_weights(layer, 1, hidden, inter, act, intermediate_size_full=inter)

    return check


if __name__ == "__main__":
    main()
