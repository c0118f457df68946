"""Side branches: one calibration pass for several group sizes.

llm-compressor 0.14.0.1's sequential pipeline runs inside `DisableQuantization`: both the
calibration forward and the pass that propagates a layer's outputs to the next layer use the
layer's smoothed but *unquantized* weights. AWQ smoothing preserves a layer's outputs (the
scales it multiplies into the balance layers it divides out of the smooth layer), so what the
next layer receives is the same for every group size up to float rounding: one pass can serve
every branch of a release.

At the end of each layer (`MoeAWQModifier._apply_smoothing`), the run's `SideRun` (which the
modifier holds) keeps the layer's original weights and AWQ's per-layer state, lets the
propagating branch smooth the layer (its offload writes and its record as in a build of that
branch alone), then smooths the layer once per side branch, with that branch's own weight
scheme (from its recipe), from the original weights, over the same cached calibration inputs
(each grid search near the propagating branch's choice where `side_grid_window` asks:
grid.py); quantizes and compresses the layer's Linears
for that branch, on the GPU, as QuantizationModifier and the compressed save would
(`Quantizer`), and writes them with the smoothed tensors that stay unquantized (norms, the
router, biases) to the branch's store (one safetensors file per layer, about a quarter of the
layer's bf16 size); and puts the layer back as the propagating branch smoothed it: weights,
the grid search's scratch quantization parameters and AWQ's per-layer caches. A side run writes only the onloaded copy of
a weight (hook `side_offload_write`; the CPU or disk offload keeps the original), so only the
propagating branch's smoothing reaches the offload, the next layer and QuantizationModifier,
exactly as in a build of that branch alone. A side branch's store (and the quantization scheme
its run describes beside it, for its `config.json`) becomes a branch in
`one_pass.finish_side_branch`, without loading the model again: its tensors in the propagating
branch's saved layout.

Memory: the layer's originals, and during the side runs the propagating branch's smoothed
weights, stay on the GPU when it has room for them (else in host memory);
each side branch's quantized layer is copied to host memory and written to its store by a
background thread while the next run computes, at most one write in flight (`StoreWriter`).
The side runs reuse the propagating run's caches and buffers.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIDE_PARAMS = ("weight", "bias")  # what AWQ's smoothing writes
# the grid search's scratch quantization parameters: `update_qparams(only_update_onload=True)`
# replaces their onloaded data with tensors shaped for the group size searched
SCRATCH_QPARAMS = ("weight_scale", "weight_zero_point", "weight_g_idx")
QUANTIZATION_FILE = "quantization_config.json"  # in a store: the branch's config groups, as saved
LAYER_PREFIX = re.compile(r"^(.*?layers\.\d+)\.")


@dataclass(frozen=True)
class SideBranch:
    """A branch calibrated by another branch's pass: its name, group size, the folder its
    quantized layers go to and its rendered recipe (whose QuantizationModifier quantizes them)."""

    name: str
    group_size: int
    store: Path
    recipe: str


@dataclass
class SideTimes:
    """One layer's side runs: when they started (the end of the layer's calibration forward)
    and how long they took, smoothing and the store's writes included."""

    started: float
    seconds: float = 0.0
    stored_bytes: int = 0


