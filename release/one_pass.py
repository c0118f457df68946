"""One calibration pass for several branches of a release (`build-all` and `quantize --branch A
--branch B` on one GPU): the first branch's pass also smooths every layer for the others' group
sizes (release/awq/side.py), stores those layers, and each other branch is then made from its
store. The pass's steps are quantize.py's, called through the module so tests can stand in for one.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import distributed, quantize
from .architecture import Glm4MoeArch
from .awq import ScaleOptions, SideBranch
from .config import BranchSpec, ReleaseConfig
from .errors import ReleaseError
from .quantize import BranchBuild, Calibrated, Log

PASS_FOLDER = "calibration-pass"  # .calibration-pass.partial-<pid>@<host>: the side branches' stores


def quantize_pass(
    cfg: ReleaseConfig,
    branch_names: list[str],
    *,
    force: bool = False,
    echo: Log = print,
    scale_options: ScaleOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[BranchBuild]:
    """Build several branches from ONE calibration pass (the first named propagates its
    smoothed layers; the others are smoothed beside it, layer by layer: release/awq/side.py),
    skipping the branches whose inputs are unchanged. One branch: `quantize_branch`.

    The first branch is saved as a build of its own would be (bit for bit the same); each
    other branch is then made from its stored smoothed weights in the first one's saved layout
    (`finish_side_branch`: no second load of the model). Every branch's provenance names the pass."""
    specs = [cfg.branch(n) for n in dict.fromkeys(branch_names)]
    if len(specs) == 1:
        if progress:
            progress(specs[0].name)
        return [quantize.quantize_branch(cfg, specs[0].name, force=force, echo=echo, scale_options=scale_options)]
    if distributed.in_worker():
        raise ReleaseError("one calibration pass for several branches runs in one process, not under torchrun")
    names = [b.name for b in specs]
    t_start = time.time()
    prepared = {b.name: quantize.prepare_branch(cfg, b) for b in specs}
    base_dir, arch = prepared[names[0]][0], prepared[names[0]][1]
    fingerprints = {n: quantize.pass_fingerprint(prepared[n][3], names) for n in names}
    store_root = cfg.offload.pass_store or cfg.output_dir
    for name in names:
        quantize.remove_stale_partials(cfg.output_dir, name, echo)
    quantize.remove_stale_partials(store_root, PASS_FOLDER, echo)
    stale = [b for b in specs if force or not quantize.up_to_date(cfg, b, prepared[b.name][3], names)]
    builds: dict[str, BranchBuild] = {
        b.name: BranchBuild(b.name, cfg.output_dir / b.name, True, 0.0, fingerprints[b.name])
        for b in specs
        if b not in stale
    }
    if not stale:
        return [builds[n] for n in names]
    lead, rest = specs[0], [b for b in specs[1:] if b in stale]
    work = quantize.partial_folder(store_root, PASS_FOLDER)
    side = tuple(SideBranch(b.name, b.group_size, work / b.name) for b in rest)
    tmps = {b.name: quantize.partial_folder(cfg.output_dir, b.name) for b in stale}
    if side:
        check_pass_store_room(cfg, base_dir, arch, len(side), store_root)
        if lead not in stale:  # sealed by an earlier run: what the side branches are made from, checked first
            check_sealed_files(cfg.output_dir / lead.name, arch)
    echo(f"[{lead.name}] one calibration pass for {', '.join(names)} (propagating through {lead.name})")
    for folder in [work, *tmps.values()]:
        shutil.rmtree(folder, ignore_errors=True)
    try:
        if progress:
            progress(lead.name)
        lead_tmp = tmps.get(lead.name)
        timings, run = quantize._run_oneshot(
            cfg, lead, base_dir, arch, prepared[lead.name][2], lead_tmp, echo, scale_options, side
        )
        shared = {k: timings[k] for k in ("calibration_data", "load", "oneshot", "awq_engine") if k in timings}
        pass_s = round(time.time() - t_start, 1)
        if lead_tmp is not None:
            timings["calibration_pass_s"] = pass_s
            quantize.seal_folder(
                cfg, lead, base_dir, arch, lead_tmp, cfg.output_dir / lead.name, fingerprints[lead.name], timings, names
            )
            builds[lead.name] = BranchBuild(
                lead.name, cfg.output_dir / lead.name, False, pass_s, fingerprints[lead.name]
            )
        for b, sb in zip(rest, side):
            if progress:
                progress(b.name)
            t = time.time()
            side_timings = finish_side_branch(
                cfg, b, base_dir, arch, prepared[b.name][2], sb, cfg.output_dir / lead.name, tmps[b.name], run, echo
            )
            side_timings["calibration_pass"] = {**shared, "seconds": pass_s, "propagated_through": lead.name}
            quantize.seal_folder(
                cfg, b, base_dir, arch, tmps[b.name], cfg.output_dir / b.name, fingerprints[b.name], side_timings, names
            )
            builds[b.name] = BranchBuild(
                b.name, cfg.output_dir / b.name, False, round(time.time() - t, 1), fingerprints[b.name], lead.name
            )
            shutil.rmtree(sb.store, ignore_errors=True)
    finally:
        for folder in [work, *tmps.values()]:
            shutil.rmtree(folder, ignore_errors=True)
        if cfg.offload.cpu_gib is not None:
            quantize.forget_offload(quantize.offload_folder(cfg))
    return [builds[n] for n in names]


