"""Reproducible CPU numerics for the embedded demo: the same bits on every run, and on machines of
one CPU vendor (measured: an AMD EPYC and an Intel Xeon still differ with these settings).

torch picks its CPU kernels by the host's instruction set (AVX-512 or AVX2 softmax, layer
norm and reductions) and MKL picks its matrix-multiply code path by CPU vendor and model, so
the same float32 computation gives different last bits on an Intel AVX-512 host and an AMD
EPYC (measured here: softmax differs between the AVX-512 and AVX2 kernels; MKL's matmul
changes with its code path). The demo trains a model and runs AWQ's grid search, where a
last-bit difference can flip a near-tied choice, so its weight digests would differ per host.

Pinning every dispatcher to AVX2 (which every x86-64 CI machine has) and the thread count to
two (shared by torchrun's ranks on one host: `threads_per_process`) makes the demo
bit-reproducible. It must happen before torch is imported: the settings
are read once, at start-up. The GLM-4.7 release runs on GPUs and keeps native CPU kernels.
"""

from __future__ import annotations

import os
import sys

from .errors import ReleaseError

THREADS = 2
REPRODUCIBLE_CPU_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorized kernels
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility: one code path on any CPU
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (mkldnn) kernels
    "OMP_NUM_THREADS": str(THREADS),  # reductions are split by thread
}


def threads_per_process() -> int:
    """The demo's `THREADS` cores shared by the processes of one host: a torchrun rank (its
    LOCAL_WORLD_SIZE ranks on this host) gets its share, at least one. Two ranks of two threads
    each on two cores spin against each other (measured: a CPU rank's matmuls and element-wise
    ops 5-10x slower than one process's); the count is fixed by the rank count, not the host,
    so runs stay reproducible."""
    try:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_ranks = 1
    return max(1, THREADS // local_ranks)


def pin_reproducible_cpu() -> None:
    """Set the environment for reproducible CPU numerics (and keep it for child processes,
    e.g. torchrun's ranks, which take their share of the threads: `threads_per_process`). If
    torch is already loaded, its CPU kernels must have been chosen with these settings;
    otherwise this raises, because nothing can change them any more. The thread count can
    still be set, and is."""
    threads = threads_per_process()
    if "torch" not in sys.modules:
        os.environ.update({**REPRODUCIBLE_CPU_ENV, "OMP_NUM_THREADS": str(threads)})
        return
    import torch

    wrong = {
        k: os.environ.get(k)
        for k, v in REPRODUCIBLE_CPU_ENV.items()
        if k != "OMP_NUM_THREADS" and os.environ.get(k) != v
    }
    capability = torch.backends.cpu.get_cpu_capability()
    if wrong or capability != "AVX2":
        raise ReleaseError(
            f"torch was loaded before the demo's reproducible CPU settings (CPU kernels {capability}; "
            f"not set: {', '.join(wrong) or 'none'})",
            hint="start the process with " + " ".join(f"{k}={v}" for k, v in REPRODUCIBLE_CPU_ENV.items()),
        )
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for child processes
    torch.set_num_threads(threads)
