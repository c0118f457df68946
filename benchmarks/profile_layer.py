"""Where one calibration's time goes on a GPU: per-layer phases, GPU busy time, and the top
kernels and operators (torch.profiler).

Runs `release.build.calibrate.calibrate` (what `glmrel quantize` runs before saving) on a release
config made by `benchmarks.synthetic`, twice in this process's children:

1. `--samples N` unprofiled: each decoder layer's calibration forward and AWQ smoothing, with
   the GPU's utilization sampled through NVML every 0.2 s and averaged over each phase (the
   share of time a kernel was running: how much the GPU waits on the host);
2. `--profile-samples M` under torch.profiler (CPU and CUDA): the kernels by GPU time, the
   operators by CPU time and call count, host<->device copies by kind, and the sum of all
   kernel time against the wall time (M small: the profiler records every call).

  python -m benchmarks.synthetic --preset glm47 --layers 1 --dense 0 --device cuda --out /dev/shm/syn \
      --group-size 128 --samples 512 --seq 2048
  python -m benchmarks.profile_layer --config /dev/shm/syn/release.yaml --samples 512 --profile-samples 64 \
      --json out/profile.json --tables out/profile.txt

`--one-pass` smooths the config's other branches beside the first in the same pass, as
`build-all` does: with one dense and one MoE layer and three group sizes this is the record
`benchmarks.release_estimate` turns into the full release's time:

  python -m benchmarks.synthetic --preset glm47 --layers 2 --dense 1 --device cuda --out /dev/shm/syn \
      --group-size 32 --group-size 64 --group-size 128 --samples 512 --seq 2048
  python -m benchmarks.profile_layer --config /dev/shm/syn/release.yaml --samples 512 --profile-samples 0 \
      --one-pass --json out/pass.json
  python -m benchmarks.release_estimate --record out/pass.json

`--profile-calibrating K` narrows the profiled run to subgraph K's calibration pass (1-based, as
llm-compressor's progress bar counts them; with `--layers 1 --dense 0` the MoE layer's is 2): the
profiler starts at its first batch and stops after its last, the GPU synchronized, so the kernels'
sum against that window's wall is how busy the GPU was in it. `--stacks` adds, for that window,
the operators grouped by their calling operator and Python functions (`by_stack`: what made a
copy or waited on the GPU). Where the profiler records no Python frames (the H100's torch 2.11
in session 32's record) only the calling operator is named.

`--h2d-samples N` adds a run that counts the host-to-device copies from unpinned memory by the
line that made them (`H2DSources`).

`--sync-samples N` adds a run that counts, by Python call site, the calls that made the host
wait for the GPU in subgraph K's calibration pass (`--profile-calibrating K`, 2 where not given;
torch's sync debug mode, `SyncSites`).

The timed run also records where the main thread was while onload-ahead's helper copied the
next layer's weights (`main_thread_during_copies`: its call sites, sampled every 20 ms;
thread_sampler.py): session 37 found it held for the copies' whole length.

`--awq KEY=VALUE` sets an `awq:` option for both runs (e.g. `fused_gpu_experts=false`, the
experts' per-expert loop), `--engine KEY=VALUE` an engine option no config sets (e.g.
`onload_ahead=[]`, `gram_by_gemm=true`); `--scales FILE` saves the timed run's chosen scales, and `--compare A B`
prints two such files' agreement per kind of mapping.

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.thread_sampler import CopiesSampler


def _config(release_yaml: Path, samples: int, seq: int | None, awq: list[str] = (), sets: list[str] = ()) -> Path:
    """The release config at `samples` (and `seq`), with `awq:` settings KEY=VALUE and any
    SECTION.KEY=VALUE (`sets`) set."""
    import yaml

    raw = yaml.safe_load(release_yaml.read_text())
    raw["calibration"]["num_samples"] = samples
    if seq:
        raw["calibration"]["max_seq_length"] = seq
    for item in awq:
        key, _, value = item.partition("=")
        raw.setdefault("awq", {})[key] = yaml.safe_load(value)
    for item in sets:
        dotted, _, value = item.partition("=")
        section, _, key = dotted.partition(".")
        raw.setdefault(section, {})[key] = yaml.safe_load(value)
    tag = "-".join([str(samples), *(a.replace("=", "-") for a in [*awq, *sets])])
    path = release_yaml.with_name(f".profile-{tag}.yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class Utilization:
    """NVML's GPU utilization (% of time a kernel ran), sampled on a thread."""

    def __init__(self, period: float = 0.2) -> None:
        self.samples: list[tuple[float, int]] = []
        self.period = period
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML: no samples, and the report says so
            return
        while not self.stop.wait(self.period):
            self.samples.append((time.perf_counter(), pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

    def mean(self, start: float, end: float) -> float | None:
        values = [u for t, u in self.samples if start <= t <= end]
        return round(sum(values) / len(values), 1) if values else None

    def __enter__(self) -> Utilization:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


class BatchesWrapper:
    """llm-compressor's batch iterator (`pipeline._get_batches`) wrapped for this process while
    in the `with` block: each pass over the calibration samples goes through `pass_(desc,
    batches)`, which yields that pass's batches (`desc`: the pass's progress-bar text, e.g.
    "(2/2): Calibrating")."""

    def __enter__(self) -> Any:
        from llmcompressor.pipelines.sequential import pipeline

        self.module, self.stock = pipeline, pipeline._get_batches

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            desc = args[3] if len(args) > 3 else kwargs.get("desc", "")
            yield from self.pass_(desc, self.stock(*args, **kwargs))

        pipeline._get_batches = wrapped
        return self

    def __exit__(self, *exc: Any) -> None:
        self.module._get_batches = self.stock

    def pass_(self, desc: str, batches: Any) -> Any:
        yield from batches


class PassClock(BatchesWrapper):
    """The sequential pipeline's passes over the calibration samples, timed: each layer's
    calibration pass (AWQ's statistics) and propagation pass (its outputs for the next layer),
    from the first batch to the last one's end (the GPU synchronized). `start_s`: when each pass
    began, from the clock's start, so the time between passes (the smoothing, the engine's work
    between a propagation pass and the next calibration pass) reads off the record."""

    def __init__(self, origin: float | None = None) -> None:
        self.passes: list[dict[str, Any]] = []
        self.t0 = time.perf_counter() if origin is None else origin  # start_s counts from here

    def pass_(self, desc: str, batches: Any) -> Any:
        import torch

        t = time.perf_counter()
        yield from batches
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.passes.append({"pass": desc, "s": round(time.perf_counter() - t, 3), "start_s": round(t - self.t0, 3)})


class OnePass(BatchesWrapper):
    """A wrapper that acts on subgraph K's calibration pass only (the first such pass): `watch`
    yields its batches; every other pass goes through untouched."""

    def __init__(self, subgraph: int) -> None:
        self.prefix = f"({subgraph}/"
        self.ran = False

    def pass_(self, desc: str, batches: Any) -> Any:
        if self.ran or not (desc.startswith(self.prefix) and "Calibrating" in desc):
            yield from batches
            return
        self.ran = True
        yield from self.watch(batches)

    def watch(self, batches: Any) -> Any:
        yield from batches


class CalibratingWindow(OnePass):
    """torch.profiler over one subgraph's calibration pass only, from the pass's first batch to
    the end of its last (the GPU synchronized at both ends)."""

    def __init__(self, subgraph: int, stacks: bool = False) -> None:
        super().__init__(subgraph)
        self.stacks = stacks
        self.prof: Any = None
        self.wall_s = 0.0

    def watch(self, batches: Any) -> Any:
        import torch
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
        self.prof = torch_profile(activities=activities, with_stack=self.stacks)
        self.prof.start()
        t = time.perf_counter()
        yield from batches
        if cuda:
            torch.cuda.synchronize()
        self.wall_s = time.perf_counter() - t
        self.prof.stop()


class SyncSites(OnePass):
    """Where the host waits for the GPU in one subgraph's calibration pass: torch's sync debug
    mode (`torch.cuda.set_sync_debug_mode("warn")`) on from that pass's first batch to its last,
    each synchronizing call counted by its Python call site (the first frames outside torch).
    A wait leaves the GPU idle until the host has issued the next kernels."""

    def __init__(self, subgraph: int) -> None:
        super().__init__(subgraph)
        self.sites: dict[str, int] = {}
        self.skipped: str | None = None  # why nothing was counted

    def _note(self, message: Any, *args: Any, **kwargs: Any) -> None:
        import traceback

        if "synchroniz" not in str(message):
            return self.show(message, *args, **kwargs)
        frames = [
            f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename and "warnings" not in f.filename
        ]
        site = " < ".join(
            f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-3:])
        )
        self.sites[site] = self.sites.get(site, 0) + 1
        return None

    def watch(self, batches: Any) -> Any:
        import warnings

        import torch

        if not torch.cuda.is_available():  # nothing to wait for
            self.skipped = "no CUDA device: the host waits for no GPU"
            yield from batches
            return
        filters, self.show = warnings.filters[:], warnings.showwarning
        warnings.simplefilter("always")
        warnings.showwarning = self._note
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield from batches
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self.show
            warnings.filters[:] = filters

    def top(self, n: int = 20) -> list[dict[str, Any]]:
        rows = sorted(self.sites.items(), key=lambda kv: -kv[1])[:n]
        return [{"site": k, "waits": v} for k, v in rows]


