"""A checkpoint's layout, known in one place: its index and shards (read from safetensors
headers, never tensor data, unless a caller asks for tensors), the tensors a W4A16 GLM-4-MoE
branch holds (`expected_inventory`), the group sizes glmrel builds, and the MTP layer's names
and ignore entry. Light: no torch at import (only `TensorFiles.get` loads tensors). Used by
`check`, the one calibration pass, `stream`, `room`, `calibrate` and `render`."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import parse_local_safetensors_file_metadata
from huggingface_hub.utils import SafetensorsFileMetadata

from .architecture import Glm4MoeArch
from .errors import ReleaseError

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOATS = frozenset({"F32", "F16", "BF16"})
TORCH_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# group sizes that compressed-tensors packs and vLLM's Marlin kernels accept (-1 = per channel):
# the ones a release config may ask for and `check` accepts
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)
QUANT_SUFFIX = re.compile(r"\.(weight_packed|weight_scale|weight_shape|weight_zero_point|weight_g_idx)$")
FUSED_EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj|gate_proj|up_proj)(_\w+)?$")
PER_EXPERT = re.compile(r"\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")


# ---------------------------------------------------------------- the MTP layer


def mtp_prefix(layer: int) -> str:
    """The tensor-name prefix of MTP layer `layer` (`model.layers.92.` for GLM-4.7)."""
    return f"model.layers.{layer}."


def mtp_ignore_entry(layer: int) -> str:
    """The quantization_config `ignore` entry glmrel writes for MTP layer `layer`: an exact
    regex (compressed-tensors' own leaves the dots unescaped)."""
    return "re:^" + re.escape(mtp_prefix(layer))


# ---------------------------------------------------------------- index and shard headers


def name_in_folder(name: Any) -> bool:
    """A name (an index's shard, a manifest's entry) names a file of the branch's own folder: a
    plain file name, not a path, not hidden, no backslash (what Windows or a careless tool would
    read as a folder)."""
    return isinstance(name, str) and Path(name).name == name and "\\" not in name and not name.startswith(".")


def read_weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file of the checkpoint in `folder`: its index, or its one shard's
    header. Refuses an unreadable index, several shards without one, and an index naming a
    file outside the folder."""
    index = folder / INDEX_FILE
    hint = f"run `glmrel check {folder}`, and rebuild it if it was changed"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ReleaseError(f"{index} is unreadable: {e}", hint=hint) from e
    else:
        shards = sorted(folder.glob("*.safetensors"))
        if len(shards) != 1:
            raise ReleaseError(f"{folder} has {len(shards)} shards and no {INDEX_FILE}", hint=hint)
        meta, problems = read_shard(shards[0])
        if meta is None:
            raise ReleaseError(f"{shards[0]} cannot be read as safetensors: {problems[0]}", hint=hint)
        weight_map = dict.fromkeys(meta.tensors, shards[0].name)
    for name, shard in weight_map.items():
        if not name_in_folder(shard):
            raise ReleaseError(f"{index} maps {name} to {shard!r}, not a file of {folder.name}", hint=hint)
    return dict(weight_map)


def experts_per_expert(weight_map: dict[str, str]) -> bool:
    """Whether a base checkpoint stores its routed experts one Linear each
    (`mlp.experts.<e>.gate_proj.weight`, as GLM-4.7 and transformers' own saves do) and never
    fused (`mlp.experts.gate_up_proj`): then its experts load straight into per-expert Linears."""
    names = list(weight_map)
    return any(PER_EXPERT.search(n) for n in names) and not any(FUSED_EXPERTS.search(n) for n in names)


def read_shard(path: Path) -> tuple[SafetensorsFileMetadata | None, list[str]]:
    """Parse one shard's header and validate its layout against the file's real size."""
    try:
        size = path.stat().st_size
    except OSError as e:
        return None, [f"{path.name}: cannot stat ({e.strerror})"]
    if size < 8:
        return None, [f"{path.name}: truncated ({size} bytes; a safetensors file starts with an 8-byte header length)"]
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER_BYTES:
        return None, [f"{path.name}: header length {n} is absurdly large (limit {MAX_HEADER_BYTES})"]
    if n > size - 8:
        return None, [f"{path.name}: header length {n} runs past the end of the file ({size} bytes)"]
    try:
        meta = parse_local_safetensors_file_metadata(path)
    except Exception as e:  # huggingface_hub raises SafetensorsParsingError, JSON and key errors
        return None, [f"{path.name}: header is not valid safetensors JSON ({type(e).__name__}: {e})"]
    return meta, validate_layout(path.name, meta, size - 8 - n)


def validate_layout(fname: str, meta: SafetensorsFileMetadata, data_size: int) -> list[str]:
    """Every tensor has a known dtype, spans exactly its bytes, ends inside the data region, and
    no two tensors overlap. `data_size` is the file size less the 8-byte length and the header."""
    errors: list[str] = []
    spans = []
    for name, t in meta.tensors.items():
        begin, end = t.data_offsets
        if t.dtype not in DTYPE_BYTES:
            errors.append(f"{fname}: tensor {name} has unknown dtype {t.dtype}")
            continue
        numel = 1
        for d in t.shape:
            numel *= d
        if not 0 <= begin <= end:
            errors.append(f"{fname}: tensor {name} has offsets [{begin}, {end}] out of order")
        elif end > data_size:
            errors.append(
                f"{fname}: tensor {name} ends at byte {end} but the data region holds {data_size} bytes "
                "(truncated shard or out-of-range offsets)"
            )
        elif end - begin != numel * DTYPE_BYTES[t.dtype]:
            errors.append(
                f"{fname}: tensor {name} spans {end - begin} bytes, {t.dtype}{t.shape} needs {numel * DTYPE_BYTES[t.dtype]}"
            )
        spans.append((begin, end, name))
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            errors.append(f"{fname}: tensors {n0} and {n1} overlap (bytes {b1}..{e0})")
            break
    return errors


# ---------------------------------------------------------------- expected inventory

Expect = tuple[frozenset[str], tuple[int, ...]]


def expected_inventory(arch: Glm4MoeArch, group_size: int, model_dtype: str) -> tuple[dict[str, Expect], set[str]]:
    """Every tensor a W4A16 GLM-4-MoE branch must hold: name -> (allowed dtypes, shape).

    Returns (required, optional). Quantized Linears carry weight_packed/scale/shape; embeddings,
    norms, routers, lm_head and the MTP layer(s) stay unquantized in the model's dtype (MTP
    tensors are copied from the base checkpoint, so any float dtype is accepted there).
    """
    md = frozenset({model_dtype})
    h, v = arch.hidden_size, arch.vocab_size
    inv: dict[str, Expect] = {
        "model.embed_tokens.weight": (md, (v, h)),
        "model.norm.weight": (md, (h,)),
    }
    optional: set[str] = set()
    if not arch.tie_word_embeddings:
        inv["lm_head.weight"] = (md, (v, h))

    def common(p: str, dtypes: frozenset[str]) -> None:
        inv[p + "input_layernorm.weight"] = (dtypes, (h,))
        inv[p + "post_attention_layernorm.weight"] = (dtypes, (h,))
        if arch.use_qk_norm:
            inv[p + "self_attn.q_norm.weight"] = (dtypes, (arch.head_dim,))
            inv[p + "self_attn.k_norm.weight"] = (dtypes, (arch.head_dim,))

    def router(p: str, dtypes: frozenset[str]) -> None:
        inv[p + "mlp.gate.weight"] = (dtypes, (arch.n_routed_experts, h))
        inv[p + "mlp.gate.e_score_correction_bias"] = (
            frozenset({"F32"}) if dtypes == md else FLOATS,
            (arch.n_routed_experts,),
        )

    for layer in range(arch.num_hidden_layers):
        p = f"model.layers.{layer}."
        common(p, md)
        shapes = arch.quantized_linear_shapes(layer)
        for mod, (out, inp) in shapes.items():
            groups = 1 if group_size == -1 else inp // group_size
            inv[p + mod + ".weight_packed"] = (frozenset({"I32"}), (out, inp // 8))
            inv[p + mod + ".weight_scale"] = (md, (out, groups))
            inv[p + mod + ".weight_shape"] = (frozenset({"I64"}), (2,))
            if arch.attention_bias and mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                inv[p + mod + ".bias"] = (md, (out,))
        if layer >= arch.first_k_dense_replace:
            router(p, md)
    for layer in arch.mtp_layers:
        p = f"model.layers.{layer}."
        common(p, FLOATS)
        router(p, FLOATS)
        for mod, (out, inp) in arch.quantized_linear_shapes(arch.num_hidden_layers - 1).items():
            inv[p + mod + ".weight"] = (FLOATS, (out, inp))
            if arch.attention_bias and mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                inv[p + mod + ".bias"] = (FLOATS, (out,))
        inv[p + "eh_proj.weight"] = (FLOATS, (h, 2 * h))
        for norm in ("enorm", "hnorm", "shared_head.norm"):
            inv[p + norm + ".weight"] = (FLOATS, (h,))
        for shared in ("shared_head.head.weight", "embed_tokens.weight"):  # some GLM releases share these
            inv[p + shared] = (FLOATS, (v, h))
            optional.add(p + shared)
    return inv, optional


Found = dict[str, tuple[str, tuple[int, ...], str]]  # tensor -> (dtype, shape, shard)


def group_size_from_scales(arch: Glm4MoeArch, found: Found) -> int | None:
    """The group size the stored scales imply (input dim / scale columns), when every
    quantized Linear's scales agree; None when there are none or they disagree. A Linear with
    one scale column per row fits per-channel scales and any group at least its input wide."""
    sizes, single = set(), []
    for layer in range(arch.num_hidden_layers):
        for mod, (_out, inp) in arch.quantized_linear_shapes(layer).items():
            got = found.get(f"model.layers.{layer}.{mod}.weight_scale")
            if got is None or len(got[1]) != 2 or got[1][1] < 1:
                continue
            groups = got[1][1]
            if groups == 1:
                single.append(inp)
            else:
                sizes.add(inp // groups if inp % groups == 0 else 0)
    if not sizes:
        return -1 if single else None
    if len(sizes) != 1 or 0 in sizes:
        return None
    (size,) = sizes
    return size if all(inp <= size for inp in single) else None


# ---------------------------------------------------------------- tensors by name


QUANT_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


class TensorFiles:
    """The tensors of some safetensors files, by name (each file opened once, read lazily)."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.names = files
        self.handles: dict[Path, Any] = {}

    @classmethod
    def of(cls, paths: list[Path]) -> TensorFiles:
        from safetensors import SafetensorError, safe_open

        names: dict[str, Path] = {}
        for path in paths:
            try:
                with safe_open(str(path), framework="pt") as fh:
                    names.update(dict.fromkeys(fh.keys(), path))
            except (SafetensorError, OSError) as e:
                raise ReleaseError(
                    f"{path} cannot be read as safetensors ({e}): it was truncated or changed after it was written",
                    hint="build again: glmrel makes the pass (and its stores) anew; make sure nothing else writes there",
                ) from e
        return cls(names)

    def where(self, name: str) -> str:
        return self.names[name].name

    def handle(self, name: str) -> Any:
        from safetensors import safe_open

        path = self.names[name]
        if path not in self.handles:
            self.handles[path] = safe_open(str(path), framework="pt")
        return self.handles[path]

    def get(self, name: str) -> Any:
        return self.handle(name).get_tensor(name)

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        s = self.handle(name).get_slice(name)
        return tuple(s.get_shape()), s.get_dtype()


# How many shards `write_shards` writes at once (each a kernel copy of its tensors' bytes, or,
# where `copy_tensors` falls back, one shard's tensors in memory: 5 GB for a GLM-4.7 branch).
SHARD_WRITERS = 4
# safetensors' names of the torch dtypes `copy_tensors` asks the library about (its proxies)
ST_TO_TORCH = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def data_start_and_header(path: Path | str) -> tuple[int, SafetensorsFileMetadata]:
    """Where a safetensors file's tensor data starts (its tensors' `data_offsets` count from
    there), and its parsed header."""
    with open(path, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
    return start, parse_local_safetensors_file_metadata(path)


def _st_header(entries: list[tuple[str, str, list[int], int]], metadata: dict[str, str] | None) -> bytes:
    """A safetensors header for `entries` (name, dtype, shape, bytes), in that order, as the
    library writes one: compact JSON, `__metadata__` first, each tensor's dtype, shape and
    offsets, spaces to a multiple of 8 bytes, after the 8-byte length."""
    obj: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    at = 0
    for name, dtype, shape, nbytes in entries:
        obj[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + nbytes]}
        at += nbytes
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _library_order(entries: dict[str, str], metadata: dict[str, str] | None) -> list[str] | None:
    """The order in which safetensors' own `save` lays out tensors of these names and dtypes,
    from an empty proxy of each; None where the library's header of the proxies is not what
    `_st_header` writes for them (another format than this module knows) or a dtype is unknown."""
    import torch
    from safetensors.torch import save

    if any(dtype not in ST_TO_TORCH or not hasattr(torch, ST_TO_TORCH[dtype]) for dtype in entries.values()):
        return None
    proxies = {name: torch.empty(0, dtype=getattr(torch, ST_TO_TORCH[dtype])) for name, dtype in entries.items()}
    made = save(proxies, metadata=metadata)
    n = int.from_bytes(made[:8], "little")
    order = [k for k in json.loads(made[8 : 8 + n]) if k != "__metadata__"]
    if _st_header([(k, entries[k], [0], 0) for k in order], metadata) != made:
        return None
    return order


def copy_tensors(dest: Path, names: list[str], source: dict[str, Path], metadata: dict[str, str] | None) -> None:
    """Write the safetensors file `dest` holding `names`, each tensor's bytes copied from the
    file `source` names for it: the bytes of safetensors' `save_file` of those tensors with
    `metadata`, without holding them in memory (a kernel copy of each tensor's byte range).
    The layout is the library's own, asked of it on empty proxies of the same names and dtypes
    and checked against this module's header of them; where they differ (another safetensors),
    the tensors are loaded and written by `save_file`. A GLM-4.7 MTP layer (7.6 GiB) went
    through memory whole before (record 2026-12-07-cpu-copy-tensors: at 2.01 GiB, +2.016 GiB of
    peak RSS against none, in the same time within the disk's noise)."""
    headers = {path: data_start_and_header(path) for path in {source[n] for n in names}}
    file_size = {path: path.stat().st_size for path in headers}
    info = {n: headers[source[n]][1].tensors[n] for n in names}
    order = _library_order({n: t.dtype for n, t in info.items()}, metadata)
    if order is None:
        from safetensors.torch import save_file

        files = TensorFiles({n: source[n] for n in names})
        save_file({n: files.get(n) for n in names}, str(dest), metadata=metadata)
        return
    sizes = {n: info[n].data_offsets[1] - info[n].data_offsets[0] for n in names}
    starts = {n: headers[source[n]][0] + info[n].data_offsets[0] for n in names}  # in the source file
    for n in names:  # what safetensors checks when it loads a tensor: its bytes fit its shape and the file
        per = DTYPE_BYTES.get(info[n].dtype)
        if (
            (per is not None and sizes[n] != per * math.prod(info[n].shape))
            or starts[n] + sizes[n] > file_size[source[n]]
            or sizes[n] < 0
        ):
            raise ReleaseError(
                f"{source[n]}: {n}'s bytes do not match its shape {list(info[n].shape)} and dtype {info[n].dtype}, "
                "or run past the file's end: it was truncated or changed after it was written",
                hint="build again; make sure nothing else writes there",
            )
    header = _st_header([(n, info[n].dtype, list(info[n].shape), sizes[n]) for n in order], metadata)
    handles: dict[Path, Any] = {}
    try:
        with dest.open("wb") as out:
            out.write(header)
            out.flush()
            for n in order:
                path = source[n]
                if path not in handles:
                    handles[path] = path.open("rb")
                _copy_range(handles[path], out, starts[n], sizes[n])
    except BaseException:
        dest.unlink(missing_ok=True)  # no half-written file left behind
        raise
    finally:
        for handle in handles.values():
            handle.close()


def _copy_range(src: Any, dst: Any, offset: int, length: int) -> None:
    """`length` bytes of `src` from `offset` appended to `dst` (both binary files): in the kernel
    where it can (`os.copy_file_range`), else through a buffer."""
    import os

    while length > 0:
        try:
            n = os.copy_file_range(src.fileno(), dst.fileno(), length, offset)
        except (AttributeError, OSError):  # no such call, or not between these file systems
            break
        if n <= 0:
            break
        offset, length = offset + n, length - n
    while length > 0:
        chunk = os.pread(src.fileno(), min(length, 16 << 20), offset)
        if not chunk:
            raise ReleaseError(
                f"{src.name} ended before its tensors' bytes: it was truncated or changed while being copied",
                hint="build again; make sure nothing else writes there",
            )
        dst.write(chunk)
        dst.flush()
        offset, length = offset + len(chunk), length - len(chunk)


def write_shards(
    out: Path, by_shard: dict[str, list[str]], source: dict[str, Path], writers: int | None = None
) -> None:
    """Write each shard of `by_shard` (file name -> its tensors' names, in order) into `out`,
    each tensor's bytes copied from the safetensors file `source` names for it (`copy_tensors`),
    `writers` shards at a time on threads (default: SHARD_WRITERS, at most the machine's cores).
    The same bytes whatever `writers` is: a shard's content and order do not depend on which
    thread writes it. The first error is raised once the shards
    in flight are done; the caller removes `out`."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    def write(shard: str) -> None:  # each shard reads through handles of its own
        copy_tensors(out / shard, by_shard[shard], source, {"format": "pt"})

    workers = max(1, min(writers or SHARD_WRITERS, os.cpu_count() or 1, len(by_shard)))
    with ThreadPoolExecutor(workers, thread_name_prefix="glmrel-shard-write") as pool:
        for done in [pool.submit(write, shard) for shard in by_shard]:
            done.result()


@dataclass
class SavedLayout:
    """A saved branch's weights without its MTP layer(s) (`write_branch_files` puts those
    back): its shards in order, what each holds, and which modules are quantized."""

    folder: Path
    shards: list[str]
    by_shard: dict[str, list[str]]
    parts: dict[str, set[str]]  # quantized module -> its saved tensors (`weight_packed`, `weight_scale`, ...)
    mtp_layers: tuple[int, ...]

    @property
    def names(self) -> set[str]:
        return {n for names in self.by_shard.values() for n in names}

    def is_quantized_part(self, name: str) -> bool:
        module, _, part = name.rpartition(".")
        return part in QUANT_PARTS and module in self.parts

    def write_index_and_config(self, out: Path, quantization: dict[str, Any]) -> None:
        """The side branch's `config.json`: the propagating branch's model config, whose
        `quantization_config` takes its `config_groups` from the side run's own quantizer
        (`quantization`: what its store's `quantization_config.json` holds) and keeps what the
        pass shares (ignored modules, format, versions) without the MTP ignore entry
        `_carry_mtp_layers` adds back; and, for several shards, its index, as llm-compressor's
        save writes them."""
        import json

        from compressed_tensors.utils import update_safetensors_index

        config = json.loads((self.folder / "config.json").read_text())
        qc = config["quantization_config"]
        qc["config_groups"] = quantization["config_groups"]
        mtp = {mtp_ignore_entry(n) for n in self.mtp_layers}
        qc["ignore"] = [x for x in qc.get("ignore", []) if x not in mtp]
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if len(self.shards) > 1:
            weight_map = {n: s for s in self.shards for n in sorted(self.by_shard[s])}
            update_safetensors_index(str(out), sum((out / s).stat().st_size for s in self.shards), weight_map)


def saved_layout(folder: Path, arch: Glm4MoeArch) -> SavedLayout:
    """`folder`'s saved weights as `SavedLayout` (`read_weight_map`: from its index, or its one
    shard), without the MTP layer(s)."""
    weight_map = read_weight_map(folder)
    mtp = tuple(mtp_prefix(n) for n in arch.mtp_layers)
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not (mtp and name.startswith(mtp)):
            by_shard.setdefault(shard, []).append(name)
    names = [n for shard in by_shard.values() for n in shard]
    parts: dict[str, set[str]] = {n.rpartition(".")[0]: set() for n in names if n.endswith(".weight_packed")}
    for n in names:
        module, _, part = n.rpartition(".")
        if part in QUANT_PARTS and module in parts:
            parts[module].add(n)
    return SavedLayout(folder, sorted(by_shard), by_shard, parts, tuple(arch.mtp_layers))