def side_store_bytes(base_dir: Path, arch: Glm4MoeArch, dtype: str) -> int:
    """About what one side branch's store holds, from the base checkpoint's headers: the
    decoder layers' tensors (AWQ smooths within them; the MTP layer, embeddings and head are not
    stored) in the dtype the build loads them in. An upper bound: norms and the layers' few
    weights no mapping smooths are counted too."""
    from .check import DTYPE_BYTES, TORCH_TO_ST, read_shard

    layer = re.compile(r"^model\.layers\.(\d+)\.")
    size = DTYPE_BYTES[TORCH_TO_ST[dtype]] if dtype in TORCH_TO_ST else None  # "auto": the checkpoint's
    total = 0
    for f in sorted(base_dir.glob("*.safetensors")):
        meta, _errors = read_shard(f)
        for name, t in meta.tensors.items() if meta is not None else ():
            m = layer.match(name)
            if m and int(m[1]) < arch.num_hidden_layers:
                stored = t.data_offsets[1] - t.data_offsets[0]
                total += stored if size is None else stored // DTYPE_BYTES.get(t.dtype, 2) * size
    return total


def check_pass_store_room(cfg: ReleaseConfig, base_dir: Path, arch: Glm4MoeArch, sides: int, store_root: Path) -> None:
    """Refuse a pass whose side branches' stores cannot fit where they go, before any work
    (a full disk found after hours of calibration loses them)."""
    need = side_store_bytes(base_dir, arch, cfg.dtype) * sides
    where = store_root
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need:
        raise ReleaseError(
            f"one calibration pass needs about {need / 2**30:.1f} GiB at {store_root} for its {sides} side "
            f"branch(es)' smoothed layers, and {free / 2**30:.1f} GiB are free there",
            hint="set offload.pass_store to a disk (or a tmpfs such as /dev/shm) with room, or build with --separate",
        )


