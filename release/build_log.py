"""The local record of how a build ran, never published.

A branch's published files depend only on its inputs, so the same inputs give the same bytes
(`build-all --force` twice gives identical trees). What differs from run to run — timings,
peak memory, the AWQ engine's per-layer counters, the host and process — goes here:
`<output_dir>/.glmrel-cache/build-log/<branch>.json`, one object per branch with a section
per stage (`quantize`, `verify`), each replaced when its stage runs again.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from .manifest import CACHE_DIR, write_if_changed

LOG_DIR = "build-log"


def build_log_path(output_dir: Path, branch: str) -> Path:
    return output_dir / CACHE_DIR / LOG_DIR / f"{branch}.json"


def read_build_log(output_dir: Path, branch: str) -> dict[str, Any]:
    """The branch's build log ({} when there is none or it cannot be read: it is only a log)."""
    try:
        data = json.loads(build_log_path(output_dir, branch).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_build_log(output_dir: Path, branch: str, stage: str, record: dict[str, Any]) -> Path:
    """Replace `stage`'s section of the branch's build log with `record`, stamped with the
    host, process and time. A log that cannot be written costs the record, not the build."""
    path = build_log_path(output_dir, branch)
    data = read_build_log(output_dir, branch)
    data[stage] = {"host": socket.gethostname(), "pid": os.getpid(), "finished_unix": round(time.time(), 1), **record}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_if_changed(path, json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    except OSError:
        pass
    return path
