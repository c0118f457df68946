"""Disk room, checked before any work: what a build will write, estimated from the base
checkpoint's headers and the tensors a branch holds, against what the file systems it writes to
have free.

A full disk found after hours of calibration loses them; a refusal before the model is
loaded costs nothing. The estimates are upper bounds within a few percent (tested against
real builds), so a refusal means the build would not have fit.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..architecture import Glm4MoeArch
from ..errors import ReleaseError

LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# beside the weights: tokenizer, chat template, configs, records (a generous allowance)
RECORDS_BYTES = 1 << 20


def weights_bytes(base_dir: Path, arch: Glm4MoeArch, dtype: str, group_size: int, *, decoder_only: bool) -> int:
    """What a W4A16 branch's weights take (or, `decoder_only`, a side branch's store: its
    decoder layers), from the tensors `glmrel check` requires of such a branch
    (`layout.expected_inventory`: packed Linears and their scales, the rest in the dtype the
    build loads), but the MTP layers, which are copied from the checkpoint as it holds them."""
    import json

    from ..layout import DTYPE_BYTES, TORCH_TO_ST, expected_inventory, read_shard

    if dtype in TORCH_TO_ST:
        model_dtype = TORCH_TO_ST[dtype]
    else:  # "auto": the checkpoint's, read as `glmrel check` reads a branch's
        config = json.loads((base_dir / "config.json").read_text())
        model_dtype = TORCH_TO_ST.get(str(config.get("dtype") or config.get("torch_dtype")), "BF16")
    required, _optional = expected_inventory(arch, group_size, model_dtype)  # optional ones are in required too
    checkpoint: dict[str, int] = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        meta, _errors = read_shard(f)
        for name, t in meta.tensors.items() if meta is not None else ():
            checkpoint[name] = t.data_offsets[1] - t.data_offsets[0]
    total = 0
    for name, (dtypes, shape) in required.items():
        m = LAYER.match(name)
        decoder = m is not None and int(m[1]) < arch.num_hidden_layers
        if decoder_only and not decoder:
            continue
        if m is not None and not decoder:  # an MTP layer, as the checkpoint holds it
            total += checkpoint.get(name, 0)
            continue
        item = DTYPE_BYTES[next(iter(dtypes))] if len(dtypes) == 1 else DTYPE_BYTES[model_dtype]
        total += math.prod(shape) * item
    return total


def branch_bytes(base_dir: Path, arch: Glm4MoeArch, dtype: str, group_size: int) -> int:
    """What a built branch's folder takes: its weights and an allowance for the rest."""
    return weights_bytes(base_dir, arch, dtype, group_size, decoder_only=False) + RECORDS_BYTES


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
            parts = ", ".join(f"{label} {size_text(n)}" for _, n, label in items)
            raise ReleaseError(
                f"{what} needs about {size_text(need)} at {where} ({parts}), and {size_text(free)} are free there",
                hint=hint,
            )


def size_text(n: int) -> str:
    """Bytes in the unit that shows them: 12.3 GiB, 45.6 MiB, 7.8 KiB (never "0.0 GiB")."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