def finish_side_branch(
    cfg: ReleaseConfig,
    branch: BranchSpec,
    base_dir: Path,
    arch: Glm4MoeArch,
    recipe_text: str,
    side: SideBranch,
    lead_dir: Path,
    out: Path,
    run: Calibrated,
    echo: Log = print,
) -> dict[str, Any]:
    """A side branch of a pass into `out`, without loading the model again: the propagating
    branch's saved folder (`lead_dir`) gives the layout (shards, tensor names, config), and
    each of its tensors becomes the side branch's own:
    - a quantized Linear (`X.weight_packed`, `X.weight_scale`, ...): the side branch's smoothed
      `X.weight` from its store, else (a Linear no mapping smooths, such as `o_proj`) the base
      checkpoint's, quantized by the recipe's QuantizationModifier and compressed by
      compressed-tensors, module by module as llm-compressor's data-free pipeline and its
      compressed save do (`Quantizer`);
    - a tensor the side branch smoothed unquantized (norms, the router's gate, biases): the store's;
    - anything else (embeddings, head, the layers' other norms): the propagating branch's, which
      is the base model's for both.
    Then the MTP layer, tokenizer, recipe and records as any build (`_write_branch_files`).
    The same bits as loading the base model, writing the store over it and running
    QuantizationModifier and the compressed save (what this replaced; pinned by the demo's
    digests), at the cost of reading the store and writing the branch once."""
    import torch
    from llmcompressor.utils.dev import get_main_device
    from safetensors.torch import save_file

    timings: dict[str, Any] = {}
    t = time.time()
    layout = saved_layout(lead_dir, arch)
    lead = TensorFiles.of([lead_dir / s for s in layout.shards])
    base = TensorFiles.of(sorted(base_dir.glob("*.safetensors")))
    store = TensorFiles.of(sorted(side.store.glob("*.safetensors")))
    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    check_store(store, side.store, layout, lead, base, dtype, branch.name)
    quantizer = Quantizer(recipe_text, get_main_device())
    echo(f"[{branch.name}] from the pass's store: group size {branch.group_size}, in {lead_dir.name}'s layout")
    out.mkdir(parents=True, exist_ok=True)
    stored = quantized = 0
    done: dict[str, Any] = {}  # compressed tensors not yet written (a module's parts may span two shards)
    for shard in layout.shards:
        names = layout.by_shard[shard]
        modules = sorted({n.rpartition(".")[0] for n in names if layout.is_quantized_part(n) and n not in done})
        for group in _by_layer(modules):
            weights = {}
            for module in group:
                key = f"{module}.weight"
                if key in store.names:
                    weights[module] = store.get(key)
                    stored += 1
                elif key in base.names:
                    weights[module] = base.get(key, like=dtype)
                else:
                    raise ReleaseError(
                        f"{key} is neither in the pass's store nor in the base checkpoint {base_dir}",
                        hint="build this branch on its own: glmrel quantize --separate",
                    )
            got = quantizer.quantize(weights)
            want = set().union(*(layout.parts[m] for m in weights))
            if set(got) != want:
                raise ReleaseError(
                    f"quantizing {branch.name}'s {group[0]}... gave {sorted(set(got) ^ want)[:3]}, "
                    f"unlike {lead_dir.name}'s save",
                    hint="build this branch on its own: glmrel quantize --separate",
                )
            done.update(got)
            quantized += len(weights)
        tensors = {n: done.pop(n) for n in names if n in done}
        for name in names:
            if name not in tensors:
                if name in store.names:
                    tensors[name] = store.get(name)
                    stored += 1
                else:
                    tensors[name] = lead.get(name)
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        del tensors
    layout.write_index_and_config(out, branch.group_size)
    for name in ("generation_config.json",):
        if (lead_dir / name).is_file():
            shutil.copy2(lead_dir / name, out / name)
    timings["finish"] = {  # read, quantize and write: no model is loaded
        "from_store": stored,
        "quantized_modules": quantized,
        "device": str(quantizer.device),
        "seconds": round(time.time() - t, 2),
    }
    t = time.time()
    quantize._write_branch_files(cfg, base_dir, arch, recipe_text, out, run)
    timings["save"] = round(time.time() - t, 2)
    timings.update(quantize.resource_peaks())
    return timings


QUANT_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
LAYER = re.compile(r"^(.*?layers\.\d+)\.")


