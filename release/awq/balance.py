"""Batched balance layers: a grid point quantizes same-shape balance layers together."""

from __future__ import annotations

import time
from typing import Any

from .experts import candidate_scales, expert_chunk


def balance_groups(layers: list[Any]) -> list[list[Any]] | None:
    """Batched balance layers: the balance layers stock's grid search quantizes (those with a weight scheme),
    grouped by weight shape, dtype, device and quantization arguments. None where one of them is
    not quantized row by row from its min/max (a per-tensor, block, global or dynamic scale, or
    an already compressed weight): stock's loop then runs."""
    import torch
    from compressed_tensors.quantization import QuantizationStatus, QuantizationStrategy

    row_wise = (QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP)
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for layer in layers:
        args = getattr(getattr(layer, "quantization_scheme", None), "weights", None)
        if args is None:
            continue  # stock leaves its weight alone during the search
        w = getattr(layer, "weight", None)
        status = getattr(layer, "quantization_status", None)
        if (
            not isinstance(w, torch.Tensor)
            or w.dim() != 2
            or args.strategy not in row_wise
            or args.dynamic is not False
            or status is None
            or status >= QuantizationStatus.COMPRESSED
            or not hasattr(layer, "weight_scale")
            or getattr(layer, "weight_global_scale", None) is not None
        ):
            return None
        groups.setdefault((tuple(w.shape), w.dtype, w.device, repr(args)), []).append(layer)
    return list(groups.values())


def _quantize_balance_group(
    layers: list[Any], orig: dict[Any, Any], scales: Any, budget_bytes: int = 2 * 2**30
) -> None:
    """Batched balance layers, one grid point for layers of one shape and scheme: what stock does layer by layer
    (W*s rounded to the weight's dtype, min/max observer, `calculate_qparams`, `forward_quantize`,
    then /s), for a chunk of layers at a time. Each layer's weight, and its onloaded scale and
    zero point, become tensors of their own, as stock's are: compressed-tensors' offload assumes
    a parameter owns its storage (on CPU ranks, whose onloaded parameter is the shared offloaded
    one, views of a chunk left the ranks' quantization scales unshared at the layer's end)."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.observers.helpers import flatten_for_calibration

    first = layers[0]
    args = first.quantization_scheme.weights
    out_f, in_f = first.weight.shape
    dtype, device = first.weight.dtype, scales.device
    # W*s in the weight's dtype and the fake quantization's intermediates: ~12 bytes an element.
    # Products and quotients are written straight into tensors of the weight's dtype (`out=`): the
    # arithmetic runs in the promoted dtype and is rounded once on the write, as stock's
    # `(orig * s)` copied into the weight and `(Q(W*s) / s).to(dtype)` are, without their
    # full-size fp32 temporaries.
    chunk = expert_chunk(out_f * in_f * 12, budget_bytes)
    for start in range(0, len(layers), chunk):
        group = layers[start : start + chunk]
        ws = torch.empty((len(group) * out_f, in_f), dtype=dtype, device=device)
        for i, layer in enumerate(group):
            torch.mul(orig[layer].to(device), scales, out=ws[i * out_f : (i + 1) * out_f])
        observed = flatten_for_calibration(ws, "weight", args)
        qscale, qzero = calculate_qparams(torch.amin(observed, dim=(0, -1)), torch.amax(observed, dim=(0, -1)), args)
        fq = fake_quantize(ws, qscale, qzero, args)
        del ws, observed
        for i, layer in enumerate(group):
            rows = slice(i * out_f, (i + 1) * out_f)
            weight = torch.empty((out_f, in_f), dtype=dtype, device=device)  # stock: a new tensor per layer
            layer.weight.data = torch.div(fq[rows], scales, out=weight)
            layer.weight_scale.data = qscale[rows].clone()  # as update_qparams(only_update_onload=True)
            if getattr(layer, "weight_zero_point", None) is not None:
                layer.weight_zero_point.data = qzero[rows].clone()
        del fq


def batched_balance_search(
    modifier: Any,
    mapping: Any,
    fp16_outputs: Any,
    orig_layer_weights: dict[Any, Any],
    groups: list[list[Any]],
    phases: dict[str, float],
    losses: list[float] | None = None,
) -> Any:
    """Batched balance layers: llm-compressor 0.14.0.1's `AWQModifier._compute_best_scale`, step for step (less
    its progress bar and debug log), but for the balance layers' quantization at each grid point
    (`_quantize_balance_group`); `phases` adds up its time by phase. Stock
    swaps in min/max weight observers for the search and fuses observers of TENSOR_GROUP layers
    only: `balance_groups` admits neither observer state nor such layers, so neither applies."""
    import torch
    from llmcompressor.modifiers.transform.awq import base as awq_base

    history = []
    best_ratio = -1
    best_scales = None
    best_error = float("inf")
    initial_error = None
    device = awq_base.get_execution_device(mapping.parent)
    x_sum, count = modifier._smooth_activation_stats[mapping.smooth_name]
    if awq_base.is_distributed():
        x_sum, count = awq_base._allreduce_data_sum([x_sum, count])
    x_mean = x_sum.to(device) / count.to(device)
    w_mean = modifier._compute_layer_means(mapping.balance_layers).to(device) if modifier.duo_scaling else None
    for ratio, use_duo_scaling in modifier._get_grid_search_params():
        scales = candidate_scales(x_mean.view(-1), w_mean, ratio, use_duo_scaling)
        scales_view = scales.view(1, -1).to(device)
        t = time.perf_counter()
        for group in groups:
            _quantize_balance_group(group, orig_layer_weights, scales_view)
        if scales_view.is_cuda:
            torch.cuda.synchronize(scales_view.device)
        now = time.perf_counter()
        phases["quantize"] = phases.get("quantize", 0.0) + now - t
        int_w_outputs = modifier._run_samples(mapping.parent)
        loss = modifier._compute_loss(fp16_outputs, int_w_outputs)  # .item(): waits for the GPU
        del int_w_outputs
        phases["forward_loss"] = phases.get("forward_loss", 0.0) + time.perf_counter() - now
        if initial_error is None:
            initial_error = loss
        history.append({"ratio": ratio, "duo_scaling": use_duo_scaling, "error": loss})
        if losses is not None:
            losses.append(float(loss))
        if loss < best_error:
            best_error = loss
            best_ratio = ratio
            best_scales = scales.clone()
    if best_ratio == -1:
        awq_base.logger.debug(history)
        raise RuntimeError(
            f"No finite loss was found in the AWQ grid search for {mapping.smooth_name}: NaN values in the "
            f"forward pass of {mapping.parent_name} (llm-compressor raises the same)"
        )
    assert initial_error is not None and best_scales is not None  # a finite loss was found
    err_reduction = best_error / initial_error if initial_error > 0 else 1.0
    modifier._error_metrics.append(
        {
            "layer_name": mapping.smooth_name,
            "parent_name": mapping.parent_name,
            "initial_error": initial_error,
            "best_error": best_error,
            "reduction": err_reduction,
        }
    )
    if torch.isnan(best_scales).sum() != 0:
        raise RuntimeError(f"NaN found in the AWQ scales of {mapping.smooth_name}")
    return best_scales.detach().cpu()
