"""Streaming comparison of a base model and its branches, one decoder layer at a time.

`verify` must run at GLM-4.7 size (355 B parameters: ~710 GB in bf16), where neither model
fits in host RAM, let alone both. So nothing here loads a model: transformers builds
Glm4MoeForCausalLM on the meta device (its own modules and forward), and each piece — the
embeddings, then decoder layer 0, 1, … , then the final norm and lm_head — is materialized
on the compute device from the safetensors shards, run on the held-out text, and released.
A branch's quantized Linears are decompressed on the device with compressed-tensors' own
`PackedQuantizationCompressor.decompress` (what transformers does when it loads the branch),
and per-expert tensors are stacked into transformers' fused expert parameters exactly as its
checkpoint conversion does (`MergeModulelist(dim=0)`, `Concatenate(dim=1)`).

Resident at any time: one piece of the base model and one of each branch, plus every model's
hidden states of the held-out tokens ([tokens, hidden] each). The base model is read once for
all branches. Each layer's output is compared with the base's (relative error and cosine):
where quantization error enters, and how it grows through the layers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ReleaseError
from ..layout import read_weight_map


@dataclass(frozen=True)
class LayerDivergence:
    """A branch's decoder-layer output against the base model's, over all held-out tokens."""

    layer: int
    rel_error: float  # ||h_branch - h_base|| / ||h_base||
    cosine: float  # mean over tokens of cos(h_branch, h_base)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StreamResult:
    """Per model: log-probabilities of every held-out text ([tokens, vocab] each) and, for a
    branch, the divergence of each decoder layer's output from the base model's."""

    logprobs: list[Any]
    layers: list[LayerDivergence]


def phase(name: str) -> Any:
    """A named span of the streaming verify (`verify.<name>`) for torch's profiler: what
    benchmarks/verify_profile.py sums. Costs nothing when no profiler runs."""
    import torch

    return torch.profiler.record_function(f"verify.{name}")


class Checkpoint:
    """Tensors of a safetensors checkpoint by name, through its index (or its one shard)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.weight_map = read_weight_map(self.folder)
        try:
            self.config = json.loads((self.folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ReleaseError(
                f"{self.folder}/config.json is unreadable: {e}",
                hint="a checkpoint's config.json is UTF-8 JSON; rebuild the branch, or download the model again",
            ) from e

    def read(self, prefix: str, device: Any) -> dict[str, Any]:
        """Every tensor whose name starts with `prefix`, read from its shard into host memory:
        for a CUDA `device`, into one pinned buffer (copied on with non_blocking), else a copy
        of its own. What `_ReadAhead`'s threads do while the device computes; the copies run
        outside the GIL (torch's)."""
        import torch
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = {}
        for name, shard in self.weight_map.items():
            if name.startswith(prefix):
                by_shard.setdefault(shard, []).append(name)
        mapped = {}  # views of the memory-mapped shards: nothing is read yet
        for shard, names in sorted(by_shard.items()):
            with safe_open(str(self.folder / shard), framework="pt", device="cpu") as f:
                for name in names:
                    mapped[name[len(prefix) :]] = f.get_tensor(name)
        if torch.device(device).type != "cuda":
            return {k: t.clone() for k, t in mapped.items()}
        buffer = torch.empty(sum(t.nbytes for t in mapped.values()), dtype=torch.uint8, pin_memory=True)
        out, at = {}, 0
        for k, t in mapped.items():
            out[k] = buffer[at : at + t.nbytes].view(t.dtype).view(t.shape).copy_(t)
            at += t.nbytes
        return out


class _ReadAhead:
    """The pieces of every model, in the order the stream computes them, read into host memory
    by a pool of threads (one a model) up to `ahead` pieces before they are needed: the disk
    reads of the next layer overlap the device's work on this one, and the models' shards are
    read side by side. At most `ahead` pieces wait in host memory (with one layer of each model
    ahead, for GLM-4.7 in bf16 about 7.5 GiB of the base model and the branches' compressed
    layers). `ahead=0`, stream_compare's default: each piece is read when it is taken."""

    def __init__(self, order: list[tuple[Checkpoint, str]], device: Any, ahead: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._order, self._device, self._ahead = order, device, max(ahead, 0)
        self._pool = ThreadPoolExecutor(max(1, min(len(order), ahead)), thread_name_prefix="glmrel-verify-read")
        self._futures: dict[int, Any] = {}
        self._next = 0

    def take(self, checkpoint: Checkpoint, prefix: str) -> dict[str, Any]:
        """The piece `prefix` of `checkpoint` on the device: it must be the next in the order."""
        i = self._next
        if i >= len(self._order) or self._order[i] != (checkpoint, prefix):
            raise RuntimeError(f"verify read {prefix!r} of {checkpoint.folder} out of its order")  # a bug, not input
        self._next += 1
        for j in range(i, min(i + 1 + self._ahead, len(self._order))):
            if j not in self._futures:
                c, p = self._order[j]
                self._futures[j] = self._pool.submit(c.read, p, self._device)
        tensors = self._futures.pop(i).result()
        return {k: t.to(self._device, non_blocking=True) for k, t in tensors.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._futures.clear()


def _quantization_scheme(config: dict) -> Any | None:
    """The branch's one quantization scheme (None for an unquantized checkpoint)."""
    from compressed_tensors.quantization import QuantizationScheme

    qc = config.get("quantization_config")
    if not qc:
        return None
    if qc.get("format") != "pack-quantized" or len(qc.get("config_groups") or {}) != 1:
        raise ReleaseError(
            f"streaming verify reads pack-quantized checkpoints with one config group, not {qc.get('format')!r}",
            hint="run `glmrel check` on the branch",
        )
    (group,) = qc["config_groups"].values()
    return QuantizationScheme.model_validate(group)


def _decompressed(tensors: dict[str, Any], scheme: Any | None) -> dict[str, Any]:
    """Replace every packed Linear (weight_packed, weight_scale, weight_shape…) by its weight."""
    if scheme is None:
        return tensors
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    out = dict(tensors)
    for packed in [k for k in tensors if k.endswith(".weight_packed")]:
        module = packed[: -len(".weight_packed")]
        local = {k[len(module) + 1 :]: out.pop(k) for k in list(out) if k.startswith(module + ".weight_")}
        out[module + ".weight"] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    return out


def _fused_experts(tensors: dict[str, Any], n_experts: int) -> dict[str, Any]:
    """Per-expert Linears as transformers' fused expert parameters: gate_up_proj [E, 2I, H]
    and down_proj [E, H, I] (its checkpoint conversion for glm4_moe)."""
    import torch

    if "mlp.experts.0.gate_proj.weight" not in tensors:
        return tensors
    out = dict(tensors)

    def stack(proj: str) -> Any:
        return torch.stack([out.pop(f"mlp.experts.{e}.{proj}.weight") for e in range(n_experts)])

    gate, up, down = stack("gate_proj"), stack("up_proj"), stack("down_proj")
    out["mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
    out["mlp.experts.down_proj"] = down
    return out


@contextmanager
def _materialized(module: Any, tensors: dict[str, Any], device: Any, what: str) -> Iterator[Any]:
    """`module` (built on the meta device) with `tensors` on `device` for the block's duration,
    then back on the meta device (its memory released)."""
    try:
        with phase("materialize"):
            module.to_empty(device=device)
            missing, unexpected = module.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ReleaseError(f"{what} does not fit the model: {e}", hint="run `glmrel check` on it") from e
    if missing or unexpected:
        raise ReleaseError(
            f"{what}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}",
            hint="run `glmrel check` on the folder: its tensors do not match its config",
        )
    try:
        yield module
    finally:
        module.to("meta")


class _Model:
    """One checkpoint seen through a meta-device transformers model: its pieces on demand."""

    def __init__(self, folder: Path, model_config: Any, dtype: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.checkpoint = Checkpoint(folder)
        self.name = str(folder)
        self.scheme = _quantization_scheme(self.checkpoint.config)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
        self.n_experts = int(model_config.n_routed_experts)

    def piece(self, module: Any, prefix: str, device: Any, reader: _ReadAhead, fuse: bool = False):  # type: ignore[no-untyped-def]
        with phase("read"):
            tensors = reader.take(self.checkpoint, prefix)
        with phase("decompress"):
            tensors = _decompressed(tensors, self.scheme)
        if fuse:
            with phase("fuse"):
                tensors = _fused_experts(tensors, self.n_experts)
        return _materialized(module, tensors, device, f"{self.name}: {prefix or 'top level'}")


def _divergence(layer: int, branch: list[Any], base: list[Any]) -> LayerDivergence:
    import torch

    diff = base_sq = cos_sum = 0.0
    tokens = 0
    for b, a in zip(branch, base):
        a32, b32 = a.float().flatten(0, -2), b.float().flatten(0, -2)
        diff += (b32 - a32).pow(2).sum().item()
        base_sq += a32.pow(2).sum().item()
        cos_sum += torch.nn.functional.cosine_similarity(b32, a32, dim=-1).sum().item()
        tokens += a32.shape[0]
    return LayerDivergence(layer, math.sqrt(diff / base_sq) if base_sq else 0.0, cos_sum / max(tokens, 1))


def stream_compare(
    base_dir: Path,
    branch_dirs: dict[str, Path],
    batches: list[Any],
    *,
    device: Any = "cpu",
    dtype: Any = None,
    log: Callable[[str], None] = lambda s: None,
    read_ahead: int = 0,
) -> tuple[StreamResult, dict[str, StreamResult]]:
    """Run the base model and every branch over `batches` (token ids, [1, T] each), one piece
    of each model resident at a time on the device, each piece read when it is needed, or up to
    `read_ahead` pieces ahead on threads. Read-ahead is off by default: on one H200 with the
    checkpoints in memory it cut the read span 2-3x but made the whole verify slower (18.6 and
    21.3 s against 16.7 s, benchmarks/results/2026-12-04-h200-rest-of-the-release).
    Returns (base result, {branch: result})."""
    import torch
    from transformers import AutoConfig
    from transformers.masking_utils import create_causal_mask

    dtype = dtype or torch.float32
    config = AutoConfig.from_pretrained(base_dir)
    models = {"": _Model(base_dir, config, dtype)} | {n: _Model(d, config, dtype) for n, d in branch_dirs.items()}
    shapes = {name: m.checkpoint.config.get("num_hidden_layers") for name, m in models.items()}
    if len(set(shapes.values())) != 1:
        raise ReleaseError(f"the branches and the base model disagree on the number of layers: {shapes}")
    template = models[""].model.model
    position_ids = [torch.arange(ids.shape[1], device=device).unsqueeze(0) for ids in batches]
    rotary = type(template.rotary_emb)(config=config, device=device)
    layers: dict[str, list[LayerDivergence]] = {n: [] for n in branch_dirs}
    prefixes = ["model.embed_tokens."] + [f"model.layers.{i}." for i in range(config.num_hidden_layers)]
    order = [(m.checkpoint, p) for p in prefixes for m in models.values()]
    order += [(m.checkpoint, p) for m in models.values() for p in ("model.norm.", "lm_head.")]
    reader = _ReadAhead(order, device, read_ahead)
    try:
        with torch.no_grad():
            hidden: dict[str, list[Any]] = {}
            for name, m in models.items():
                with m.piece(m.model.model.embed_tokens, "model.embed_tokens.", device, reader) as embed:
                    hidden[name] = [embed(ids.to(device)) for ids in batches]
            extras = []
            for h, pos in zip(hidden[""], position_ids):
                mask = create_causal_mask(
                    config=template.config, inputs_embeds=h, attention_mask=None, past_key_values=None, position_ids=pos
                )
                extras.append({"attention_mask": mask, "position_ids": pos, "position_embeddings": rotary(h, pos)})
            for i in range(config.num_hidden_layers):
                moe = i >= config.first_k_dense_replace
                for name, m in models.items():
                    with m.piece(
                        m.model.model.layers[i], f"model.layers.{i}.", device, fuse=moe, reader=reader
                    ) as layer:
                        with phase("forward"):
                            hidden[name] = [layer(h, use_cache=False, **x) for h, x in zip(hidden[name], extras)]
                with phase("divergence"):
                    for name in branch_dirs:
                        layers[name].append(_divergence(i, hidden[name], hidden[""]))
                log(f"layer {i}: " + ", ".join(f"{n} {layers[n][-1].rel_error:.2e}" for n in branch_dirs))
            results = {}
            for name, m in models.items():
                with m.piece(m.model.model.norm, "model.norm.", device, reader) as norm:
                    hidden[name] = [norm(h) for h in hidden[name]]
                with m.piece(m.model.lm_head, "lm_head.", device, reader) as head:
                    logprobs = [torch.log_softmax(head(h)[0].float(), dim=-1).cpu() for h in hidden[name]]
                results[name] = StreamResult(logprobs, layers.get(name, []))
    finally:
        reader.close()
    return results.pop(""), results
