"""A branch folder's life: what it is built from (the base model, its fingerprints), whether
it is up to date, the hidden partial folders a build writes into and the processes that own
them, and the sealing that swaps a finished build into place with its provenance and
manifest. Imports no torch; `quantize.py` dispatches, `calibrate.py` calibrates."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import __version__
from ..architecture import Glm4MoeArch
from ..awq import ScaleOptions
from ..build_log import write_build_log
from ..config import BranchSpec, ReleaseConfig
from ..errors import ReleaseError
from ..manifest import EVAL_FILE, HashCache, first_change, folder_content_digest, sealed_changes, write_manifest
from ..owned import made_by_glmrel, remove_owned, require_replaceable
from . import distributed
from .recipe import render_recipe

PROVENANCE_FILE = "provenance.json"


COVERAGE_FILE = "expert_coverage.json"


RECIPE_FILE = "recipe.yaml"


PROVENANCE_SCHEMA = 1


Log = Callable[[str], None]


@dataclass(frozen=True)
class BranchBuild:
    branch: str
    path: Path
    skipped: bool
    seconds: float
    inputs_fingerprint: str
    calibrated_by: str | None = None  # a side branch of one pass: the branch whose pass calibrated it
    # what the AWQ engine recorded in the calibration that built it (release.awq.ScaleStats; none if skipped)
    stats: Any = field(default=None, compare=False, repr=False)

    @property
    def outcome(self) -> str:
        """What happened to the branch, in a few words (the CLI's and build-all's lines)."""
        if self.skipped:
            return "up to date, skipped"
        if self.calibrated_by:
            return f"built in {self.seconds:.0f}s after {self.calibrated_by}'s calibration pass"
        return f"built in {self.seconds:.0f}s"

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stats"}
        d["path"] = str(self.path)
        return d


@dataclass(frozen=True)
class BranchJob:
    """One branch to build, with everything that could be checked before torch is imported:
    the release config, the branch's spec, the base model's folder and architecture, the
    rendered recipe and the fingerprint of every input (`prepare_branch`)."""

    cfg: ReleaseConfig
    spec: BranchSpec
    base_dir: Path
    arch: Glm4MoeArch
    recipe: str
    fingerprint: str  # its own inputs' (`inputs_fingerprint`); a shared pass's is `sealed_fingerprint`

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def out_dir(self) -> Path:
        return self.cfg.output_dir / self.spec.name

    def sealed_fingerprint(self, calibration_pass: list[str] | None) -> str:
        """What the branch's provenance records when `calibration_pass` made it."""
        return pass_fingerprint(self.fingerprint, calibration_pass)


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
        "calibration": cfg.calibration.model_dump(mode="json", exclude={"path", "activations_on_gpu"}),  # how, not what
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


def project_commit() -> dict[str, Any]:
    try:
        import git

        repo = git.Repo(Path(__file__).resolve().parents[2], search_parent_directories=False)  # the checkout
        return {"commit": repo.head.commit.hexsha, "dirty": repo.is_dirty(untracked_files=False)}
    except Exception as e:  # not a git checkout (e.g. installed from a wheel)
        return {"commit": None, "dirty": None, "note": type(e).__name__}


def prepare_branch(cfg: ReleaseConfig, branch: BranchSpec) -> BranchJob:
    """Everything that can fail fast, before torch is imported: model folder, architecture,
    group size, recipe, and the inputs' fingerprint."""
    base_dir = resolve_base_model(cfg)
    arch = Glm4MoeArch.from_dir(base_dir)
    arch.check_group_size(branch.group_size, branch.name)
    if not any(base_dir.glob("*.safetensors")):
        raise ReleaseError(
            f"{base_dir} holds no *.safetensors weights", hint="glmrel reads safetensors checkpoints only"
        )
    recipe_text = render_recipe(cfg.recipe, arch, branch, cfg.awq)
    fp = inputs_fingerprint(cfg, branch, recipe_text, base_model_fingerprint(base_dir), calibration_fingerprint(cfg))
    return BranchJob(cfg, branch, base_dir, arch, recipe_text, fp)


def recorded_pass(out_dir: Path) -> list[str] | None:
    """The branches of the calibration pass that built `out_dir` (its provenance), if recorded."""
    try:
        value = json.loads((out_dir / PROVENANCE_FILE).read_text()).get("calibration_pass", {}).get("branches")
    except (OSError, ValueError, AttributeError):  # ValueError: not JSON, or not UTF-8
        return None
    return [str(n) for n in value] if isinstance(value, list) and value else None


def up_to_date(job: BranchJob, calibration_pass: list[str] | None = None, echo: Log | None = None) -> bool:
    """`built_from` these inputs, and its content still what was sealed (its manifest): a
    branch whose files changed afterwards is rebuilt, never approved again; `echo` says why."""
    if not built_from(job, calibration_pass):
        return False
    changes = sealed_changes(job.out_dir)
    if changes and echo is not None:
        echo(f"[{job.name}] {first_change(changes)} since it was built: rebuilding it")
    return not changes


