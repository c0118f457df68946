"""The routed experts: batched forwards of a LinearExperts2D (batched experts) and the batched down_proj
scale search on sampled rows or Gram matrices (the batched expert search and the Gram search)."""

from __future__ import annotations

import itertools
import math
from typing import Any

from .kernels import TORCH_OPS, Kernels, weighted_slot_sum_fused, weighted_slot_sum_torch
from .ranks import divided_smooth_weight, rank_count
from .routing import expert_counts
from .state import RunState
from .stats import ScaleStats


def effective_weight(linear: Any) -> Any:
    """The weight a compressed-tensors Linear's forward would multiply by (fake-quantized
    when its quantization is enabled), as `set_forward_quantized` computes it."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    scheme = getattr(linear, "quantization_scheme", None)
    status = getattr(linear, "quantization_status", None)
    enabled = getattr(linear, "quantization_enabled", True)
    w = linear.weight.data
    if (
        enabled
        and scheme is not None
        and status is not None
        and scheme.weights
        and status < QuantizationStatus.COMPRESSED
    ):
        w = forward_quantize(linear, w, "weight", scheme.weights)
    return w


def grouped_gemm_works(like: Any) -> bool:
    """Whether torch's grouped GEMM (`torch._grouped_mm`, bf16) runs on `like`'s device here
    and agrees with per-group products, tried on a small case (older GPUs and builds lack it)."""
    import torch

    if not hasattr(torch, "_grouped_mm") or like.dtype != torch.bfloat16:
        return False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(48, 64, generator=gen).to(like.device, torch.bfloat16)
        b = torch.randn(3, 32, 64, generator=gen).to(like.device, torch.bfloat16)
        offs = torch.tensor([16, 16, 48], dtype=torch.int32, device=like.device)
        out = torch._grouped_mm(a, b.transpose(1, 2), offs=offs).float()
        ref = torch.cat([a[:16] @ b[0].T, a[16:48] @ b[2].T]).float()
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return bool(((out - ref).abs() <= 1e-2 * ref.abs().amax()).all())


def batchable(experts: Any) -> bool:
    first = experts[0]
    for lin in (getattr(first, "gate_proj", None), getattr(first, "up_proj", None), first.down_proj):
        if lin is None or lin.bias is not None:
            return False
        scheme = getattr(lin, "quantization_scheme", None)
        if scheme is not None and (scheme.input_activations or scheme.output_activations):
            return False
    return True


def _expert_chunks(counts: list[int], max_rows: int) -> list[tuple[int, int, int]]:
    """Runs [first, last) of consecutive experts with their padded width (the most rows of any
    expert in the run), each with at most `max_rows` padded rows (experts x width), or a single
    expert where one alone has more."""
    chunks: list[tuple[int, int, int]] = []
    first, width = 0, 0
    for e, c in enumerate(counts):
        if e > first and (e + 1 - first) * max(width, c) > max_rows:
            chunks.append((first, e, width))
            first, width = e, 0
        width = max(width, c)
    if counts:
        chunks.append((first, len(counts), width))
    return chunks


def grouped_experts_forward(
    experts: Any,
    hidden: Any,
    top_k_index: Any,
    top_k_weights: Any,
    padded_bytes: int = 4 * 2**30,
    run: RunState | None = None,
    grouped: bool = False,
    kernels: Kernels = TORCH_OPS,
) -> Any:
    """The routed (top-k) output of a LinearExperts2D with gated experts, as batched matmuls:
    `grouped`, torch's grouped GEMM over each expert's own rows; otherwise batched products
    padded to the busiest expert of each run of experts (with skewed routing most of their
    work is padding). `run` keeps the layer's stacked weights between calls of one weight
    generation (without it, they are stacked anew). `kernels`: the gate and the weighted sum of
    each token's k rows as single kernels where they were checked (kernels.py; a GPU)."""
    import torch

    run = run if run is not None else RunState()

    n_exp = experts.num_experts
    key = id(experts)
    cached = run.stacked.get(key)
    n_bufs = 2 if grouped else 3  # grouped: [gate; up] and down; padded: gate, up and down
    if cached is None or cached[0] != run.generation or len(cached[1]) != n_bufs:
        # One buffer per projection for the layer, refilled in place at each grid point:
        # torch.stack of freshly fake-quantized weights held two copies at once. Grouped: gate
        # and up rows in one [E, 2 x inter, hid] buffer (gate first, the order the loop
        # concatenates their outputs), one product for both and no concatenation; the padded
        # products (the CPU's, whose bits the demo pins) keep a buffer each.
        members = [experts[i] for i in range(n_exp)]
        if cached is None or len(cached[1]) != n_bufs:
            g, d = members[0].gate_proj.weight, members[0].down_proj.weight
            shapes = [(2 * g.shape[0], g.shape[1])] if grouped else [g.shape, members[0].up_proj.weight.shape]
            bufs = tuple(torch.empty((n_exp, *shape), dtype=g.dtype, device=g.device) for shape in [*shapes, d.shape])
        else:
            bufs = cached[1]
        for i, m in enumerate(members):
            if grouped:
                inter = m.gate_proj.weight.shape[0]
                bufs[0][i, :inter].copy_(effective_weight(m.gate_proj))
                bufs[0][i, inter:].copy_(effective_weight(m.up_proj))
            else:
                bufs[0][i].copy_(effective_weight(m.gate_proj))
                bufs[1][i].copy_(effective_weight(m.up_proj))
            bufs[-1][i].copy_(effective_weight(m.down_proj))
        run.stacked = {key: (run.generation, bufs)}  # one layer at a time
        cached = run.stacked[key]
    w_down = cached[1][-1]
    hid, inter = hidden.shape[-1], w_down.shape[-1]
    n_tok, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of = order // k
    counts = expert_counts(flat, n_exp)  # on the device: the grouped path never waits for it
    # the temporaries of one step stay within `padded_bytes`: padding to the busiest expert of
    # the whole layer grew with routing skew, 26.8 GiB at N=32 at GLM-4.7 size on random-init
    # routing (H200 allocator trace). Padded: x, gate, up, their concatenation, the activation
    # and down's output; grouped: x, [gate; up], the activation and down's output (one step
    # for a 16k-token batch of GLM-4.7's top-8)
    row_bytes = (2 * hid + (4 if grouped else 5) * inter) * hidden.element_size()
    max_rows = max(1, padded_bytes // row_bytes)
    if grouped:
        # torch's grouped GEMM over each expert's own rows, in steps of at most `max_rows` sorted
        # rows; an expert cut by a step's edge is two groups, one in each step. The groups' ends
        # stay on the device: no wait for the GPU to learn the experts' counts. One step: its
        # output is y itself, not copied into it.
        ends = torch.cumsum(counts, 0)
        total = flat.numel()
        y = hidden.new_empty(total, hid) if not 0 < total <= max_rows else None
        for lo in range(0, total, max_rows):
            hi = min(total, lo + max_rows)
            offs = (ends.clamp(lo, hi) - lo).to(torch.int32)
            x = hidden.index_select(0, token_of[lo:hi])
            gate_up = torch._grouped_mm(x, cached[1][0].transpose(1, 2), offs=offs)
            act = kernels.gate(experts, gate_up)
            del x, gate_up
            down = torch._grouped_mm(act, w_down.transpose(1, 2), offs=offs)
            del act
            if y is None:
                y = down
            else:
                y[lo:hi] = down
            del down
    else:
        y = hidden.new_empty(flat.numel(), hid)
        # [expert, row] products padded to the busiest expert of each chunk of consecutive experts
        expert_of = flat[order]
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(flat.numel(), device=flat.device) - starts[expert_of]
        per_expert = counts.tolist()
        ends_of = list(itertools.accumulate(per_expert))
        w_gate, w_up = cached[1][0], cached[1][1]
        for first, last, width in _expert_chunks(per_expert, max_rows):
            lo, hi = ends_of[first] - per_expert[first], ends_of[last - 1]
            if hi == lo:
                continue
            e_of, r_of = expert_of[lo:hi] - first, rank[lo:hi]
            x = hidden.new_zeros(last - first, width, hid)
            x[e_of, r_of] = hidden[token_of[lo:hi]].to(x.dtype)
            gate_up = torch.cat(
                [torch.bmm(x, w_gate[first:last].transpose(1, 2)), torch.bmm(x, w_up[first:last].transpose(1, 2))],
                dim=-1,
            )
            act = kernels.gate(experts, gate_up)
            del x, gate_up
            y[lo:hi] = torch.bmm(act, w_down[first:last].transpose(1, 2))[e_of, r_of]
            del act
    # Each (token, slot)'s weighted row, gathered back into token order (the inverse of the sort:
    # a row copy, no scatter into zeros), then the k slots summed in fp32: no atomic index_add_
    # of 16k x 8 rows into bf16 (the loop's way; same terms, rounded once here).
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)
    if kernels.weighted_sum:
        return weighted_slot_sum_fused(y, top_k_weights, back, n_tok, k)
    return weighted_slot_sum_torch(y, top_k_weights, order, back, n_tok, k)


