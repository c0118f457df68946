"""The entry point of a torchrun rank: `python -m release.build.worker --config C --branch B`.

`quantize --gpus N` (and `build-all --gpus N`) launch N of these with torchrun
(`distributed.launch`); each joins the process group, calibrates its share of the samples,
and rank 0 writes the branch. The launcher has already decided the branch must be built (its
inputs changed or `--force`), so a rank always builds. Errors end as the CLI's do: one
`Error:` and `Hint:` on stderr and exit status 1; the launcher reports the failed run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import ReleaseError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m release.build.worker", description=__doc__)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--branch", required=True)
    a = ap.parse_args(argv)
    from ..config import load_for_run
    from .distributed import CUDA_ALLOC_CONF
    from .quantize import quantize_branch

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
    try:
        quantize_branch(load_for_run(a.config), a.branch, force=True, echo=print)
    except ReleaseError as e:
        if os.environ.get("GLMREL_DEBUG"):
            raise
        print(f"Error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"Hint: {e.hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
