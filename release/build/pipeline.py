"""build-all: every branch of a release, built the same way, verified before anything ships."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..build_log import write_build_log
from ..check import CheckReport, check_branch
from ..config import ReleaseConfig
from ..errors import ReleaseError
from ..manifest import folder_content_digest, refresh_manifest
from ..render import render_release
from ..verify.branch import VERIFY_FILE, BaseReference, QualityReport, load_heldout, verify_branches
from .branch_folder import BranchBuild, resolve_base_model
from .quantize import build_branches


@dataclass(frozen=True)
class BuildResult:
    builds: list[BranchBuild]
    quality: dict[str, QualityReport]

    @property
    def passed(self) -> bool:
        return all(q.passed for q in self.quality.values())

    def to_json(self) -> dict[str, Any]:
        quality = {name: q.to_json() for name, q in self.quality.items()}
        return {"branches": [b.to_json() for b in self.builds], "quality": quality, "passed": self.passed}


def seal_branch(cfg: ReleaseConfig, name: str, folder: Path) -> CheckReport:
    """After verification: the branch's manifest (verify.json is in it), then its full check.
    `build-all` and `verify` end each branch this way; a branch whose content changed since
    it was built is refused, never sealed again (`manifest.refresh_manifest`).

    The check trusts the hash cache as `publish` does: a file whose size, mtime, inode and
    ctime are those it had when the build hashed it is not read again (a weight file changed
    since is hashed, and refused by the manifest's refresh before the check). Its seconds go
    to the branch's build log (`seal`), where the rehearsal reads them."""
    t = time.time()
    refresh_manifest(folder, name)
    report = check_branch(folder, group_size=cfg.branch(name).group_size, rehash=False)
    write_build_log(folder.parent, name, "seal", {"seconds": round(time.time() - t, 2), "passed": report.passed})
    return report


def _verification_of_this_content(folder: Path) -> QualityReport | None:
    """The branch's verify.json when it is about the files as they are now; None when it is
    missing, unreadable, or about other content (then the branch is verified again)."""
    try:
        record = json.loads((folder / VERIFY_FILE).read_text())
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return None
    if not isinstance(record, dict) or record.get("content_sha256") != folder_content_digest(folder):
        return None
    return QualityReport.from_json(record)


def build_all(
    cfg: ReleaseConfig,
    *,
    force: bool = False,
    echo: Callable[[str], None] = print,
    progress: Callable[[str], None] | None = None,
    gpus: int = 1,
    config_path: Path | None = None,
    separate: bool = False,
) -> BuildResult:
    """Quantize (or skip, when unchanged), verify, render, manifest and check each branch.
    On one GPU the branches share one calibration pass (one_pass.quantize_pass) unless
    `separate`.

    A branch that is skipped keeps its earlier verification unless that is missing. Raises
    ReleaseError naming every branch that failed verification (before anything is rendered)
    or check, so nothing that failed can be published.
    """
    names = [b.name for b in cfg.branches]
    builds = build_branches(cfg, names, gpus, config_path, force=force, echo=echo, separate=separate, progress=progress)
    for b in builds:
        echo(f"[{b.branch}] {b.outcome}")

    quality: dict[str, QualityReport] = {}
    to_verify: dict[str, Path] = {}
    for b in builds:
        earlier = _verification_of_this_content(b.path) if b.skipped else None
        if earlier is not None:
            quality[b.branch] = earlier
        else:
            to_verify[b.branch] = b.path
    if to_verify:  # one streaming pass: the base model is read once for all of them
        reference = BaseReference(resolve_base_model(cfg), load_heldout(cfg), cfg.verify.max_tokens)
        for name, report in verify_branches(cfg, to_verify, reference).items():
            echo(report.summary())
            quality[name] = report
    quality = {b.branch: quality[b.branch] for b in builds}
    failed = [name for name, q in quality.items() if not q.passed]
    if failed:
        reasons = "; ".join(f"{n}: {', '.join(quality[n].failures)}" for n in failed)
        raise ReleaseError(
            f"verification failed for {', '.join(failed)}: {reasons}",
            hint="inspect verify.json in the branch; fix the recipe or loosen verify thresholds deliberately",
        )
    if cfg.changelog is not None:
        rendered = render_release(cfg)
        echo(f"rendered {len(rendered.cards)} cards for {rendered.version}")
    checks = {}
    for b in builds:
        checked = seal_branch(cfg, b.branch, b.path)
        checks[b.branch] = checked
        echo(f"[{b.branch}] check: {'PASSED' if checked.passed else 'FAILED'} ({checked.tensors} tensors)")
    bad = {n: r for n, r in checks.items() if not r.passed}
    if bad:
        raise ReleaseError(
            "check failed for " + "; ".join(f"{n}: {r.failures[0].message}" for n, r in bad.items()),
            hint="run `glmrel check PATH` on the branch for the full report",
        )
    return BuildResult(builds, quality)