def expert_chunk(bytes_per_expert: int, budget_bytes: int = 4 * 2**30) -> int:
    """Experts per batched search step, for the step's temporaries to fit `budget_bytes`."""
    return max(1, budget_bytes // max(1, bytes_per_expert))


def _fp32_product(product: Any, a: Any, b: Any) -> Any:
    """`product(a, b)` in fp32: bf16/fp16 on a GPU through the tensor cores with fp32 output
    (bf16 products are exact in fp32), otherwise on fp32 copies."""
    import torch

    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return product(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return product(a.float(), b.float())


def gram_matrix(x: Any) -> Any:
    """X^T X in fp32 for rows X [tokens, in] (Gram search)."""
    import torch

    return _fp32_product(torch.mm, x.T, x)


def gram_matrices(x: Any) -> Any:
    """`gram_matrix` of each x[i] ([n, tokens, in] -> [n, in, in] fp32) as one batched product
    (the batched hooks): the same sums, possibly blocked otherwise."""
    import torch

    return _fp32_product(torch.bmm, x.transpose(1, 2), x)


def candidate_scales(x_mean: Any, w_mean: Any, ratio: float, duo: bool) -> Any:
    """AWQ's scales for one grid point (llm-compressor 0.14.0.1's `_compute_best_scale`), over
    the last dimension: one mapping's [in] or a batch of experts' [E, in]."""
    import torch

    if duo:
        sc = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        sc = x_mean.pow(ratio).clamp(min=1e-4)
    sc = sc / (sc.amax(dim=-1, keepdim=True) * sc.amin(dim=-1, keepdim=True)).sqrt()
    sc[torch.isinf(sc)] = 1
    sc[torch.isnan(sc)] = 1
    return sc


def _search_experts(
    grid: Any,
    w: Any,
    x_mean: Any,
    w_mean: Any,
    numel: Any,
    args: Any,
    like: Any,
    gram: tuple[Any, Any] | None,
    rows: tuple[Any, Any] | None,
    allreduce: Any,
) -> tuple[Any, Any, Any]:
    """AWQ's grid search for a batch of experts' down_proj (the batched expert search and the Gram search): per grid point one
    scale computation, one min/max, one `calculate_qparams`, one fake quantization and one batched
    product. The loss is tr(D G D^T) from `gram` = (G, fp32 W), or the error over `rows` = (X,
    X W^T), all-reduced with `allreduce` when ranks hold different rows. Returns the best scales,
    the first grid point's loss and the best loss, per expert."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.observers.helpers import flatten_for_calibration

    e, out_f, in_f = w.shape
    best_loss = torch.full((e,), float("inf"), device=w.device)
    first_loss = best = None
    for ratio, duo in grid:
        sc = candidate_scales(x_mean, w_mean, ratio, duo)
        ws = (w * sc[:, None, :]).to(w.dtype).reshape(e * out_f, in_f)
        observed = flatten_for_calibration(ws, "weight", args)
        qscale, qzero = calculate_qparams(torch.amin(observed, dim=(0, -1)), torch.amax(observed, dim=(0, -1)), args)
        qscale = qscale.to(like.weight_scale.dtype)
        qzero = qzero.to(like.weight_zero_point.dtype)
        wq = (fake_quantize(ws, qscale, qzero, args).reshape(e, out_f, in_f) / sc[:, None, :]).to(w.dtype)
        if gram is not None:
            g, w32 = gram
            diff = wq.float() - w32
            err = (torch.bmm(diff, g) * diff).sum(dim=(1, 2))  # tr(D G D^T), per expert
            del diff
        else:
            assert rows is not None  # the search has either Gram matrices or rows
            x, ref = rows
            err = (ref - torch.bmm(x, wq.transpose(1, 2))).float().pow(2).sum(dim=(1, 2))
            if allreduce is not None:
                (err,) = allreduce([err])
        loss = err / numel
        first_loss = loss.clone() if first_loss is None else first_loss
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best = torch.where(better[:, None], sc, sc if best is None else best)
    return best, first_loss, best_loss


def search_routed_experts(
    modifier: Any, maps: list[Any], stats_of: dict[str, Any], allreduce: Any, stats: ScaleStats, record: bool
) -> bool:
    """Patches 8 and 10: the routed experts' down_proj scale searches of one layer, batched
    across experts, then smoothing with stock's formulas (see the module docstring). The loss
    comes from each expert's Gram matrix (the Gram search's GramCache) or from its sampled rows."""
    import torch
    from compressed_tensors.offload import align_modules
    from llmcompressor.modifiers.transform.awq import base as awq_base

    caches = [modifier._parent_args_cache[m.parent] for m in maps]
    gram = all(hasattr(c, "gram") for c in caches)
    if gram:
        inputs = {tuple(c.gram.shape) for c in caches}
    else:  # shapes of the (offloaded) sampled rows: onloading them is left to each chunk
        inputs = {tuple(c.batch_intermediates[0]["input"].value.shape) for c in caches}
    weights = {(tuple(m.parent.weight.shape), m.parent.bias is None) for m in maps}
    if len(inputs) != 1 or len(weights) != 1 or not all(getattr(m.parent, "quantization_scheme", None) for m in maps):
        if gram:
            raise RuntimeError(
                "glmrel's Gram expert search needs experts of one shape, each quantized; set awq.expert_search: sampled"
            )
        return False  # experts with different row counts or shapes: stock's loop does them
    grid = modifier._get_grid_search_params()
    ranks = rank_count()
    distributed = ranks > 1
    rank = 0
    if distributed:
        import torch.distributed as dist

        rank = dist.get_rank()
    split = gram and distributed  # the whole run's G on every rank: each searches its share of the experts
    (input_shape,) = inputs
    out_f, in_f = maps[0].parent.weight.shape
    if gram:  # w, w*s, its fake quantization, Wq, D and D@G, at most 4 bytes an element
        chunk = expert_chunk(out_f * in_f * 22)
    else:  # reference, output and fp32 error of [rows, out]
        chunk = expert_chunk(math.prod(input_shape[:-1]) * out_f * 12)
    for start in range(0, len(maps), chunk):
        group = maps[start : start + chunk]
        downs, ups = [m.parent for m in group], [m.smooth_layer for m in group]
        args = downs[0].quantization_scheme.weights
        with torch.no_grad(), align_modules(downs + ups):
            w = torch.stack([d.weight.detach() for d in downs])  # [E, out, in], the original weights
            up_orig = [u.weight.detach().clone() for u in ups]
            dev = w.device
            if gram:
                g = torch.stack([modifier._parent_args_cache[d].gram.to(dev) for d in downs])
                rows = torch.tensor([float(modifier._parent_args_cache[d].rows) for d in downs], device=dev)
                if distributed:  # every rank holds the whole run's G, and searches its share of the experts
                    g, rows = allreduce([g, rows])
                numel = rows * out_f
                w32 = w.float()
            else:
                x = torch.stack(
                    [next(iter(modifier._parent_args_cache[d]))["input"].reshape(-1, d.in_features) for d in downs]
                ).to(dev)
                ref = torch.bmm(x, w.transpose(1, 2))
                numel = torch.full((len(group),), float(ref[0].numel()), device=dev)
                if distributed:
                    (numel,) = allreduce([numel])
            sums = [allreduce(list(stats_of[m.smooth_name])) if distributed else stats_of[m.smooth_name] for m in group]
            x_mean = torch.stack([xs.to(dev) / n.to(dev) for xs, n in sums])
            w_mean = (
                torch.stack([modifier._compute_layer_means([d]).to(dev) for d in downs])
                if modifier.duo_scaling
                else None
            )
            # The Gram search has the whole run's G on every rank: each rank searches its share
            # of the experts, and the chosen scales are summed over the ranks (one rank's
            # nonzero, the others' zeros). With sampled rows each rank's loss covers only its rows.
            own = [i for i in range(len(group)) if not split or (start + i) % ranks == rank]
            stats.expert_searches_run += len(own)
            idx = torch.tensor(own, dtype=torch.long, device=dev)

            def mine(t: Any, idx: Any = idx) -> Any:
                return t.index_select(0, idx) if split else t

            found = None
            if own:
                found = _search_experts(
                    grid,
                    mine(w),
                    mine(x_mean),
                    None if w_mean is None else mine(w_mean),
                    mine(numel),
                    args,
                    downs[0],
                    (mine(g), mine(w32)) if gram else None,
                    None if gram else (x, ref),
                    allreduce if distributed and not gram else None,
                )
            if split:
                sc_dtype = x_mean.dtype if w_mean is None else torch.promote_types(x_mean.dtype, w_mean.dtype)
                full = [
                    torch.zeros(len(group), in_f, device=dev, dtype=sc_dtype),
                    torch.zeros(len(group), device=dev, dtype=torch.float32),
                    torch.zeros(len(group), device=dev, dtype=torch.float32),
                ]
                for t, part in zip(full, found or ()):
                    t[idx] = part.to(t.dtype)
                found = allreduce(full)
            assert found is not None  # unsplit: this rank searched every expert; split: the sum
            best, first_loss, best_loss = found
            if not torch.isfinite(best_loss).all():
                raise RuntimeError(
                    "glmrel's batched expert search found no finite loss; set awq.expert_search: sampled"
                )
            first, best_err = first_loss.tolist(), best_loss.tolist()
            for i, (m, d, u) in enumerate(zip(group, downs, ups)):
                s_i = best[i]
                # through AWQ's module: deferred write-back defers these writes as it does stock's
                awq_base.update_offload_parameter(d, "weight", w[i] * s_i.view(1, -1))
                awq_base.update_offload_parameter(u, "weight", divided_smooth_weight(up_orig[i], s_i))
                modifier._error_metrics.append(
                    {
                        "layer_name": m.smooth_name,
                        "parent_name": m.parent_name,
                        "initial_error": first[i],
                        "best_error": best_err[i],
                        "reduction": best_err[i] / first[i] if first[i] > 0 else 1.0,
                    }
                )
                if record:
                    stats.scales[m.smooth_name] = s_i.detach().float().cpu().clone()
                del modifier._parent_args_cache[d]
        stats.batched_expert_searches += len(group)
    return True
