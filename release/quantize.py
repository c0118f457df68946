"""Quantize one branch: MoE-aware AWQ + W4A16 with llm-compressor, saved as compressed-tensors.

The pipeline of `quantize_branch`, in order: resolve and validate the base model, pick and
tokenize the calibration set, load and linearize the experts, run `oneshot` with the branch's
rendered recipe while counting expert coverage, save compressed, carry the MTP layer over,
write recipe/provenance/coverage, then move the finished folder into place.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import __version__, distributed
from .architecture import Glm4MoeArch
from .awq import ScaleOptions, ScaleStats, SideBranch
from .build_log import write_build_log
from .config import BranchSpec, ReleaseConfig
from .console import load_report
from .coverage import ExpertCounts
from .errors import ReleaseError
from .manifest import CACHE_DIR, first_change, sealed_changes, write_manifest
from .owned import create_owned, made_by_glmrel, remove_owned, require_replaceable, require_writable_folder
from .recipe import render_recipe

log = logging.getLogger(__name__)
Log = Callable[[str], None]

PROVENANCE_FILE = "provenance.json"
COVERAGE_FILE = "expert_coverage.json"
RECIPE_FILE = "recipe.yaml"
PROVENANCE_SCHEMA = 1
LAST_SCALE_STATS: list[ScaleStats | None] = [None]  # the most recent oneshot's AWQ records (tests, benchmarks)


@dataclass(frozen=True)
class BranchBuild:
    branch: str
    path: Path
    skipped: bool
    seconds: float
    inputs_fingerprint: str
    calibrated_by: str | None = None  # a side branch of one pass: the branch whose pass calibrated it

    @property
    def outcome(self) -> str:
        """What happened to the branch, in a few words (the CLI's and build-all's lines)."""
        if self.skipped:
            return "up to date, skipped"
        if self.calibrated_by:
            return f"built in {self.seconds:.0f}s after {self.calibrated_by}'s calibration pass"
        return f"built in {self.seconds:.0f}s"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def resolve_base_model(cfg: ReleaseConfig) -> Path:
    """A local folder holding the base model (downloaded from the Hub when given an id)."""
    spec = cfg.base_model
    if spec.path is not None:
        if not spec.path.is_dir():
            raise ReleaseError(
                f"base model folder {spec.path} does not exist",
                hint="set base_model.path to a model folder, or run `make demo` to build the demo model",
            )
        return spec.path
    from huggingface_hub import snapshot_download

    assert spec.hub_id is not None  # the config requires path or hub_id
    try:
        return Path(snapshot_download(spec.hub_id, revision=spec.revision, allow_patterns=None))
    except Exception as e:
        raise ReleaseError(
            f"could not download {spec.hub_id}@{spec.revision}: {e}",
            hint="check network access and HF_TOKEN, or download it and set base_model.path",
        ) from e


def base_model_fingerprint(model_dir: Path) -> str:
    """Identity of the base weights without reading them: config, tokenizer and every
    safetensors header (names, dtypes, shapes, offsets) with each file's size."""
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.suffix == ".safetensors":
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(f.name.encode() + str(f.stat().st_size).encode() + fh.read(min(n, 1 << 28)))
        elif f.name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def inputs_fingerprint(
    cfg: ReleaseConfig,
    branch: BranchSpec,
    recipe_text: str,
    base_fp: str,
    calib_fp: str,
) -> str:
    payload: dict[str, Any] = {
        "tool": __version__,
        "branch": branch.model_dump(mode="json"),
        "calibration": cfg.calibration.model_dump(mode="json", exclude={"path"}),
        "calibration_data": calib_fp,
        "awq": cfg.awq.model_dump(mode="json"),
        "dtype": cfg.dtype,
        "recipe": recipe_text,
        "base_model": base_fp,
        "libraries": library_versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def pass_fingerprint(fingerprint: str, calibration_pass: list[str] | None) -> str:
    """The fingerprint of a branch made by a calibration pass shared with others: its own
    inputs' (`inputs_fingerprint`) and the pass's branches, the first propagating. A pass of
    the branch alone (or none) is its own fingerprint."""
    if not calibration_pass or len(calibration_pass) < 2:
        return fingerprint
    payload = {"inputs": fingerprint, "calibration_pass": list(calibration_pass)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def calibration_fingerprint(cfg: ReleaseConfig) -> str:
    spec = cfg.calibration
    if spec.path is not None:
        if not spec.path.is_file():
            raise ReleaseError(
                f"calibration file {spec.path} does not exist", hint="set calibration.path to a .jsonl or .parquet file"
            )
        return hashlib.sha256(spec.path.read_bytes()).hexdigest()
    return f"{spec.dataset}@{spec.revision or 'unpinned'}:{spec.split}"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("llmcompressor", "compressed-tensors", "transformers", "torch", "datasets", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def resource_peaks() -> dict[str, float]:
    """Peak host RSS of this process and, on a GPU, peak allocated device memory (GiB)."""
    import resource

    import torch

    peaks = {"peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if torch.cuda.is_available():
        peaks["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        peaks["gpu"] = torch.cuda.get_device_name()  # type: ignore[assignment]
    return peaks


def project_commit() -> dict[str, Any]:
    try:
        import git

        repo = git.Repo(Path(__file__).resolve().parent.parent, search_parent_directories=False)
        return {"commit": repo.head.commit.hexsha, "dirty": repo.is_dirty(untracked_files=False)}
    except Exception as e:  # not a git checkout (e.g. installed from a wheel)
        return {"commit": None, "dirty": None, "note": type(e).__name__}


def prepare_branch(cfg: ReleaseConfig, branch: BranchSpec) -> tuple[Path, Glm4MoeArch, str, str]:
    """Everything that can fail fast, before torch is imported: model folder, architecture,
    group size, recipe. Returns (base_dir, arch, recipe_text, inputs_fingerprint); a branch
    made by a pass shared with others has `pass_fingerprint` of it."""
    base_dir = resolve_base_model(cfg)
    arch = Glm4MoeArch.from_dir(base_dir)
    arch.check_group_size(branch.group_size, branch.name)
    if not any(base_dir.glob("*.safetensors")):
        raise ReleaseError(
            f"{base_dir} holds no *.safetensors weights", hint="glmrel reads safetensors checkpoints only"
        )
    recipe_text = render_recipe(cfg.recipe, arch, branch, cfg.awq)
    fp = inputs_fingerprint(cfg, branch, recipe_text, base_model_fingerprint(base_dir), calibration_fingerprint(cfg))
    return base_dir, arch, recipe_text, fp


def recorded_pass(out_dir: Path) -> list[str] | None:
    """The branches of the calibration pass that built `out_dir` (its provenance), if recorded."""
    try:
        value = json.loads((out_dir / PROVENANCE_FILE).read_text()).get("calibration_pass", {}).get("branches")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return [str(n) for n in value] if isinstance(value, list) and value else None


def up_to_date(
    cfg: ReleaseConfig,
    branch: BranchSpec,
    fingerprint: str,
    calibration_pass: list[str] | None = None,
    echo: Log | None = None,
) -> bool:
    """`built_from` these inputs, and its content still what was sealed (its manifest): a
    branch whose files changed afterwards is rebuilt, never approved again; `echo` says why."""
    if not built_from(cfg, branch, fingerprint, calibration_pass):
        return False
    changes = sealed_changes(cfg.output_dir / branch.name)
    if changes and echo is not None:
        echo(f"[{branch.name}] {first_change(changes)} since it was built: rebuilding it")
    return not changes


def built_from(
    cfg: ReleaseConfig, branch: BranchSpec, fingerprint: str, calibration_pass: list[str] | None = None
) -> bool:
    """The branch's folder was built from these inputs (`fingerprint`: the branch's own, from
    `prepare_branch`): by the pass asked for now (`calibration_pass`; none: the branch alone),
    or by the pass its provenance records (built with the others by `build-all`, or alone)
    while all of that pass's branches are still in the config. Either way nothing it was built
    from has changed, so `quantize --branch X` after `build-all` does not rebuild X."""
    out_dir = cfg.output_dir / branch.name
    if branch_is_current(out_dir, pass_fingerprint(fingerprint, calibration_pass)):
        return True
    recorded = recorded_pass(out_dir)
    names = {b.name for b in cfg.branches}
    if not recorded or branch.name not in recorded or not set(recorded) <= names:
        return False
    return branch_is_current(out_dir, pass_fingerprint(fingerprint, recorded))


def branch_is_current(out_dir: Path, fingerprint: str) -> bool:
    prov = out_dir / PROVENANCE_FILE
    if not prov.is_file():
        return False
    try:
        return json.loads(prov.read_text()).get("inputs_fingerprint") == fingerprint
    except (OSError, json.JSONDecodeError):
        return False


def _owner_pid() -> int:
    """The process whose life a temporary branch folder belongs to: this one, or under torchrun
    the launcher agent that all local ranks share."""
    return os.getppid() if distributed.in_worker() else os.getpid()


def partial_folder(output_dir: Path, branch: str, kind: str = "partial") -> Path:
    """`.<branch>.<kind>-<pid>@<host>`: named by its owner, so a later run can tell whether
    the process that left it is gone."""
    return output_dir / f".{branch}.{kind}-{_owner_pid()}@{socket.gethostname()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def remove_stale_partials(output_dir: Path, branch: str, echo: Log = print) -> list[Path]:
    """Remove the temporary folders of `branch` that a killed run left (`.partial-` and
    `.old-` of a process on this host that no longer exists, holding glmrel's marker) and say
    so; a folder of a live process, of another host, or that glmrel did not create is left
    alone and named."""
    removed: list[Path] = []
    if not output_dir.is_dir():
        return removed
    pattern = re.compile(rf"^\.{re.escape(branch)}\.(partial|old)-(\d+)(?:@(.+))?$")
    host = socket.gethostname()
    for p in sorted(output_dir.iterdir()):
        m = pattern.match(p.name)
        if not m or p.is_symlink() or not p.is_dir():
            continue
        pid, owner_host = int(m[2]), m[3] or host
        if not made_by_glmrel(p):
            echo(f"[{branch}] leaving {p.name}: glmrel did not create it")
        elif owner_host != host:
            echo(f"[{branch}] leaving {p.name}: it belongs to a process on {owner_host}")
        elif pid == _owner_pid() or _alive(pid):
            echo(f"[{branch}] leaving {p.name}: process {pid} is still running (another build of this branch?)")
        else:
            size = _folder_bytes(p)
            remove_owned(p)
            removed.append(p)
            echo(f"[{branch}] removed {p.name} ({size / 2**30:.2f} GiB), left by process {pid}, which is gone")
    return removed


def quantize_branch(
    cfg: ReleaseConfig,
    branch_name: str,
    *,
    force: bool = False,
    echo: Log = print,
    scale_options: ScaleOptions | None = None,
) -> BranchBuild:
    """Build one branch into `<output_dir>/<branch>`; skip it when its inputs are unchanged.
    `scale_options` overrides the AWQ patches the config's `awq` section chooses (tests)."""
    branch = cfg.branch(branch_name)
    out_dir = cfg.output_dir / branch.name
    t_start = time.time()
    base_dir, arch, recipe_text, fingerprint = prepare_branch(cfg, branch)
    if distributed.rank() == 0:
        remove_stale_partials(cfg.output_dir, branch.name, echo)
    if not force and up_to_date(cfg, branch, fingerprint, echo=echo):
        return BranchBuild(branch.name, out_dir, True, 0.0, fingerprint)

    if not distributed.in_worker():  # the launcher checked for the ranks (quantize_on_gpus)
        require_writable_folder(cfg.output_dir, "output_dir")
        require_replaceable(out_dir, branch.name)
        check_branch_room(cfg, branch, base_dir, arch)
    # llm-compressor's save compresses the model across ranks (only rank 0 writes), so under
    # torchrun every rank calls it with the same folder: named by the launcher they share.
    tmp = partial_folder(cfg.output_dir, branch.name)
    if distributed.in_worker():
        distributed.init()
        if distributed.rank() != 0:  # calibrate its share of the samples; rank 0 writes the branch
            run = calibrate(cfg, branch, base_dir, arch, recipe_text, lambda s: None, scale_options)
            run.model.save_pretrained(tmp, save_compressed=True, max_shard_size=SHARD_SIZE)
            distributed.barrier_and_close()
            return BranchBuild(branch.name, out_dir, False, round(time.time() - t_start, 1), fingerprint)
    create_owned(tmp, f"building {branch.name}")
    failed = True
    try:
        timings, _run = _run_oneshot(cfg, branch, base_dir, arch, recipe_text, tmp, echo, scale_options)
        seal_folder(cfg, branch, base_dir, arch, tmp, out_dir, fingerprint, timings, [branch.name])
        failed = False
    finally:
        remove_owned(tmp, echo)
        if not failed:  # after an error the other ranks may wait in a collective: no barrier, or both hang
            distributed.barrier_and_close()
        if cfg.offload.cpu_gib is not None:  # every rank is done with the offloaded weights
            forget_offload(offload_folder(cfg))
    return BranchBuild(branch.name, out_dir, False, round(time.time() - t_start, 1), fingerprint)


def check_branch_room(cfg: ReleaseConfig, branch: BranchSpec, base_dir: Path, arch: Glm4MoeArch) -> None:
    """Refuse a build whose branch cannot fit in `output_dir`, before any work."""
    from . import room

    need = room.branch_bytes(base_dir, arch, cfg.dtype, branch.group_size)
    room.check_room(
        f"building {branch.name}",
        [(cfg.output_dir, need, branch.name)],
        hint="free space there, or set output_dir to a disk with room",
    )


def seal_folder(
    cfg: ReleaseConfig,
    branch: BranchSpec,
    base_dir: Path,
    arch: Glm4MoeArch,
    tmp: Path,
    out_dir: Path,
    fingerprint: str,
    timings: dict[str, Any],
    calibration_pass: list[str],
) -> None:
    """A built branch's records (provenance.json, manifest.json) into `tmp`, then `tmp` swapped
    in as `out_dir`: an interrupted run leaves a hidden .partial, never a branch."""
    provenance = {
        "schema": PROVENANCE_SCHEMA,
        "tool": {"name": "glmrel", "version": __version__, **project_commit()},
        "libraries": library_versions(),
        "release": cfg.name,
        "branch": branch.model_dump(mode="json"),
        "base_model": {
            # an id, not this machine's path: the same inputs give the same bytes anywhere
            "id": cfg.base_model.card_base_model or Path(cfg.base_model.display_id).name,
            "revision": cfg.base_model.revision,
            "fingerprint": base_model_fingerprint(base_dir),
            "architecture": asdict(arch),
        },
        "calibration": json.loads((tmp / ".calibration.json").read_text()),
        "moe_calibrate_all_experts": cfg.calibration.moe_calibrate_all_experts,
        "awq": cfg.awq.model_dump(mode="json"),
        "awq_engine": engine_description(timings),
        # every branch of one pass: the first is the one whose smoothed layers fed the next layers
        "calibration_pass": {"branches": list(calibration_pass), "propagated_through": calibration_pass[0]},
        "dtype": cfg.dtype,
        "offload_cpu_gib": cfg.offload.cpu_gib,  # how, not what: the same weights either way (tested)
        "gpus": distributed.world_size(),
        "inputs_fingerprint": fingerprint,
    }
    (tmp / ".calibration.json").unlink()
    (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    write_manifest(tmp, branch.name)
    # how this run went (timings, peaks, the engine's counters) is local: the branch holds
    # only what its inputs decide, so a rebuild from the same inputs gives the same bytes
    write_build_log(cfg.output_dir, branch.name, "quantize", {"inputs_fingerprint": fingerprint, "timings_s": timings})
    if out_dir.exists() or out_dir.is_symlink():
        require_replaceable(out_dir, branch.name)
        old = partial_folder(cfg.output_dir, branch.name, "old")
        out_dir.rename(old)
        tmp.rename(out_dir)
        remove_owned(old)
    else:
        tmp.rename(out_dir)


def engine_description(timings: dict[str, Any]) -> dict[str, Any]:
    """The AWQ engine and its options, from a run's timings (a side branch's sit under its
    calibration pass): what the card states. The run's own counters stay in the build log."""
    engine = timings.get("awq_engine") or (timings.get("calibration_pass") or {}).get("awq_engine") or {}
    keys = {"engine", *ScaleOptions().to_json()}
    return {k: engine[k] for k in sorted(keys) if k in engine}


@dataclass
class Calibrated:
    """A model after `oneshot`, with what the run recorded."""

    model: Any
    tokenizer: Any
    timings: dict[str, Any]
    stats: ScaleStats
    counts: ExpertCounts
    calibration: Any  # CalibrationProvenance


def calibrate(
    cfg: ReleaseConfig,
    branch: BranchSpec,
    base_dir: Path,
    arch: Glm4MoeArch,
    recipe_text: str,
    echo: Log = print,
    options: ScaleOptions | None = None,
    side: tuple[SideBranch, ...] = (),
) -> Calibrated:
    """Load the base model, linearize its experts and run `oneshot` (AWQ + W4A16) on the
    release's calibration set, with the AWQ patches `options` (default: the config's).
    `side`: other group sizes this pass also smooths, layer by layer (release/awq/side.py)."""
    import torch
    from llmcompressor import oneshot
    from transformers import AutoTokenizer

    from .awq import scaled_awq
    from .calibration import build_calibration_set
    from .coverage import count_expert_tokens

    timings: dict[str, Any] = {}
    t = time.time()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    dataset, calib_prov = build_calibration_set(cfg.calibration, tokenizer)
    if distributed.world_size() > 1:  # this rank's share (see distributed.py for why not llm-compressor's)
        dataset = dataset.select(range(*distributed.partition(len(dataset))))
    timings["calibration_data"] = round(time.time() - t, 2)

    t = time.time()
    model = load_base_model(cfg, base_dir, branch.name, echo)
    timings["load"] = round(time.time() - t, 2)

    options = options or ScaleOptions.from_spec(cfg.awq)
    also = f"; in the same pass group {', '.join(str(b.group_size) for b in side)}" if side else ""
    echo(
        f"[{branch.name}] AWQ W4A16 group {branch.group_size}{also} on {len(dataset)} samples "
        f"(MoE-aware: {cfg.calibration.moe_calibrate_all_experts}; AWQ engine: {cfg.awq.engine})"
    )
    t = time.time()
    torch.manual_seed(cfg.calibration.seed)
    layers = arch.num_hidden_layers
    done = [0]

    def on_layer(record: Any) -> None:  # glmrel's own progress, a line per decoder layer
        done[0] += 1
        sides = f", {record.side_s:.1f}s for the other group sizes" if side else ""
        echo(
            f"[{branch.name}] layer {done[0]}/{layers}: calibration forward {record.calib_s:.1f}s, "
            f"smoothing {record.smooth_s:.1f}s{sides}"
        )

    with (
        scaled_awq(options, num_batches=len(dataset), side=side, on_layer=on_layer) as engine,
        count_expert_tokens(model, arch.n_routed_experts, calls_per_module=len(dataset)) as counts,
    ):
        oneshot(
            model=model,
            processor=tokenizer,  # type: ignore[arg-type]  # oneshot takes a tokenizer as its processor
            dataset=dataset,
            recipe=engine.recipe(recipe_text),  # AWQ as glmrel's MoeAWQModifier, bound to this run
            num_calibration_samples=len(dataset),
            max_seq_length=cfg.calibration.max_seq_length,
            shuffle_calibration_samples=False,  # the seeded choice above is the order
            moe_calibrate_all_experts=cfg.calibration.moe_calibrate_all_experts,
            pipeline="sequential",
        )
    timings["oneshot"] = round(time.time() - t, 2)
    scale_stats = engine.stats
    counts = distributed.sum_counts(counts)  # each rank counted its own samples
    timings["awq_engine"] = {"engine": cfg.awq.engine, **options.to_json(), **scale_stats.to_json()}
    LAST_SCALE_STATS[0] = scale_stats
    return Calibrated(model, tokenizer, timings, scale_stats, counts, calib_prov)


def load_base_model(cfg: ReleaseConfig, base_dir: Path, label: str, echo: Log = print) -> Any:
    """The base model as every build starts from it: loaded (offloaded past `offload.cpu_gib`),
    in eval mode, its experts linearized (per-expert Linears: what AWQ smooths, what gets
    quantized and saved)."""
    import torch
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import AutoModelForCausalLM

    echo(f"[{label}] loading {cfg.base_model.display_id}")
    dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    with load_report(Glm4MoeArch.from_dir(base_dir).mtp_layers, lambda s: echo(f"[{label}] {s}")):
        if cfg.offload.cpu_gib is None:
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
        else:
            model = load_offloaded(cfg, base_dir, dtype, echo=lambda s: echo(f"[{label}] {s}"))
    model.eval()
    linearize_moe(model)
    return model


# Shards of a saved branch: the size of GLM-4.7's own, and what bounds host RAM while saving a
# model whose weights are offloaded (transformers gathers one shard at a time; llm-compressor's
# default is 20 GB).
SHARD_SIZE = "5GB"


OFFLOAD = "offload"  # .offload.partial-<pid>@<host>: a build's offloaded base weights


def offload_root(cfg: ReleaseConfig) -> Path:
    """The folder `offload.folder` names (default: <output_dir>/.glmrel-cache): glmrel writes a
    sub-folder of its own there, never into the folder itself."""
    return cfg.offload.folder or cfg.output_dir / CACHE_DIR


def offload_folder(cfg: ReleaseConfig) -> Path:
    """Where `offload.cpu_gib` puts the weights that do not fit: a glmrel-owned folder under
    `offload_root`, removed after each branch."""
    return partial_folder(offload_root(cfg), OFFLOAD)


def load_offloaded(cfg: ReleaseConfig, base_dir: Path, dtype: Any, echo: Log = print) -> Any:
    """The base model with at most `offload.cpu_gib` of its weights in host RAM, the rest in
    safetensors files under `offload_folder` (compressed-tensors' disk offload, read back a
    tensor at a time when the sequential pipeline onloads a layer). Weights the checkpoint
    already holds are symlinked, not copied; the experts linearized after loading, and every
    weight AWQ smooths, are written there. Under torchrun, rank 0 loads and the ranks share
    its offload: one copy per node."""
    from compressed_tensors.offload import load_offloaded_model
    from transformers import AutoModelForCausalLM

    from .compat import patch_distributed_disk_update

    if distributed.world_size() > 1:
        patch_distributed_disk_update()
    folder = offload_folder(cfg)
    if distributed.rank() == 0:
        remove_stale_partials(offload_root(cfg), OFFLOAD, echo)  # what a killed run left
        create_owned(folder, "the offloaded base weights")
    distributed.barrier()
    cap = int(cfg.offload.cpu_gib * 2**30)  # type: ignore[operator]
    echo(f"offloading the base model's weights beyond {cfg.offload.cpu_gib:g} GiB of host RAM to {folder}")
    with load_offloaded_model():
        return AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=dtype, device_map="auto_offload", max_memory={"cpu": cap}, offload_folder=str(folder)
        )


def forget_offload(folder: Path) -> None:
    """Delete a branch's offloaded weights, and compressed-tensors' (class-wide) index of them."""
    from compressed_tensors.offload.cache.disk import DiskCache

    root = str(folder.resolve())
    for key in [k for k, info in DiskCache.index.items() if str(info["safetensors_file"]).startswith(root)]:
        del DiskCache.index[key]
    remove_owned(folder)


@contextmanager
def released_after_oneshot(echo: Log = print) -> Iterator[Callable[[Any], None]]:
    """Let the calibrated model go once the block ends (the branch is saved by then).

    llm-compressor 0.14.0.1 keeps it reachable after `oneshot` returns, so a second branch
    built in the same process holds two models (measured on one H200 at GLM-4.7 layer size:
    host RSS 20.3 -> 33.9 -> 46.7 GiB at the start of branches 1, 2, 3):
    - its session's `State` holds the model until the session is reset;
    - its sequential pipeline compiles each module's forward into new functions whose
      globals hold `self` (the model) and registers them with `torch.fx.wrap`, which keeps
      every registration in torch.fx's module-level `_wrapped_fns_to_patch` for good.
    The block resets the session and drops the registrations it added, then gives freed host
    memory back (PyTorch's pinned cache, glibc's heaps) and empties the CUDA cache. It yields
    `track(model)`: a model still referenced after the block is named in a warning."""
    import weakref

    import torch
    import torch.fx._symbolic_trace as fx_trace
    from llmcompressor.core import active_session

    from .awq import release_host_memory

    registered = set(fx_trace._wrapped_fns_to_patch)
    tracked: list[weakref.ref] = []
    try:
        yield lambda model: tracked.append(weakref.ref(model))
    finally:
        for key in set(fx_trace._wrapped_fns_to_patch) - registered:
            del fx_trace._wrapped_fns_to_patch[key]
        active_session().reset()
        gc.collect()
        release_host_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if any(ref() is not None for ref in tracked):
            echo(
                "warning: the calibrated model is still referenced after its branch was saved; "
                "host memory will grow by one model per branch in this process"
            )


def _run_oneshot(
    cfg: ReleaseConfig,
    branch: BranchSpec,
    base_dir: Path,
    arch: Glm4MoeArch,
    recipe_text: str,
    out: Path | None,
    echo: Log,
    options: ScaleOptions | None = None,
    side: tuple[SideBranch, ...] = (),
) -> tuple[dict[str, Any], Calibrated]:
    """Calibrate and save `branch` into `out` (None: calibrate only, for its side branches);
    returns its timings and the run (model released) whose records the side branches share."""
    with released_after_oneshot(echo) as track:
        run = calibrate(cfg, branch, base_dir, arch, recipe_text, echo, options, side=side)
        track(run.model)
        timings = run.timings
        t = time.time()
        if out is not None:
            run.model.save_pretrained(out, save_compressed=True, max_shard_size=SHARD_SIZE)
        run.model = None  # the calibrated model is written: nothing of this branch keeps it alive
    if out is not None:
        _write_branch_files(cfg, base_dir, arch, recipe_text, out, run)
    timings["save"] = round(time.time() - t, 2)
    timings.update(resource_peaks())
    if "peak_gpu_gib" in timings:  # the AWQ records reset the device's peak counter per layer
        timings["peak_gpu_gib"] = max(timings["peak_gpu_gib"], round(run.stats.peak_gpu_gib, 2))
    return timings, run


def _write_branch_files(
    cfg: ReleaseConfig, base_dir: Path, arch: Glm4MoeArch, recipe_text: str, out: Path, run: Calibrated
) -> None:
    """Beside the saved weights: tokenizer, generation config, the MTP layer, the recipe, the
    expert coverage and the calibration record (folded into provenance.json by `seal_folder`)."""
    from .coverage import ExpertCoverage

    run.tokenizer.save_pretrained(out)
    for name in ("generation_config.json",):
        if (base_dir / name).is_file() and not (out / name).exists():
            shutil.copy2(base_dir / name, out / name)
    _carry_mtp_layers(base_dir, out, arch)
    (out / RECIPE_FILE).write_text(recipe_text)
    coverage = ExpertCoverage(
        total_tokens=run.calibration.total_tokens,
        routed={k: v for k, v in sorted(run.counts["routed"].items())},
        calibrated={k: v for k, v in sorted(run.counts["calibrated"].items())},
        moe_calibrate_all_experts=cfg.calibration.moe_calibrate_all_experts,
    )
    (out / COVERAGE_FILE).write_text(json.dumps(coverage.to_json(), indent=1) + "\n")
    (out / ".calibration.json").write_text(json.dumps(run.calibration.to_json()))


def _carry_mtp_layers(base_dir: Path, out: Path, arch: Glm4MoeArch) -> None:
    """Put GLM's MTP layer(s) back: transformers does not model them, so llm-compressor's save
    drops `model.layers.{num_hidden_layers}.*`. compressed-tensors copies them unquantized and
    lists them in `ignore`; its ignore entry leaves the dots unescaped, so glmrel writes an exact one."""
    from compressed_tensors.utils import save_mtp_tensors_to_checkpoint

    for layer in arch.mtp_layers:
        prefix = f"model.layers.{layer}."
        save_mtp_tensors_to_checkpoint(
            str(base_dir), str(out), mtp_prefix=prefix, shard_name=f"model-mtp-{layer}.safetensors"
        )
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        qc = cfg["quantization_config"]
        loose = f"re:^{prefix}.*"
        exact = "re:^model\\.layers\\." + str(layer) + "\\."
        qc["ignore"] = [exact if x == loose else x for x in qc.get("ignore", [])]
        if exact not in qc["ignore"]:
            raise ReleaseError(
                f"MTP layer {layer} was not found in {base_dir}",
                hint="the base checkpoint lacks model.layers.{N}.* tensors named by num_nextn_predict_layers",
            )
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def build_branches(
    cfg: ReleaseConfig,
    branches: list[str],
    gpus: int,
    config_path: Path | None,
    *,
    force: bool = False,
    echo: Log = print,
    separate: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[BranchBuild]:
    """Several branches: one calibration pass for all of them on one GPU (`quantize_pass`), or
    one build each (`separate`, or on several GPUs: the shared pass runs in one process).
    A disk that fills up midway is reported as such (every partial folder is removed by then)."""
    try:
        return _build_branches(cfg, branches, gpus, config_path, force, echo, separate, progress)
    except ReleaseError:
        raise
    except Exception as e:
        if not disk_full(e):
            raise
        raise ReleaseError(
            f"the disk filled up while building ({e}); nothing half-written was kept",
            hint="free space where output_dir (and offload.folder / offload.pass_store) point, or point them at a "
            "disk with room, then build again",
        ) from e


def disk_full(e: BaseException | None) -> bool:
    """`e`, or an exception it was raised from, is a write that found no space left."""
    while e is not None:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _build_branches(
    cfg: ReleaseConfig,
    branches: list[str],
    gpus: int,
    config_path: Path | None,
    force: bool,
    echo: Log,
    separate: bool,
    progress: Callable[[str], None] | None,
) -> list[BranchBuild]:
    if gpus == 1 and not separate:
        from .one_pass import quantize_pass

        return quantize_pass(cfg, branches, force=force, echo=echo, progress=progress)
    if len(branches) > 1 and not separate:
        echo(f"one calibration pass runs on one GPU: with --gpus {gpus} each branch is calibrated on its own")
    builds = []
    for name in branches:
        if progress:
            progress(name)
        builds.append(build_branch(cfg, name, gpus, config_path, force=force, echo=echo))
    return builds


def build_branch(
    cfg: ReleaseConfig, branch: str, gpus: int, config_path: Path | None, *, force: bool = False, echo: Log = print
) -> BranchBuild:
    """One branch: in this process (one GPU) or launched on `gpus` GPUs."""
    if gpus == 1:
        return quantize_branch(cfg, branch, force=force, echo=echo)
    if config_path is None:
        raise ReleaseError("a multi-GPU build needs the config's path to hand to torchrun")
    return quantize_on_gpus(cfg, config_path, branch, gpus, force=force, echo=echo)


def quantize_on_gpus(
    cfg: ReleaseConfig, config_path: Path, branch: str, gpus: int, *, force: bool = False, echo: Log = print
) -> BranchBuild:
    """Build one branch on `gpus` GPUs (rank 0 writes it); skip it when its inputs are unchanged."""
    spec = cfg.branch(branch)
    base_dir, arch, _recipe, fingerprint = prepare_branch(cfg, spec)
    out = cfg.output_dir / spec.name
    if not force and up_to_date(cfg, spec, fingerprint, echo=echo):
        return BranchBuild(spec.name, out, True, 0.0, fingerprint)
    distributed.check_gpus(gpus, cfg.calibration.num_samples)
    require_writable_folder(cfg.output_dir, "output_dir")
    require_replaceable(out, spec.name)
    check_branch_room(cfg, spec, base_dir, arch)
    t = time.time()
    echo(f"[{spec.name}] launching {gpus} ranks with torchrun")
    distributed.launch(gpus, config_path, spec.name)
    if not branch_is_current(out, fingerprint):
        raise ReleaseError(f"the {gpus}-GPU run of {spec.name} finished but wrote no current branch at {out}")
    return BranchBuild(spec.name, out, False, round(time.time() - t, 1), fingerprint)
