"""Disk room, checked before any work: what a build will write, estimated from the base
checkpoint's headers and the recipe, against what the file systems it writes to have free.

A full disk found after hours of calibration loses them; a refusal before the model is
loaded costs nothing. The estimates are upper bounds within a few percent (tested against
real builds), so a refusal means the build would not have fit.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from .architecture import Glm4MoeArch
from .errors import ReleaseError

LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# beside the weights: tokenizer, chat template, configs, records (a generous allowance)
RECORDS_BYTES = 1 << 20


def weights_bytes(
    base_dir: Path, arch: Glm4MoeArch, dtype: str, group_size: int, ignore: Sequence[str], *, decoder_only: bool
) -> int:
    """What a W4A16 branch's weights take (or, `decoder_only`, a side branch's store: its
    decoder layers): a decoder layer's 2-D `.weight` is a quantized Linear unless the recipe's
    `ignore` names its module, packed four bits to a value (int32 words) with one scale per
    group in the dtype the build loads; every other tensor as it is, in that dtype, but the MTP
    layers, which are copied from the checkpoint as they are."""
    from compressed_tensors.utils.match import match_name

    from .check import DTYPE_BYTES, TORCH_TO_ST, read_shard

    size = DTYPE_BYTES[TORCH_TO_ST[dtype]] if dtype in TORCH_TO_ST else None  # "auto": the checkpoint's
    total = 0
    for f in sorted(base_dir.glob("*.safetensors")):
        meta, _errors = read_shard(f)
        for name, t in meta.tensors.items() if meta is not None else ():
            m = LAYER.match(name)
            decoder = m is not None and int(m[1]) < arch.num_hidden_layers
            stored = t.data_offsets[1] - t.data_offsets[0]
            if decoder_only and not decoder:
                continue
            if m is not None and not decoder:  # an MTP layer
                total += stored
                continue
            item = size or DTYPE_BYTES.get(t.dtype, 2)
            module = name.removesuffix(".weight")
            if (
                decoder
                and name.endswith(".weight")
                and len(t.shape) == 2
                and not any(match_name(module, x) for x in ignore)
            ):
                rows, cols = t.shape
                total += rows * -(-cols // 8) * 4 + rows * -(-cols // group_size) * item + 16
            else:
                total += stored // DTYPE_BYTES.get(t.dtype, 2) * item
    return total


def branch_bytes(base_dir: Path, arch: Glm4MoeArch, dtype: str, group_size: int, ignore: Sequence[str]) -> int:
    """What a built branch's folder takes: its weights and an allowance for the rest."""
    return weights_bytes(base_dir, arch, dtype, group_size, ignore, decoder_only=False) + RECORDS_BYTES


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_room(what: str, needs: Sequence[tuple[Path, int, str]], hint: str) -> None:
    """Refuse `what` unless each file system has room for all it will hold of `needs`
    ([(where, bytes, for what)]): folders on one file system are added up."""
    by_fs: dict[int, list[tuple[Path, int, str]]] = {}
    for where, n, label in needs:
        by_fs.setdefault(os.stat(_existing(where)).st_dev, []).append((where, n, label))
    for items in by_fs.values():
        need = sum(n for _, n, _ in items)
        where = items[0][0]
        free = shutil.disk_usage(_existing(where)).free
        if free < need:
            parts = ", ".join(f"{label} {n / 2**30:.1f} GiB" for _, n, label in items)
            raise ReleaseError(
                f"{what} needs about {need / 2**30:.1f} GiB at {where} ({parts}), "
                f"and {free / 2**30:.1f} GiB are free there",
                hint=hint,
            )


def recipe_ignore(recipe_text: str) -> list[str]:
    """The `ignore` list of a rendered recipe's QuantizationModifier (what stays unquantized)."""
    from .awq.side import quantizer

    return list(quantizer(recipe_text, "cpu").modifier.ignore or [])
