"""Narrow, version-pinned workarounds for llm-compressor, applied only where they are needed."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def patch_cpu_only_awq() -> bool:
    """Make AWQ run on a machine without an accelerator (llm-compressor 0.14.0.1).

    AWQModifier._apply_smoothing calls IntermediatesCache.pin_memory, and
    ``tensor.pin_memory()`` raises "Cannot access accelerator device when none is available"
    on CPU-only torch. Pinning only speeds host->device copies, so with no device it is a
    no-op by definition. With an accelerator present nothing is patched, so GPU runs keep
    the library's behaviour. Returns whether the patch was applied.
    """
    import torch

    if torch.accelerator.is_available():
        return False
    from llmcompressor.pipelines.cache import IntermediatesCache

    if getattr(IntermediatesCache.pin_memory, "_glmrel_noop", False):
        return True

    def pin_memory(self, batch_index, input_names=None):  # noqa: ARG001 - same signature as the library's
        return None

    pin_memory._glmrel_noop = True  # type: ignore[attr-defined]
    IntermediatesCache.pin_memory = pin_memory
    log.info("no accelerator: IntermediatesCache.pin_memory patched to a no-op")
    return True
