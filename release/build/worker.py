"""The entry point of a torchrun rank: `python -m release.build.worker --config C --branch B [--branch ...]`.

`quantize --gpus N` (and `build-all --gpus N`) launch N of these with torchrun
(`distributed.launch`); each joins the process group, calibrates its share of the samples,
and rank 0 writes the branch. One branch: the launcher has already decided it must be built
(its inputs changed or `--force`), so a rank always builds. Several: one calibration pass for
all of them (`one_pass.quantize_pass`), which skips those up to date unless `--force`. Errors end as the CLI's do: one
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
    ap.add_argument("--branch", required=True, action="append")
    ap.add_argument("--force", action="store_true", help="several branches: rebuild those up to date too")
    a = ap.parse_args(argv)
    from ..config import load_for_run
    from .distributed import CUDA_ALLOC_CONF
    from .one_pass import quantize_pass
    from .quantize import quantize_branch

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
    try:
        cfg = load_for_run(a.config)
        if len(a.branch) == 1:
            quantize_branch(cfg, a.branch[0], force=True, echo=print)
        else:
            quantize_pass(cfg, a.branch, force=a.force, echo=print)
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