class StoreWriter:
    """Writes side branches' layers to their stores on one background thread, at most one write in
    flight: `write` first waits for the previous one (and raises its error)."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glmrel-side-store")
        self.pending: Any = None
        self.waited_s = 0.0  # time the GPU work waited for a write

    def wait(self) -> None:
        if self.pending is not None:
            t = time.perf_counter()
            pending, self.pending = self.pending, None
            pending.result()
            self.waited_s += time.perf_counter() - t

    def write(self, tensors: dict[str, Any], path: Path) -> None:
        from safetensors.torch import save_file

        self.wait()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.pending = self.pool.submit(save_file, tensors, str(path))

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)


def _keep(t: Any) -> Any:
    """A copy of an original weight: on its GPU while free memory is over twice its size (the
    restore is then a device copy), else in host memory."""
    import torch

    if t.is_cuda and torch.cuda.mem_get_info(t.device)[0] > 2 * t.nbytes:
        return t.detach().clone()
    return t.detach().to("cpu", copy=True)


def touched_modules(mappings: list[Any]) -> list[tuple[str, Any]]:
    """The modules AWQ's smoothing of `mappings` writes (smooth and balance layers), by name,
    each once, in mapping order."""
    seen: set[int] = set()
    out: list[tuple[str, Any]] = []
    for m in mappings:
        for name, module in [(m.smooth_name, m.smooth_layer), *zip(m.balance_names, m.balance_layers)]:
            if id(module) not in seen:
                seen.add(id(module))
                out.append((name, module))
    return out


def layer_key(modules: list[tuple[str, Any]]) -> str:
    """The store's file name for one layer: the decoder layer's prefix (`model.layers.3`)."""
    for name, _ in modules:
        m = LAYER_PREFIX.match(name)
        if m:
            return m[1]
    return modules[0][0]


def _tensor(module: Any, name: str) -> Any:
    value = getattr(module, name, None)
    import torch

    return value if isinstance(value, torch.Tensor) else None


def write_onloaded(module: Any, name: str, data: Any) -> None:
    """Write `data` into the copy of `module.<name>` the layer computes with, leaving any
    offload as it is (inside the pipeline's `disable_offloading`, `getattr` returns that copy)."""
    import torch

    with torch.no_grad():
        getattr(module, name).copy_(data)


@contextlib.contextmanager
def weight_scheme(modules: list[tuple[str, Any]], weights: Any) -> Iterator[None]:
    """The weight quantization args of `modules` replaced by a side branch's own (`weights`,
    from its recipe), for the grid search (stock's observers, `_compute_layer_means` and the
    engine's batched searches all read them from the module), and their scratch qparams put
    back after. Refuses args that differ from the modules' own in more than the group size:
    what the next layer sees is then no longer the same for every branch of the pass."""
    from compressed_tensors.utils import patch_attr

    copies: dict[int, Any] = {}
    with contextlib.ExitStack() as stack:
        for _, module in modules:
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or getattr(scheme, "weights", None) is None:
                continue
            if id(scheme) not in copies:
                ours = scheme.weights.model_dump(exclude={"group_size"})
                if ours != weights.model_dump(exclude={"group_size"}):
                    raise ValueError(
                        f"a side branch's weights ({weights}) differ from the propagating branch's "
                        f"({scheme.weights}) in more than the group size; one pass cannot make both"
                    )
                copies[id(scheme)] = scheme.model_copy(update={"weights": weights})
            stack.enter_context(patch_attr(module, "quantization_scheme", copies[id(scheme)]))
        scratch = [
            (t, t.data) for _, module in modules for q in SCRATCH_QPARAMS if (t := _tensor(module, q)) is not None
        ]
        try:
            yield
        finally:
            for t, data in scratch:
                t.data = data


class Quantizer:
    """A recipe's QuantizationModifier applied to loose weights, as llm-compressor's data-free
    pipeline applies it to a model (schemes attached by the recipe's targets and ignore,
    weight observers, `observe` and `update_qparams` on the weights' device, frozen), then
    compressed-tensors' `compress_module`, as the compressed save does: the same tensors, bit
    for bit, as a model quantized and saved (the demo's pinned digests)."""

    def __init__(self, recipe_text: str, device: Any) -> None:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.recipe import Recipe

        found = [m for m in Recipe.create_instance(recipe_text).modifiers if isinstance(m, QuantizationModifier)]
        if len(found) != 1:
            raise ValueError(f"the recipe has {len(found)} QuantizationModifiers; one pass needs exactly one")
        self.modifier = found[0]
        self.device = device
        groups = [g for g in (self.modifier.config_groups or {}).values() if g.weights is not None]
        if len(groups) != 1:
            raise ValueError(f"the recipe's QuantizationModifier has {len(groups)} weight schemes; one pass needs one")
        self.weights = groups[0].weights  # what the side branch's grid search quantizes with
        self.config_groups: dict[str, Any] | None = None  # as a compressed save writes them, once quantized

    def describe(self, path: Path) -> None:
        """Write the branch's `config_groups` as its compressed save would put them in
        `config.json` (`QuantizationConfig.from_pretrained` over the modules it quantized):
        the side branch's `config.json` takes its quantization scheme from here."""
        if self.config_groups is None:
            raise RuntimeError("nothing was quantized yet: no config groups to describe")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"config_groups": self.config_groups}, indent=2, sort_keys=True) + "\n")

    def quantize(self, weights: dict[str, Any]) -> dict[str, Any]:
        """`{module name: weight}` -> the compressed tensors a save writes for them, by name, in
        host memory. The weights are read, not changed."""
        import torch
        from compressed_tensors.compressors.base import compress_module
        from compressed_tensors.utils import match_named_modules
        from llmcompressor.modifiers.quantization.calibration import observe, update_qparams

        root = torch.nn.Module()
        # no word embeddings here (QuantizationModifier asks, and warns on a model that cannot say)
        root.get_input_embeddings = root.get_output_embeddings = torch.nn.Identity  # type: ignore[method-assign,assignment]
        for name, w in weights.items():
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            linear.weight = torch.nn.Parameter(w.detach().to(self.device), requires_grad=False)
            parent = root
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, linear)
        m = self.modifier
        m.initialize_quantization(root)
        m.start_calibration(root)
        modules = [module for _, module in match_named_modules(root, m.resolved_targets, m.ignore)]
        observe(modules, "weight")
        update_qparams(modules, "weight")
        m.end_calibration(root)
        for module in modules:
            compress_module(module)
        if self.config_groups is None and modules:
            from compressed_tensors.quantization import QuantizationConfig

            fmt = modules[0].quantization_scheme.format
            config = QuantizationConfig.from_pretrained(root, format=getattr(fmt, "value", fmt))
            self.config_groups = json.loads(config.model_dump_json())["config_groups"]
        return {k: v.detach().to("cpu").contiguous() for k, v in root.state_dict().items()}