class H2DSources:
    """Where the host-to-device copies from unpinned (pageable) memory come from: wraps
    `Tensor.to`, `Tensor.cuda` and `Tensor.copy_` while a calibration runs and counts, per call
    site (the first frame outside torch), the copies of a CPU tensor that is not pinned to a
    CUDA device, with their bytes and a few shapes."""

    def __init__(self) -> None:
        self.sites: dict[str, dict[str, Any]] = {}

    def _note(self, src: Any, dst_cuda: bool) -> None:
        import traceback

        if not dst_cuda or not hasattr(src, "is_pinned") or src.device.type != "cpu" or src.is_pinned():
            return
        site = "?"
        for frame in reversed(traceback.extract_stack(limit=14)[:-2]):
            if "/torch/" not in frame.filename:
                site = f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno} {frame.name}"
                break
        s = self.sites.setdefault(site, {"copies": 0, "gib": 0.0, "shapes": []})
        s["copies"] += 1
        s["gib"] += src.numel() * src.element_size() / 2**30
        if len(s["shapes"]) < 3 and list(src.shape) not in s["shapes"]:
            s["shapes"].append(list(src.shape))

    def __enter__(self) -> H2DSources:
        import torch

        self.saved = {n: getattr(torch.Tensor, n) for n in ("to", "cuda", "copy_")}
        to, cuda, copy_ = self.saved["to"], self.saved["cuda"], self.saved["copy_"]
        note = self._note

        def wrapped_to(t: Any, *args: Any, **kwargs: Any) -> Any:
            out = to(t, *args, **kwargs)
            if out is not t:
                note(t, out.device.type == "cuda")
            return out

        def wrapped_cuda(t: Any, *args: Any, **kwargs: Any) -> Any:
            note(t, True)
            return cuda(t, *args, **kwargs)

        def wrapped_copy(t: Any, src: Any, *args: Any, **kwargs: Any) -> Any:
            note(src, t.device.type == "cuda")
            return copy_(t, src, *args, **kwargs)

        torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.copy_ = wrapped_to, wrapped_cuda, wrapped_copy
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)

    def top(self, n: int = 15) -> list[dict[str, Any]]:
        rows = sorted(self.sites.items(), key=lambda kv: -kv[1]["gib"])[:n]
        return [{"site": k, "copies": v["copies"], "gib": round(v["gib"], 3), "shapes": v["shapes"]} for k, v in rows]


