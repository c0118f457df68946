"""Offloaded base weights read ahead: the next decoder layer's disk-offloaded weights asked into
the page cache while the current layer is smoothed.

With `offload.cpu_gib` below the model's size, compressed-tensors' disk offload keeps each
weight as a byte range of a safetensors file (the checkpoint's own shards, through symlinks, or
a file of its own once written) and reads it when the sequential pipeline onloads the layer:
the layer's first calibration batch waits for the disk (an offloaded build took 2.0x the
in-RAM one at GLM-4.7 layer size, run U). At the start of a layer's AWQ smoothing, about a
minute before the pipeline reaches the next layer at the recipe's 512 samples, `ReadAhead`
asks the kernel on a background thread to read that layer's ranges (`posix_fadvise`
WILLNEED): the onload then reads memory. Only a hint: the same bytes are read either way, so
the weights are the same; nothing is held but the kernel's reclaimable page cache.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

LAYER_INDEX = re.compile(r"^(.*\.layers\.)(\d+)$")


def disk_ranges(module: Any) -> list[tuple[str, int, int]]:
    """(file, offset, length) of every weight of `module` that compressed-tensors keeps on disk."""
    from compressed_tensors.offload.cache.disk import DiskCache
    from huggingface_hub import parse_local_safetensors_file_metadata

    headers: dict[str, tuple[int, Any]] = {}
    out = []
    for m in module.modules():
        cache = m._parameters
        if not isinstance(cache, DiskCache):
            continue
        for offloaded in cache.offloaded_values.values():
            info = DiskCache.index.get(offloaded) if offloaded is not None else None
            if info is None:
                continue
            path = os.path.realpath(info["safetensors_file"])
            if path not in headers:
                with open(path, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                headers[path] = (8 + n, parse_local_safetensors_file_metadata(path))
            start, meta = headers[path]
            begin, end = meta.tensors[info["weight_name"]].data_offsets
            out.append((path, start + begin, end - begin))
    return out


def next_layer(model: Any, key: str) -> Any | None:
    """The decoder layer after `key` (`model.layers.3` -> `model.layers.4`), if the model has one."""
    m = LAYER_INDEX.match(key)
    if m is None:
        return None
    try:
        return model.get_submodule(f"{m[1]}{int(m[2]) + 1}")
    except AttributeError:
        return None


def advise(ranges: list[tuple[str, int, int]]) -> None:
    """Ask the kernel to read `ranges` into the page cache (returns once the reads are queued)."""
    for path, offset, length in ranges:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


class ReadAhead:
    """One background thread that reads ahead the layer after the one being smoothed."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glmrel-read-ahead")
        self.pending: Future[None] | None = None
        self.advised_bytes = 0
        self.layers = 0

    def after(self, model: Any, key: str) -> None:
        """Read ahead the decoder layer after `key`'s offloaded weights, if it has any on disk."""
        layer = next_layer(model, key)
        ranges = disk_ranges(layer) if layer is not None and hasattr(os, "posix_fadvise") else []
        if not ranges:
            return
        self.wait()
        self.advised_bytes += sum(length for _, _, length in ranges)
        self.layers += 1
        self.pending = self.pool.submit(advise, ranges)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)