class TensorFiles:
    """The tensors of some safetensors files, by name (each file opened once, read lazily)."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.names = files
        self.handles: dict[Path, Any] = {}

    @classmethod
    def of(cls, paths: list[Path]) -> TensorFiles:
        from safetensors import safe_open

        names: dict[str, Path] = {}
        for path in paths:
            with safe_open(str(path), framework="pt") as fh:
                names.update(dict.fromkeys(fh.keys(), path))
        return cls(names)

    @property
    def files(self) -> set[Path]:
        return set(self.names.values())

    def where(self, name: str) -> str:
        return self.names[name].name

    def handle(self, name: str) -> Any:
        from safetensors import safe_open

        path = self.names[name]
        if path not in self.handles:
            self.handles[path] = safe_open(str(path), framework="pt")
        return self.handles[path]

    def get(self, name: str, like: Any = None) -> Any:
        t = self.handle(name).get_tensor(name)
        return t if like is None else t.to(like)

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        s = self.handle(name).get_slice(name)
        return tuple(s.get_shape()), s.get_dtype()


@dataclass
class SavedLayout:
    """A saved branch's weights without its MTP layer(s) (`_write_branch_files` puts those
    back): its shards in order, what each holds, and which modules are quantized."""

    folder: Path
    shards: list[str]
    by_shard: dict[str, list[str]]
    parts: dict[str, set[str]]  # quantized module -> its saved tensors (`weight_packed`, `weight_scale`, ...)
    mtp_prefixes: tuple[str, ...]

    @property
    def quantized(self) -> set[str]:
        return set(self.parts)

    @property
    def names(self) -> set[str]:
        return {n for names in self.by_shard.values() for n in names}

    def is_quantized_part(self, name: str) -> bool:
        module, _, part = name.rpartition(".")
        return part in QUANT_PARTS and module in self.parts

    def write_index_and_config(self, out: Path, group_size: int) -> None:
        """The side branch's `config.json` (the propagating branch's with the weights' group
        size changed, and without the MTP ignore entry `_carry_mtp_layers` adds back) and, for
        several shards, its index, as llm-compressor's save writes them."""
        import json

        from compressed_tensors.utils import update_safetensors_index

        config = json.loads((self.folder / "config.json").read_text())
        qc = config["quantization_config"]
        for group in qc["config_groups"].values():
            weights = group.get("weights") or {}
            if weights.get("strategy") == "group":
                weights["group_size"] = group_size
        mtp = {"re:^" + p.replace(".", "\\.") for p in self.mtp_prefixes}
        qc["ignore"] = [x for x in qc.get("ignore", []) if x not in mtp]
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if len(self.shards) > 1:
            weight_map = {n: s for s in self.shards for n in sorted(self.by_shard[s])}
            update_safetensors_index(str(out), sum((out / s).stat().st_size for s in self.shards), weight_map)


def saved_layout(folder: Path, arch: Glm4MoeArch) -> SavedLayout:
    import json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    else:
        weight_map = dict.fromkeys(TensorFiles.of([folder / "model.safetensors"]).names, "model.safetensors")
    mtp = tuple(f"model.layers.{n}." for n in arch.mtp_layers)
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not name.startswith(mtp) if mtp else True:
            by_shard.setdefault(shard, []).append(name)
    names = [n for shard in by_shard.values() for n in shard]
    parts: dict[str, set[str]] = {n.rpartition(".")[0]: set() for n in names if n.endswith(".weight_packed")}
    for n in names:
        module, _, part = n.rpartition(".")
        if part in QUANT_PARTS and module in parts:
            parts[module].add(n)
    return SavedLayout(folder, sorted(by_shard), by_shard, parts, mtp)


def _by_layer(modules: list[str]) -> list[list[str]]:
    """Module names grouped by decoder layer (a layer's quantized weights at a time)."""
    groups: dict[str, list[str]] = {}
    for name in modules:
        m = LAYER.match(name)
        groups.setdefault(m[1] if m else name, []).append(name)
    return list(groups.values())


