"""AWQ's calibration hooks with the activation sums kept on the device.

llm-compressor 0.14.0.1's `_setup_activation_cache_hooks` registers, per mapping, a hook that
caches the parent's inputs and one that adds the balance layers' input to a per-channel sum.
That second hook ends every call with `.cpu()`: one device synchronization per mapping and
calibration sample (164 a sample in a GLM-4.7 MoE layer, one per expert's up -> down mapping),
each leaving the GPU idle until the host has issued the next kernels. Profiled on an H200 at
GLM-4.7 layer dims, the calibration forward kept the GPU busy a third of the time.

`register_calibration_hooks` registers the same two hooks with the same arithmetic, except
that the per-batch fp32 sum is added into an fp32 sum on the device it was computed on;
`sums_to_host` copies those sums to host memory once per layer, before the smoothing reads
them. The same additions of the same fp32 values in the same order (IEEE addition rounds
alike on either side), so AWQ sees the same statistics, bit for bit.

Both hooks carry `over_experts` (all_experts.py's batched hooks): the sums of a chunk of experts
as one reduction over [n, tokens, in] (an fp32 1-norm of the bf16 input, read once), added with
one `_foreach_add_`; the Gram matrices of the experts' down_proj inputs as one batched product.
The reduction over the stacked inputs may round a sum's last bit otherwise than the expert's own
reduction.
"""

from __future__ import annotations

import inspect
from typing import Any


def register_calibration_hooks(modifier: Any) -> None:
    """Stock's `_setup_activation_cache_hooks` for `modifier` (an AWQModifier), its activation
    sums accumulated on the device."""
    import torch
    from llmcompressor.core import active_session
    from llmcompressor.modifiers.transform.awq import base as awq_base
    from llmcompressor.pipelines.cache import IntermediatesCache

    stats = modifier._smooth_activation_stats

    def cache_parent_kwargs_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # stock's: the call's arguments by name, so the cache can replay module(**cached)
        arguments = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        arguments |= arguments.pop("kwargs", {})
        for k, v in arguments.items():
            if isinstance(v, awq_base.QuantizedKVCache):
                arguments[k] = None
        modifier._parent_args_cache[module].append(arguments)

    def parents_over_experts(pairs: list[tuple[Any, Any]], inputs: Any, _outputs: Any) -> None:
        """cache_parent_kwargs_hook for each (module, hook) of `pairs` (all_experts.py): the
        Gram caches of the experts' down_proj in one batched product, any other cache per call."""
        caches = [modifier._parent_args_cache.get(module) for module, _ in pairs]
        if inputs.stride(0) != 0 and all(getattr(c, "add_grams", None) is not None for c in caches):
            type(caches[0]).add_grams(caches, inputs)
            return
        for i, (module, hook) in enumerate(pairs):
            hook(module, (inputs[i],), {})

    cache_parent_kwargs_hook.over_experts = parents_over_experts  # type: ignore[attr-defined]

    def sums_over_experts(pairs: list[tuple[Any, Any]], inputs: Any, outputs: Any) -> None:
        """cache_smooth_activations_hook for each (module, hook) of `pairs` (all_experts.py)."""
        state = active_session().state
        names = [hook.smooth_name for _, hook in pairs]
        if (state is not None and state.loss_masks) or len(set(names)) < len(names):
            for i, (module, hook) in enumerate(pairs):
                hook(module, (inputs[i],), None if outputs is None else outputs[i])
            return
        # the sums of |x| in fp32 as one reduction that reads the bf16 input once (abs, then an
        # fp32 copy, then the sum, took three passes over [n, tokens, in])
        if inputs.stride(0) == 0:  # every expert's input is the same tensor: one sum
            sums = [torch.linalg.vector_norm(inputs[0], 1, dim=0, dtype=torch.float32)] * len(pairs)
        else:
            sums = list(torch.linalg.vector_norm(inputs, 1, dim=1, dtype=torch.float32).unbind(0))
        rows = inputs.shape[1]
        for name, new_sum in zip(names, sums):
            if name not in stats:
                stats[name] = [torch.zeros_like(new_sum), torch.zeros_like(torch.tensor(rows))]
            stats[name][1] += rows
        torch._foreach_add_([stats[name][0] for name in names], sums)

    sums_over_experts.uses_output = False  # type: ignore[attr-defined]

    def sum_hook(smooth_name: str) -> Any:
        def cache_smooth_activations_hook(_module: Any, args: tuple[Any, ...], _output: Any) -> None:
            activations = args[0].abs().detach()
            state = active_session().state
            loss_masks = state.loss_masks if state else None
            batch_idx = state.current_batch_idx if state else -1
            loss_mask = loss_masks[batch_idx] if loss_masks and batch_idx >= 0 else None
            if loss_mask is not None:
                mask = loss_mask.to(activations.device).unsqueeze(-1)
                flat = activations.flatten(0, -2)[mask.flatten(0, -2).squeeze(-1).bool()]
            else:
                flat = activations.flatten(0, -2)
            new_sum = flat.float().sum(dim=0)  # stock's sum, left where it was computed
            new_count = torch.tensor(flat.size(0))
            if smooth_name not in stats:
                stats[smooth_name] = [torch.zeros_like(new_sum), torch.zeros_like(new_count)]
            stats[smooth_name][0] += new_sum
            stats[smooth_name][1] += new_count

        cache_smooth_activations_hook.smooth_name = smooth_name  # type: ignore[attr-defined]
        cache_smooth_activations_hook.over_experts = sums_over_experts  # type: ignore[attr-defined]
        return cache_smooth_activations_hook

    for mapping in modifier._resolved_mappings:
        if mapping.parent not in modifier._parent_args_cache:
            modifier._parent_args_cache[mapping.parent] = IntermediatesCache(None, modifier.offload_device)
            modifier.register_hook(mapping.parent, cache_parent_kwargs_hook, "forward_pre", with_kwargs=True)
        hooked = mapping.activation_hook_target or mapping.balance_layers[0]
        modifier.register_hook(hooked, sum_hook(mapping.smooth_name), "forward")


def sums_to_host(modifier: Any) -> None:
    """The layer's activation sums in host memory, where stock keeps them (one copy each)."""
    stats = modifier._smooth_activation_stats
    for name, (total, count) in list(stats.items()):
        if total.device.type != "cpu":
            stats[name] = [total.cpu(), count]
