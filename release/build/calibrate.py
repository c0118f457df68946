"""Calibrating a branch and saving it: loading the base model (in RAM or offloaded past
`offload.cpu_gib`), llm-compressor's `oneshot` with glmrel's AWQ engine, the compressed save,
the MTP layer carried over, and the files beside the weights (tokenizer, recipe, expert
coverage, the calibration record that sealing folds into provenance.json)."""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..architecture import Glm4MoeArch
from ..awq import ScaleOptions, ScaleStats, SideBranch
from ..config import ReleaseConfig
from ..console import load_report
from ..errors import ReleaseError
from ..layout import copy_tensors, experts_per_expert, mtp_ignore_entry, mtp_prefix, read_weight_map
from ..manifest import CACHE_DIR
from ..owned import create_owned, remove_owned
from . import distributed
from .branch_folder import COVERAGE_FILE, RECIPE_FILE, BranchJob, Log, partial_folder, remove_stale_partials
from .compat import linearized_load
from .coverage import ExpertCounts


def resource_peaks() -> dict[str, float]:
    """Peak host RSS of this process and, on a GPU, peak allocated device memory (GiB)."""
    import resource

    import torch

    peaks = {"peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if torch.cuda.is_available():
        peaks["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        peaks["gpu"] = torch.cuda.get_device_name()  # type: ignore[assignment]
    return peaks


@dataclass
class Calibrated:
    """A model after `oneshot`, with what the run recorded."""

    model: Any
    tokenizer: Any
    timings: dict[str, Any]
    stats: ScaleStats
    counts: ExpertCounts
    calibration: Any  # CalibrationProvenance


def calibrate(
    job: BranchJob,
    echo: Log = print,
    options: ScaleOptions | None = None,
    side: tuple[SideBranch, ...] = (),
) -> Calibrated:
    """Load the base model, linearize its experts and run `oneshot` (AWQ + W4A16) on the
    release's calibration set, with the AWQ patches `options` (default: the config's).
    `side`: other group sizes this pass also smooths, layer by layer (release/awq/side.py)."""
    import torch
    from llmcompressor import oneshot
    from transformers import AutoTokenizer

    from ..awq import scaled_awq
    from .calibration import build_calibration_set
    from .coverage import count_expert_tokens

    cfg, branch, base_dir, arch = job.cfg, job.spec, job.base_dir, job.arch
    timings: dict[str, Any] = {}
    t = time.time()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    dataset, calib_prov = build_calibration_set(cfg.calibration, tokenizer)
    if distributed.world_size() > 1:  # this rank's share (see distributed.py for why not llm-compressor's)
        dataset = dataset.select(range(*distributed.partition(len(dataset))))
    timings["calibration_data"] = round(time.time() - t, 2)

    with library_fixes(cfg):  # from the load to the end of oneshot: the offload is written until then
        t = time.time()
        model = load_base_model(cfg, base_dir, branch.name, echo)
        timings["load"] = round(time.time() - t, 2)

        options = options or ScaleOptions.from_spec(cfg.awq)
        also = f"; in the same pass group {', '.join(str(b.group_size) for b in side)}" if side else ""
        echo(
            f"[{branch.name}] AWQ W4A16 group {branch.group_size}{also} on {len(dataset)} samples "
            f"(MoE-aware: {cfg.calibration.moe_calibrate_all_experts}; AWQ engine: {cfg.awq.engine})"
        )
        t = time.time()
        torch.manual_seed(cfg.calibration.seed)
        layers = arch.num_hidden_layers
        done = [0]

        def on_layer(record: Any) -> None:  # glmrel's own progress, a line per decoder layer
            done[0] += 1
            sides = f", {record.side_s:.1f}s for the other group sizes" if side else ""
            echo(
                f"[{branch.name}] layer {done[0]}/{layers}: calibration forward {record.calib_s:.1f}s, "
                f"smoothing {record.smooth_s:.1f}s{sides}"
            )

        with (
            scaled_awq(options, num_batches=len(dataset), side=side, on_layer=on_layer) as engine,
            count_expert_tokens(model, arch.n_routed_experts, calls_per_module=len(dataset)) as counts,
        ):
            oneshot(
                model=model,
                processor=tokenizer,  # type: ignore[arg-type]  # oneshot takes a tokenizer as its processor
                dataset=dataset,
                recipe=engine.recipe(job.recipe),  # AWQ as glmrel's MoeAWQModifier, bound to this run
                num_calibration_samples=len(dataset),
                max_seq_length=cfg.calibration.max_seq_length,
                shuffle_calibration_samples=False,  # the seeded choice above is the order
                moe_calibrate_all_experts=cfg.calibration.moe_calibrate_all_experts,
                pipeline="sequential",
                # where the pipeline keeps each layer's inputs between layers: host RAM (stock), or the
                # GPU the layers run on (no copy out and back per layer and sample)
                sequential_offload_device=activations_device(cfg, arch.hidden_size),
            )
    timings["oneshot"] = round(time.time() - t, 2)
    scale_stats = engine.stats
    counts = distributed.sum_counts(counts)  # each rank counted its own samples
    timings["awq_engine"] = {"engine": cfg.awq.engine, **options.to_json(), **scale_stats.to_json()}
    return Calibrated(model, tokenizer, timings, scale_stats, counts, calib_prov)


@contextmanager
def library_fixes(cfg: ReleaseConfig) -> Iterator[None]:
    """The fixes of compressed-tensors a calibration needs (compat.py), through the `HOOKS`
    table, undone when it ends: ranks under torchrun updating disk-offloaded weights."""
    from ..awq import Patches
    from .compat import atomic_update_offload, distributed_disk_update_is_fixed_upstream

    fixes = Patches()
    try:
        if (
            cfg.offload.cpu_gib is not None
            and distributed.world_size() > 1
            and not distributed_disk_update_is_fixed_upstream()
        ):
            fixes.hook("distributed_disk_update", atomic_update_offload)
        yield
    finally:
        fixes.undo()


AUTO_ACTIVATIONS_SHARE = 0.10  # `activations_on_gpu: auto`: at most this share of the GPU's memory


def cached_activation_bytes(cfg: ReleaseConfig, hidden_size: int, ranks: int = 1) -> int:
    """What llm-compressor's cache of one layer's inputs takes on a rank: its samples, each at
    most `max_seq_length` tokens of `hidden_size` values (2 bytes each; 4 in float32)."""
    samples = -(-cfg.calibration.num_samples // ranks)
    return samples * cfg.calibration.max_seq_length * hidden_size * (4 if cfg.dtype == "float32" else 2)


def activations_device(cfg: ReleaseConfig, hidden_size: int) -> str:
    """`calibration.activations_on_gpu`: the pipeline's cached layer inputs on this process's
    GPU (`auto`: where they take at most `AUTO_ACTIVATIONS_SHARE` of its memory); otherwise,
    and without a GPU, in host RAM, as llm-compressor does by default."""
    import torch

    choice = cfg.calibration.activations_on_gpu
    if not choice or not torch.cuda.is_available():
        return "cpu"
    device = torch.cuda.current_device()
    if choice == "auto":
        total = torch.cuda.get_device_properties(device).total_memory
        if cached_activation_bytes(cfg, hidden_size, distributed.world_size()) > AUTO_ACTIVATIONS_SHARE * total:
            return "cpu"
    return f"cuda:{device}"


def load_base_model(cfg: ReleaseConfig, base_dir: Path, label: str, echo: Log = print) -> Any:
    """The base model as every build starts from it: loaded (offloaded past `offload.cpu_gib`),
    in eval mode, its experts linearized (per-expert Linears: what AWQ smooths, what gets
    quantized and saved)."""
    import torch
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import AutoModelForCausalLM

    echo(f"[{label}] loading {cfg.base_model.display_id}")
    dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    # a per-expert checkpoint (GLM-4.7's) loads straight into per-expert Linears; a fused one is
    # loaded as transformers builds it and linearized after
    weight_map = read_weight_map(base_dir)
    direct = experts_per_expert(weight_map)
    with load_report(Glm4MoeArch.from_dir(base_dir).mtp_layers, lambda s: echo(f"[{label}] {s}")):
        with linearized_load("glm4_moe") if direct else nullcontext():
            if cfg.offload.cpu_gib is None:
                model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
            else:
                model = load_offloaded(cfg, base_dir, dtype, echo=lambda s: echo(f"[{label}] {s}"))
    if direct and (missing := _not_in_checkpoint(model, weight_map)):
        raise ReleaseError(
            f"the base checkpoint has no tensor for {len(missing)} of the model's weights "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): they would be random",
            hint="point base_model at a complete GLM-4-MoE checkpoint (every shard its index names)",
        )
    model.eval()
    if not direct:
        linearize_moe(model)
    return model


def _not_in_checkpoint(model: Any, weight_map: dict[str, str]) -> list[str]:
    """The model's parameters and persistent buffers that no tensor of the checkpoint has a name
    for. Loaded straight into per-expert Linears, a model's names are the checkpoint's: one
    missing here was left as initialized, not loaded."""
    names = {name for name, _ in model.named_parameters()}
    for prefix, module in model.named_modules():
        names |= {
            f"{prefix}.{b}" if prefix else b for b in module._buffers if b not in module._non_persistent_buffers_set
        }
    return sorted(names - set(weight_map))


# Shards of a saved branch: the size of GLM-4.7's own, and what bounds host RAM while saving a
# model whose weights are offloaded (transformers gathers one shard at a time; llm-compressor's
# default is 20 GB).
SHARD_SIZE = "5GB"


OFFLOAD = "offload"  # .offload.partial-<pid>@<host>: a build's offloaded base weights


def offload_root(cfg: ReleaseConfig) -> Path:
    """The folder `offload.folder` names (default: <output_dir>/.glmrel-cache): glmrel writes a
    sub-folder of its own there, never into the folder itself."""
    return cfg.offload.folder or cfg.output_dir / CACHE_DIR


def offload_folder(cfg: ReleaseConfig) -> Path:
    """Where `offload.cpu_gib` puts the weights that do not fit: a glmrel-owned folder under
    `offload_root`, removed after each branch."""
    return partial_folder(offload_root(cfg), OFFLOAD)


def load_offloaded(cfg: ReleaseConfig, base_dir: Path, dtype: Any, echo: Log = print) -> Any:
    """The base model with at most `offload.cpu_gib` of its weights in host RAM, the rest in
    safetensors files under `offload_folder` (compressed-tensors' disk offload, read back a
    tensor at a time when the sequential pipeline onloads a layer). Weights the checkpoint
    already holds are symlinked, not copied (a per-expert checkpoint's experts too: they load
    straight into per-expert Linears); every weight AWQ smooths is written there. Under
    torchrun, rank 0 loads and the ranks share its offload: one copy per node."""
    from compressed_tensors.offload import load_offloaded_model
    from transformers import AutoModelForCausalLM

    folder = offload_folder(cfg)
    if distributed.rank() == 0:
        remove_stale_partials(offload_root(cfg), OFFLOAD, echo)  # what a killed run left
        create_owned(folder, "the offloaded base weights")
    distributed.barrier()
    cap = int(cfg.offload.cpu_gib * 2**30)  # type: ignore[operator]
    echo(f"offloading the base model's weights beyond {cfg.offload.cpu_gib:g} GiB of host RAM to {folder}")
    with load_offloaded_model():
        return AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=dtype, device_map="auto_offload", max_memory={"cpu": cap}, offload_folder=str(folder)
        )


def forget_offload(folder: Path) -> None:
    """Delete a branch's offloaded weights, and compressed-tensors' (class-wide) index of them."""
    from compressed_tensors.offload.cache.disk import DiskCache

    root = str(folder.resolve())
    for key in [k for k, info in DiskCache.index.items() if str(info["safetensors_file"]).startswith(root)]:
        del DiskCache.index[key]
    remove_owned(folder)


@contextmanager
def released_after_oneshot(echo: Log = print) -> Iterator[Callable[[Any], None]]:
    """Let the calibrated model go once the block ends (the branch is saved by then).

    llm-compressor 0.14.0.1 keeps it reachable after `oneshot` returns, so a second branch
    built in the same process holds two models (measured on one H200 at GLM-4.7 layer size:
    host RSS 20.3 -> 33.9 -> 46.7 GiB at the start of branches 1, 2, 3):
    - its session's `State` holds the model until the session is reset;
    - its sequential pipeline compiles each module's forward into new functions whose
      globals hold `self` (the model) and registers them with `torch.fx.wrap`, which keeps
      every registration in torch.fx's module-level `_wrapped_fns_to_patch` for good.
    The block resets the session and drops the registrations it added, then gives freed host
    memory back (PyTorch's pinned cache, glibc's heaps) and empties the CUDA cache. It yields
    `track(model)`: a model still referenced after the block is named in a warning."""
    import weakref

    import torch
    import torch.fx._symbolic_trace as fx_trace
    from llmcompressor.core import active_session

    from ..awq import release_host_memory

    registered = set(fx_trace._wrapped_fns_to_patch)
    tracked: list[weakref.ref] = []
    try:
        yield lambda model: tracked.append(weakref.ref(model))
    finally:
        for key in set(fx_trace._wrapped_fns_to_patch) - registered:
            del fx_trace._wrapped_fns_to_patch[key]
        active_session().reset()
        gc.collect()
        release_host_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if any(ref() is not None for ref in tracked):
            echo(
                "warning: the calibrated model is still referenced after its branch was saved; "
                "host memory will grow by one model per branch in this process"
            )


def run_oneshot(
    job: BranchJob,
    out: Path | None,
    echo: Log,
    options: ScaleOptions | None = None,
    side: tuple[SideBranch, ...] = (),
) -> tuple[dict[str, Any], Calibrated]:
    """Calibrate and save the branch into `out` (None: calibrate only, for its side branches);
    returns its timings and the run (model released) whose records the side branches share."""
    with released_after_oneshot(echo) as track:
        run = calibrate(job, echo, options, side=side)
        track(run.model)
        timings = run.timings
        t = time.time()
        if out is not None:
            run.model.save_pretrained(out, save_compressed=True, max_shard_size=SHARD_SIZE)
            timings["save_weights"] = round(time.time() - t, 2)
        run.model = None  # the calibrated model is written: nothing of this branch keeps it alive
    if out is not None:
        timings["save_mtp"] = write_branch_files(job, out, run)
    timings["save"] = round(time.time() - t, 2)
    timings.update(resource_peaks())
    if "peak_gpu_gib" in timings:  # the AWQ records reset the device's peak counter per layer
        timings["peak_gpu_gib"] = max(timings["peak_gpu_gib"], round(run.stats.peak_gpu_gib, 2))
    return timings, run


def write_branch_files(job: BranchJob, out: Path, run: Calibrated) -> float:
    """Beside the saved weights: tokenizer, generation config, the MTP layer, the recipe, the
    expert coverage and the calibration record (folded into provenance.json by `seal_folder`).
    Returns the seconds the MTP layer's copy took (the build log's `save_mtp`): the part of a
    branch's save that reads the base checkpoint, not the calibrated model."""
    from .coverage import ExpertCoverage

    run.tokenizer.save_pretrained(out)
    for name in ("generation_config.json",):
        if (job.base_dir / name).is_file() and not (out / name).exists():
            shutil.copy2(job.base_dir / name, out / name)
    t = time.time()
    _carry_mtp_layers(job.base_dir, out, job.arch)
    mtp_s = round(time.time() - t, 2)
    (out / RECIPE_FILE).write_text(job.recipe)
    coverage = ExpertCoverage(
        total_tokens=run.calibration.total_tokens,
        routed={k: v for k, v in sorted(run.counts["routed"].items())},
        calibrated={k: v for k, v in sorted(run.counts["calibrated"].items())},
        moe_calibrate_all_experts=job.cfg.calibration.moe_calibrate_all_experts,
    )
    (out / COVERAGE_FILE).write_text(json.dumps(coverage.to_json(), indent=1) + "\n")
    (out / ".calibration.json").write_text(json.dumps(run.calibration.to_json()))
    return mtp_s


def _carry_mtp_layers(base_dir: Path, out: Path, arch: Glm4MoeArch) -> None:
    """Put GLM's MTP layer(s) back: transformers does not model them, so llm-compressor's save
    drops `model.layers.{num_hidden_layers}.*`. As compressed-tensors' `save_mtp_tensors_to_checkpoint`
    does, each layer's tensors go unquantized into a shard of their own, the index (its
    `update_safetensors_index`) names them and `ignore` lists them, but the shard is a copy of
    their bytes (`layout.copy_tensors`: the same file), not the layer loaded into memory whole
    (7.6 GiB at GLM-4.7 size, once per branch, two side branches at a time), and the ignore
    entry is exact (the library's leaves the dots unescaped)."""
    import os

    from compressed_tensors.utils import get_weight_mappings, update_safetensors_index

    base_map = read_weight_map(base_dir)
    for layer in arch.mtp_layers:
        prefix = mtp_prefix(layer)
        names = [n for n in base_map if n.startswith(prefix)]
        if not names:
            raise ReleaseError(
                f"MTP layer {layer} was not found in {base_dir}",
                hint="the base checkpoint lacks model.layers.{N}.* tensors named by num_nextn_predict_layers",
            )
        shard = f"model-mtp-{layer}.safetensors"
        copy_tensors(out / shard, names, {n: base_dir / base_map[n] for n in names}, None)
        weight_map = {k: os.path.basename(v) for k, v in get_weight_mappings(str(out)).items()}
        weight_map.update(dict.fromkeys(names, shard))
        total = sum((out / f).stat().st_size for f in set(weight_map.values()))
        update_safetensors_index(str(out), total, weight_map)
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        qc = cfg["quantization_config"]
        ignore = qc.get("ignore") or []
        if mtp_ignore_entry(layer) not in ignore:
            ignore.append(mtp_ignore_entry(layer))
        qc["ignore"] = ignore
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