class Quantizer:
    """The recipe's QuantizationModifier applied to loose weights, as llm-compressor's data-free
    pipeline applies it to a model (schemes attached by the recipe's targets and ignore,
    weight observers, `observe` and `update_qparams` on the main device, frozen), then
    compressed-tensors' `compress_module`, as the compressed save does."""

    def __init__(self, recipe_text: str, device: Any) -> None:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.recipe import Recipe

        found = [m for m in Recipe.create_instance(recipe_text).modifiers if isinstance(m, QuantizationModifier)]
        if len(found) != 1:
            raise ReleaseError(
                f"the recipe has {len(found)} QuantizationModifiers; a side branch is quantized by exactly one",
                hint="give the recipe one QuantizationModifier, or build with --separate",
            )
        self.modifier = found[0]
        self.device = device

    def quantize(self, weights: dict[str, Any]) -> dict[str, Any]:
        """`{module name: weight}` -> the compressed tensors a save writes for them, by name."""
        import torch
        from compressed_tensors.compressors.base import compress_module
        from compressed_tensors.utils import match_named_modules
        from llmcompressor.modifiers.quantization.calibration import observe, update_qparams

        root = torch.nn.Module()
        for name, w in weights.items():
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            linear.weight = torch.nn.Parameter(w.to(self.device), requires_grad=False)
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
        return {k: v.detach().to("cpu").contiguous() for k, v in root.state_dict().items()}


def check_store(
    store: TensorFiles, where: Path, layout: SavedLayout, lead: TensorFiles, base: TensorFiles, dtype: Any, branch: str
) -> None:
    """Refuse a side branch's store that is not this release's, by file and tensor name: empty,
    naming a tensor the branch does not have, or a tensor of another shape or dtype."""
    from .check import TORCH_TO_ST

    if not store.names:
        raise ReleaseError(
            f"the side branch store {where} holds no layers", hint="rebuild the branch: glmrel quantize --force"
        )
    hint = "the pass's store is not this release's; rebuild the branch: glmrel quantize --force"
    want_dtype = TORCH_TO_ST.get(str(dtype).removeprefix("torch.")) if dtype is not None else None
    for key in store.names:
        module, _, param = key.rpartition(".")
        if param == "weight" and module in layout.quantized:
            shape = tuple(int(x) for x in lead.get(f"{module}.weight_shape").tolist())
            st_dtype = want_dtype or (base.header(key)[1] if key in base.names else None)
        elif key in layout.names:
            shape, st_dtype = lead.header(key)
        else:
            raise ReleaseError(f"{store.where(key)}: {key} names no tensor of {branch}", hint=hint)
        got_shape, got_dtype = store.header(key)
        if got_shape != shape or (st_dtype is not None and got_dtype != st_dtype):
            raise ReleaseError(
                f"{store.where(key)}: {key} is {got_shape} {got_dtype}, {branch}'s is {shape} {st_dtype or got_dtype}",
                hint=hint,
            )


def check_sealed_files(folder: Path, arch: Glm4MoeArch) -> None:
    """Refuse to make side branches from a propagating branch sealed by an earlier run whose
    files (the index, shards, `config.json` and `generation_config.json` they are made from) are
    not those its manifest records: changed, missing, outside the folder or swapped for a link."""
    from .manifest import MANIFEST_FILE, Manifest, hash_files

    layout = saved_layout(folder, arch)
    extra = [n for n in ("model.safetensors.index.json", "generation_config.json") if (folder / n).exists()]
    names = [*layout.shards, "config.json", *extra]
    manifest = Manifest.load(folder / MANIFEST_FILE)
    hashes = hash_files([folder / n for n in names])
    for name in names:
        entry = manifest.files.get(name)
        if entry is None or entry.sha256 != hashes[folder / name]:
            raise ReleaseError(
                f"{folder / name} is not what {folder.name}'s manifest.json records; the side branches "
                "are made from it",
                hint=f"rebuild it and its pass: glmrel quantize --branch {folder.name} ... --force",
            )