def engine_settings(items: list[str]) -> dict[str, Any]:
    """`--engine KEY=VALUE` as ScaleOptions fields (VALUE read as YAML; a list becomes a tuple):
    engine options a release config does not set, for a side-by-side in one tree."""
    import dataclasses

    import yaml

    from release.awq import ScaleOptions

    names = {f.name for f in dataclasses.fields(ScaleOptions)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in names:
            raise SystemExit(f"--engine {item!r}: expected KEY=VALUE with KEY one of {sorted(names)}")
        value = yaml.safe_load(raw)
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def run(
    config: Path,
    profile: bool,
    tables: Path | None,
    scales: Path | None = None,
    h2d: bool = False,
    one_pass: bool = False,
    calibrating: int = 0,
    stacks: bool = False,
    syncs: bool = False,
    engine_options: list[str] = (),
) -> dict[str, Any]:
    """One calibration of the config's first branch in this process (with `scales`, every
    chosen scale vector saved there as a dict of tensors); `one_pass`: the config's other
    branches smoothed beside it in the same pass, as `build-all` does (their stores in a scratch
    folder under the config's output_dir, removed after)."""
    import dataclasses
    import shutil
    import tempfile

    import torch

    from release.awq import ScaleOptions, SideBranch
    from release.awq.stats import ENGINE_COUNTERS
    from release.build.branch_folder import prepare_branch
    from release.build.calibrate import calibrate as calibrate_pass
    from release.config import load_config

    cfg = load_config(config)
    branch = cfg.branches[0]
    job = prepare_branch(cfg, branch)
    overrides = engine_settings(engine_options)  # --engine KEY=VALUE, read once
    options = dataclasses.replace(ScaleOptions.from_spec(cfg.awq), record_scales=scales is not None, **overrides)
    ends: list[float] = []
    stores: Path | None = None
    side: tuple[SideBranch, ...] = ()
    if one_pass:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        stores = Path(tempfile.mkdtemp(prefix=".profile-pass-", dir=cfg.output_dir))
        side = tuple(
            SideBranch(b.name, b.group_size, stores / b.name, prepare_branch(cfg, b).recipe) for b in cfg.branches[1:]
        )

    def calibrate(job: Any, echo: Any, options: Any) -> Any:
        try:
            return calibrate_pass(job, echo, options, side)
        finally:
            if stores is not None:
                shutil.rmtree(stores, ignore_errors=True)

    def echo(line: str) -> None:  # calibrate says "[branch] layer k/N: ..." as each layer ends
        if re.search(r"\] layer \d+/\d+:", line):
            ends.append(time.perf_counter())
        print(line, file=sys.stderr, flush=True)

    out: dict[str, Any] = {
        "samples": cfg.calibration.num_samples,
        "seq": cfg.calibration.max_seq_length,
        "pass": [branch.name, *(b.name for b in side)],  # the first propagates; the others are side branches
    }
    t0 = time.perf_counter()
    if profile and calibrating:
        with CalibratingWindow(calibrating, stacks) as window:
            result = calibrate(job, echo, options)
        if window.prof is None:
            raise SystemExit(f"no calibration pass of subgraph {calibrating} ran")
        out["window"] = f"subgraph {calibrating}'s calibration pass"
        out.update(profile_figures(window.prof, window.wall_s, tables, stacks))
        layers = [{"calib_s": r.calib_s, "smooth_s": r.smooth_s} for r in result.stats.layers]
    elif profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            result = calibrate(job, echo, options)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.update(profile_figures(prof, time.perf_counter() - t0, tables))
        layers = [{"calib_s": r.calib_s, "smooth_s": r.smooth_s} for r in result.stats.layers]
    elif syncs:
        subgraph = calibrating or 2
        with SyncSites(subgraph) as sites:
            result = calibrate(job, echo, options)
        out["window"] = f"subgraph {subgraph}'s calibration pass"
        if not sites.ran:
            raise SystemExit(f"no calibration pass of subgraph {subgraph} ran")
        if sites.skipped:
            out["sync_sites"] = f"skipped: {sites.skipped}"
        else:
            out["sync_sites"] = sites.top()
            out["syncs_total"] = sum(sites.sites.values())
        layers = [{"calib_s": r.calib_s, "smooth_s": r.smooth_s} for r in result.stats.layers]
    elif h2d:
        with H2DSources() as sources:
            result = calibrate(job, echo, options)
        out["h2d_pageable_sources"] = sources.top()
        layers = [{"calib_s": r.calib_s, "smooth_s": r.smooth_s} for r in result.stats.layers]
    else:
        with Utilization() as util, PassClock(t0) as clock, CopiesSampler() as sampler:
            result = calibrate(job, echo, options)
        out["passes"] = clock.passes
        # where the main thread was while onload-ahead's helper copied (thread_sampler.py)
        # (how long the copies ran is onload_ahead's copy_s)
        out["main_thread_during_copies"] = {"samples": sampler.samples, "sites": sampler.top()}
        layers = []
        for r, end in zip(result.stats.layers, ends):
            smooth_start = end - r.smooth_s
            layers.append(
                {
                    "mappings": r.mappings,
                    "calib_s": r.calib_s,
                    "smooth_s": r.smooth_s,
                    "side_s": r.side_s,
                    "peak_gpu_gib": r.peak_gpu_gib,
                    "gpu_util_calib_pct": util.mean(smooth_start - r.calib_s, smooth_start),
                    "gpu_util_smooth_pct": util.mean(smooth_start, end),
                }
            )
        out["nvml_samples"] = len(util.samples)
        out["mapping_s"] = {k: round(v, 2) for k, v in result.stats.mapping_s.items()}
        out["search_phase_s"] = result.stats.to_json()["search_phase_s"]
    engine = result.stats.to_json()
    out["engine"] = {k: engine[k] for k in ENGINE_COUNTERS}
    if engine.get("onload_ahead_counts"):  # release/awq/read_ahead.py: the next layer's weights onloaded ahead
        ahead = dict(engine["onload_ahead_counts"])
        # when `after` and the helper's copies ran, from the run's start, as the passes' start_s
        ahead["spans"] = [(kind, round(a - t0, 3), round(b - t0, 3)) for kind, a, b in ahead.get("spans", [])]
        out["onload_ahead"] = ahead
    out["resident_cache"] = engine.get("resident_cache")  # caches.py, dedup.py: what stayed on the GPU, stored once
    out["gpu_kernels"] = engine.get("gpu_kernels")  # kernels.py's choices, and the Gram sums by the GEMM (caches.py)
    if engine.get("side_grid"):  # one pass: the side branches' grid searches (release/awq/grid.py)
        out["side_grid"] = engine["side_grid"]
    out["awq"] = cfg.awq.model_dump()
    # the --engine overrides (session 37's records lacked them: their variant is only in the file names)
    out["engine_options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    if scales is not None:
        torch.save(result.stats.scales, scales)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["oneshot_s"] = result.timings["oneshot"]
    out["load_s"] = result.timings["load"]
    out["layers"] = layers
    out["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return out


def by_stack(prof: Any, n: int = 30, depth: int = 6) -> dict[str, list[dict[str, Any]]]:
    """The operators by their callers (a profile taken `with_stack`): the top `n` by their own
    GPU time and by their own host time (a synchronization's wait is host time), each with its
    first `depth` callers outside torch, innermost first: the operator that called it (where one
    did before any Python function), then Python functions (the profiler names a function by
    the line it starts on)."""
    import re

    python = re.compile(r"\.py\(\d+\): ")
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for e in prof.events():
        if e.device_type.name != "CPU" or python.search(e.name) or e.name.startswith("<built-in"):
            continue
        stack: list[str] = []
        parent = e.cpu_parent
        while parent is not None and len(stack) < depth:
            name = parent.name
            if python.search(name):
                if "torch/" not in name and "<frozen" not in name:
                    stack.append(name)
            elif not stack:  # the operator that called it, if before any Python function
                stack.append(f"op {name}")
            parent = parent.cpu_parent
        key = (e.name, *stack)
        g = groups.setdefault(key, {"op": e.name, "calls": 0, "gpu_us": 0.0, "cpu_us": 0.0, "stack": stack})
        g["calls"] += 1
        g["gpu_us"] += e.self_device_time_total
        g["cpu_us"] += e.self_cpu_time_total

    def rows(field: str) -> list[dict[str, Any]]:
        top = sorted(groups.values(), key=lambda g: -g[field])[:n]
        return [
            {
                "op": g["op"],
                "calls": g["calls"],
                "gpu_s": round(g["gpu_us"] / 1e6, 3),
                "cpu_s": round(g["cpu_us"] / 1e6, 3),
                "stack": g["stack"],
            }
            for g in top
        ]

    return {"by_gpu": rows("gpu_us"), "by_cpu": rows("cpu_us")}


def profile_figures(prof: Any, wall_s: float, tables: Path | None, stacks: bool = False) -> dict[str, Any]:
    """The profile's totals and top entries (and, with `tables`, torch's own tables as text);
    `stacks` (a profile taken `with_stack`): the operators by their callers (`by_stack`)."""
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    kernel_s = sum(e.self_device_time_total for e in kernels) / 1e6
    copies: dict[str, dict[str, float]] = {}
    for e in kernels:
        if e.key.startswith("Memcpy") or e.key.startswith("Memset"):
            c = copies.setdefault(e.key, {"calls": 0, "s": 0.0})
            c["calls"] += e.count
            c["s"] += e.self_device_time_total / 1e6
    top_kernels = sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]
    cpu_ops = [e for e in events if e.device_type.name == "CPU"]
    top_calls = sorted(cpu_ops, key=lambda e: -e.count)[:25]
    top_cpu = sorted(cpu_ops, key=lambda e: -e.self_cpu_time_total)[:25]
    if tables is not None:
        text = [
            f"wall {wall_s:.1f} s, GPU kernels {kernel_s:.1f} s ({100 * kernel_s / wall_s:.0f} % of the wall)",
            "",
            "== by GPU time ==",
            events.table(sort_by="self_cuda_time_total", row_limit=40),
            "== by CPU time ==",
            events.table(sort_by="self_cpu_time_total", row_limit=40),
        ]
        tables.write_text("\n".join(text))
    figures: dict[str, Any] = {"by_stack": by_stack(prof)} if stacks else {}
    return figures | {
        "profiled_wall_s": round(wall_s, 1),
        "kernel_s": round(kernel_s, 2),
        "kernel_share_of_wall": round(kernel_s / wall_s, 3),
        "copies": {k: {"calls": v["calls"], "s": round(v["s"], 3)} for k, v in copies.items()},
        "top_kernels": [
            {"name": e.key[:120], "calls": e.count, "s": round(e.self_device_time_total / 1e6, 3)} for e in top_kernels
        ],
        "top_ops_by_calls": [
            {"name": e.key, "calls": e.count, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3)} for e in top_calls
        ],
        "top_ops_by_cpu": [
            {"name": e.key, "calls": e.count, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3)} for e in top_cpu
        ],
    }