# How many bytes of weights a side run quantizes at once: its temporaries (observers' min/max,
# the int8 values, the packed words and scales until they reach host memory) stay a small
# multiple of this on the GPU, whatever the layer's size (a GLM-4.7 MoE layer is 7.3 GiB).
QUANTIZE_CHUNK_BYTES = 1 << 30


def _chunks(modules: dict[str, Any], limit: int) -> Iterator[dict[str, Any]]:
    """`modules` in order, in runs whose weights add up to at most `limit` bytes (a larger
    weight alone)."""
    chunk: dict[str, Any] = {}
    size = 0
    for name, m in modules.items():
        n = m.weight.nbytes
        if chunk and size + n > limit:
            yield chunk
            chunk, size = {}, 0
        chunk[name] = m
        size += n
    if chunk:
        yield chunk


def quantized_linears(model: Any, key: str) -> dict[str, Any]:
    """The Linears of the decoder layer `key` that the pass's recipe quantizes (a
    `quantization_scheme` attached), by full name."""
    import torch

    layer = model.get_submodule(key)
    return {
        f"{key}.{name}": m
        for name, m in layer.named_modules()
        if isinstance(m, torch.nn.Linear) and getattr(m, "quantization_scheme", None) is not None
    }


class SideRun:
    """The side branches of one calibration pass and what their runs need for the whole pass:
    each branch's `Quantizer` (its own recipe's QuantizationModifier, on the device
    llm-compressor's data-free pipeline would use) and the store writer. Made by the run's
    `Engine`, given to the run's `MoeAWQModifier`, closed by the engine (`close`: the last
    store write finished, or its error raised)."""

    def __init__(self, branches: tuple[SideBranch, ...], rank: int = 0, shared_weights: bool = False) -> None:
        from llmcompressor.utils.dev import get_main_device

        self.branches = branches
        device = str(get_main_device())
        self.quantizers = {b.name: Quantizer(b.recipe, device) for b in branches}
        self.writer = StoreWriter()
        self.described: set[str] = set()  # branches whose store has its quantization config
        # data-parallel ranks: each smooths every side branch (AWQ's statistics and losses are
        # all-reduced, so every rank chooses the same scales); rank 0 alone quantizes and stores
        self.stores = rank == 0
        # ranks on CPU compute on one shared copy of the weights: they wait for each other around
        # each side branch's reading and restoring of the layer (on GPUs each rank has its own)
        self.shared_weights = shared_weights

    def smooth_layer(
        self,
        modifier: Any,
        model: Any,
        mappings: list[Any],
        lead: Callable[[], Any],
        smooth: Callable[[], Any],
    ) -> SideTimes:
        """Smooth the layer of `mappings` for the propagating branch (`lead()`, which writes the
        offload as a build of that branch alone would), then once per side branch from the
        layer's originals (`smooth()` is the engine's smoothing of the layer as it stands), with
        the branch's own weight scheme on the layer's modules, every weight write landing on the
        onloaded copy only, and its grid searches near the propagating branch's choices
        (grid.py); quantize and compress the layer's Linears for that branch (`Quantizer`: the
        smoothed ones and those no mapping touches alike) and store them with the smoothed
        tensors that stay unquantized (norms, the router, biases); then put the propagating
        branch's smoothed layer, and the modifier's per-layer statistics and caches, back as
        the propagating smoothing left them."""
        import torch

        from .hooks import Patches

        modules = touched_modules(mappings)
        key = layer_key(modules)
        linears = quantized_linears(model, key)
        # (module, parameter name, full name) of every tensor smoothing may write
        params = [(m, p, f"{name}.{p}") for name, m in modules for p in SIDE_PARAMS if _tensor(m, p) is not None]
        raw = [(m, p, full) for m, p, full in params if not (p == "weight" and full[: -len(".weight")] in linears)]
        originals = [_keep(getattr(m, p)) for m, p, _ in params]
        before = modifier.layer_state()
        lead()
        times = SideTimes(started=time.perf_counter())
        grid = modifier.engine.run.grid  # a modifier with side branches is bound to its run's engine
        smoothed = [_keep(getattr(m, p)) for m, p, _ in params]  # the propagating branch's: they go on
        after = modifier.layer_state()
        self.wait_for_ranks()  # every rank kept the propagating smoothing before any writes the originals
        try:
            for branch in self.branches:
                q = self.quantizers[branch.name]
                for (m, p, _), t in zip(params, originals):
                    write_onloaded(m, p, t)
                self.wait_for_ranks()  # every rank put it back before any smooths it again
                modifier.restore_layer_state(before)
                writes = Patches()
                writes.hook("side_offload_write", write_onloaded)
                grid.branch = branch.name
                try:
                    with weight_scheme(modules, q.weights):
                        smooth()
                finally:
                    writes.undo()
                    grid.branch = None
                if self.stores:
                    self.store_layer(branch, q, key, linears, raw, times)
                self.wait_for_ranks()  # every rank smoothed, rank 0 read the layer: now it may be put back
        finally:
            for (m, p, _), t in zip(params, smoothed):
                write_onloaded(m, p, t)
            modifier.restore_layer_state(after)
        self.wait_for_ranks()  # every rank put the propagating smoothing back before the layer's outputs propagate
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.seconds = time.perf_counter() - times.started
        return times

    def store_layer(
        self, branch: SideBranch, q: Quantizer, key: str, linears: dict[str, Any], raw: list[Any], times: SideTimes
    ) -> None:
        """The layer as this side branch has it: its Linears quantized and compressed, and the
        smoothed tensors that stay unquantized, written to the branch's store."""
        layer: dict[str, Any] = {}
        for chunk in _chunks(linears, QUANTIZE_CHUNK_BYTES):  # bounded GPU memory: a few GiB at a time
            layer.update(q.quantize({name: m.weight for name, m in chunk.items()}))
        layer.update({full: getattr(m, p).detach().to("cpu", copy=True).contiguous() for m, p, full in raw})
        times.stored_bytes += sum(t.nbytes for t in layer.values())
        self.writer.write(layer, branch.store / f"{key}.safetensors")
        if branch.name not in self.described:
            q.describe(branch.store / QUANTIZATION_FILE)
            self.described.add(branch.name)

    def wait_for_ranks(self) -> None:
        if self.shared_weights:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        self.writer.close()