def built_from(job: BranchJob, calibration_pass: list[str] | None = None) -> bool:
    """The branch's folder was built from these inputs: by the pass asked for now
    (`calibration_pass`; none: the branch alone), or by the pass its provenance records (built
    with the others by `build-all`, or alone) while all of that pass's branches are still in
    the config. Either way nothing it was built from has changed, so `quantize --branch X`
    after `build-all` does not rebuild X."""
    if branch_is_current(job.out_dir, job.sealed_fingerprint(calibration_pass)):
        return True
    recorded = recorded_pass(job.out_dir)
    names = {b.name for b in job.cfg.branches}
    if not recorded or job.name not in recorded or not set(recorded) <= names:
        return False
    return branch_is_current(job.out_dir, job.sealed_fingerprint(recorded))


def branch_is_current(out_dir: Path, fingerprint: str) -> bool:
    prov = out_dir / PROVENANCE_FILE
    if not prov.is_file():
        return False
    try:
        return json.loads(prov.read_text()).get("inputs_fingerprint") == fingerprint
    except (OSError, ValueError):  # not JSON, or not UTF-8: not this build's
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


def check_branch_room(job: BranchJob) -> None:
    """Refuse a build whose branch cannot fit in `output_dir`, before any work."""
    from . import room

    need = room.branch_bytes(job.base_dir, job.arch, job.cfg.dtype, job.spec.group_size)
    room.check_room(
        f"building {job.name}",
        [(job.cfg.output_dir, need, job.name)],
        hint="free space there, or set output_dir to a disk with room",
    )


def seal_folder(job: BranchJob, tmp: Path, timings: dict[str, Any], calibration_pass: list[str]) -> None:
    """A built branch's records (provenance.json, manifest.json) into `tmp`, then `tmp` swapped
    in as the branch's folder: an interrupted run leaves a hidden .partial, never a branch.
    `calibration_pass`: the branches of the pass that made it, the propagating one first."""
    t = time.time()
    cfg, fingerprint, out_dir = job.cfg, job.sealed_fingerprint(calibration_pass), job.out_dir
    provenance = {
        "schema": PROVENANCE_SCHEMA,
        "tool": {"name": "glmrel", "version": __version__, **project_commit()},
        "libraries": library_versions(),
        "release": cfg.name,
        "branch": job.spec.model_dump(mode="json"),
        "base_model": {
            # an id, not this machine's path: the same inputs give the same bytes anywhere
            "id": cfg.base_model.card_base_model or Path(cfg.base_model.display_id).name,
            "revision": cfg.base_model.revision,
            "fingerprint": base_model_fingerprint(job.base_dir),
            "architecture": asdict(job.arch),
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
    write_manifest(tmp, job.name)
    timings["seal"] = round(time.time() - t, 2)  # the records and the manifest's hashes of every file
    # how this run went (timings, peaks, the engine's counters) is local: the branch holds
    # only what its inputs decide, so a rebuild from the same inputs gives the same bytes
    write_build_log(cfg.output_dir, job.name, "quantize", {"inputs_fingerprint": fingerprint, "timings_s": timings})
    if out_dir.exists() or out_dir.is_symlink():
        require_replaceable(out_dir, job.name)
        old = partial_folder(cfg.output_dir, job.name, "old")
        out_dir.rename(old)
        tmp.rename(out_dir)
        HashCache.follow_rename(tmp, out_dir)  # the hashes just made are the branch's: not read again
        carry_evaluation(old, out_dir)
        remove_owned(old)
    else:
        tmp.rename(out_dir)
        HashCache.follow_rename(tmp, out_dir)


def carry_evaluation(old: Path, new: Path) -> bool:
    """A rebuild that gave the very content `glmrel eval` scored keeps its eval.json (the
    record names that content's digest; a rebuild to other content drops it, and its card then
    says the branch was not scored). Returns whether it was carried."""
    path = old / EVAL_FILE
    if path.is_symlink() or not path.is_file():  # only a regular file glmrel wrote is carried
        return False
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("content_sha256") != folder_content_digest(new):
        return False
    shutil.copyfile(old / EVAL_FILE, new / EVAL_FILE)
    return True


def engine_description(timings: dict[str, Any]) -> dict[str, Any]:
    """The AWQ engine and its options, from a run's timings (a side branch's sit under its
    calibration pass): what the card states. The run's own counters stay in the build log."""
    engine = timings.get("awq_engine") or (timings.get("calibration_pass") or {}).get("awq_engine") or {}
    keys = {"engine", *ScaleOptions().to_json()}
    return {k: engine[k] for k in sorted(keys) if k in engine}