def compare_scales(a: Path, b: Path) -> dict[str, Any]:
    """Two runs' chosen scales, per kind of mapping: how many are equal, how many within 0.1 %,
    the lowest cosine similarity and the largest relative difference."""
    import torch

    from release.awq.stats import mapping_kind

    x, y = torch.load(a), torch.load(b)
    if x.keys() != y.keys():
        raise SystemExit(f"the runs smoothed different mappings: {sorted(set(x) ^ set(y))[:5]}")
    kinds: dict[str, dict[str, Any]] = {}
    for name in x:
        u, v = x[name].float(), y[name].float()
        k = kinds.setdefault(
            mapping_kind(name), {"mappings": 0, "equal": 0, "within_0.1%": 0, "min_cosine": 1.0, "max_rel": 0.0}
        )
        rel = ((u - v).abs() / u.abs().clamp_min(1e-12)).max().item()
        k["mappings"] += 1
        k["equal"] += bool(torch.equal(u, v))
        k["within_0.1%"] += rel <= 1e-3
        k["min_cosine"] = round(min(k["min_cosine"], torch.nn.functional.cosine_similarity(u, v, dim=0).item()), 6)
        k["max_rel"] = round(max(k["max_rel"], rel), 6)
    return kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None, help="release.yaml from benchmarks.synthetic")
    ap.add_argument("--samples", type=int, default=512, help="the unprofiled run's calibration samples (0: skip)")
    ap.add_argument("--profile-samples", type=int, default=64, help="the profiled run's samples (0: skip)")
    ap.add_argument(
        "--h2d-samples",
        type=int,
        default=0,
        help="a run at N samples counting pageable host-to-device copies by call site",
    )
    ap.add_argument(
        "--profile-calibrating",
        type=int,
        default=0,
        metavar="K",
        help="profile only subgraph K's calibration pass (1-based)",
    )
    ap.add_argument(
        "--stacks",
        action="store_true",
        help="with --profile-calibrating: the operators by their callers (slower)",
    )
    ap.add_argument(
        "--sync-samples",
        type=int,
        default=0,
        help="a run at N samples counting the host's waits for the GPU by call site, in subgraph "
        "--profile-calibrating's calibration pass (2 where not given)",
    )
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--tables", type=Path, default=None, help="torch.profiler's own tables, as text")
    ap.add_argument("--awq", action="append", default=[], metavar="KEY=VALUE", help="an awq: setting for both runs")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a ScaleOptions field for both runs (one the config has no key for, e.g. onload_ahead=[])",
    )
    ap.add_argument("--scales", type=Path, default=None, help="the timed run's chosen scales, saved (torch.save)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="two --scales files: agreement")
    ap.add_argument(
        "--one-pass",
        action="store_true",
        help="smooth the config's other branches beside the first in the same pass (build-all's one pass)",
    )
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.compare:
        print(json.dumps(compare_scales(*a.compare), indent=1))
        return
    if a.child:
        mode = a.child[1]
        record = run(
            Path(a.child[0]),
            mode == "profile",
            a.tables,
            a.scales if mode == "timed" else None,
            mode == "h2d",
            a.one_pass,
            a.profile_calibrating,
            a.stacks,
            mode == "syncs",
            a.engine,
        )
        print("RECORD " + json.dumps(record), flush=True)
        return
    if a.config is None:
        ap.error("--config is required")
    engine_settings(a.engine)  # a bad KEY=VALUE fails here, before any child loads the model
    records = {}
    runs = (("syncs", a.sync_samples), ("h2d", a.h2d_samples), ("profile", a.profile_samples), ("timed", a.samples))
    for mode, n in runs:  # short first
        if not n:
            continue
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.profile_layer",
            "--child",
            str(_config(a.config, n, a.seq, a.awq, a.sets)),
            mode,
        ]
        if a.tables is not None and mode == "profile":
            cmd += ["--tables", str(a.tables)]
        if a.scales is not None and mode == "timed":
            cmd += ["--scales", str(a.scales)]
        if a.one_pass:
            cmd += ["--one-pass"]
        if a.profile_calibrating and mode in ("syncs", "profile"):
            cmd += ["--profile-calibrating", str(a.profile_calibrating)]
        if a.stacks and mode == "profile":
            cmd += ["--stacks"]
        for item in a.engine:
            cmd += ["--engine", item]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RECORD ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-3000:] + proc.stderr[-5000:], file=sys.stderr)
            records[mode] = {"failed": proc.returncode}
            continue
        records[mode] = json.loads(lines[-1][len("RECORD ") :])
        print(f"== {mode} ({n} samples) ==\n" + json.dumps(records[mode], indent=1), flush=True)
        if a.json is not None:  # after each run: a cut call keeps what finished
            a.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
