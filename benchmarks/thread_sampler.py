"""Where the main thread is while onload-ahead's helper copies the next layer's weights.

Session 37's H100 record (benchmarks/results/2026-12-07-h100-sync-free-routing) found the main
thread held for the copies' whole length: the propagation pass began 0.30-0.47 s after they
ended, in every run. Which call holds it is not known. `CopiesSampler` samples the main thread's
Python stack every `period` seconds while `OnloadAhead._onload` runs on the helper thread, and
counts the samples by call site (the innermost frames, glmrel's and the libraries' alike), so a
timed run (`benchmarks.profile_layer`) records where the main thread waited:

    with CopiesSampler() as sampler:
        ...                                  # the calibration
    sampler.top()                            # [{"site": ..., "samples": n}, ...]

Sampling costs the main thread nothing but the GIL for a stack walk each period.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from typing import Any


class CopiesSampler:
    """The main thread's call sites, sampled while the helper copies (see the module docstring).
    `active` may also be set by hand (a test)."""

    def __init__(self, period: float = 0.02, depth: int = 8) -> None:
        self.period, self.depth = period, depth
        self.main = threading.main_thread().ident
        self.active = threading.Event()
        self.stop = threading.Event()
        self.sites: dict[str, int] = {}
        self.samples = 0
        self.thread = threading.Thread(target=self._run, name="glmrel-copies-sampler", daemon=True)
        self.patched: tuple[Any, Any] | None = None

    def _run(self) -> None:
        while not self.stop.is_set():
            if not self.active.wait(0.1) or self.stop.is_set():
                continue
            frame = sys._current_frames().get(self.main)
            if frame is not None:
                stack = traceback.extract_stack(frame)[-self.depth :]
                site = " < ".join(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in reversed(stack))
                self.sites[site] = self.sites.get(site, 0) + 1
                self.samples += 1
            time.sleep(self.period)

    def __enter__(self) -> CopiesSampler:
        from release.awq.read_ahead import OnloadAhead

        stock = OnloadAhead._onload
        sampler = self

        def sampled(self: Any, *args: Any, **kwargs: Any) -> Any:
            sampler.active.set()
            try:
                return stock(self, *args, **kwargs)
            finally:
                sampler.active.clear()

        OnloadAhead._onload = sampled  # type: ignore[method-assign]
        self.patched = (OnloadAhead, stock)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.patched is not None:
            cls, stock = self.patched
            cls._onload = stock
        self.stop.set()
        self.active.set()  # wake the sampler so that it sees `stop`
        self.thread.join()

    def top(self, n: int = 12) -> list[dict[str, Any]]:
        rows = sorted(self.sites.items(), key=lambda kv: -kv[1])[:n]
        return [{"site": site, "samples": count} for site, count in rows]


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/release/", "/benchmarks/"):
        if marker in filename:
            head = "" if marker == "site-packages/" else marker.strip("/") + "/"
            return head + filename.split(marker, 1)[1]
    return filename
