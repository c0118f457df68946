"""The check's entry points: a local branch folder (`check_branch`), a published Hub revision
(`check_remote`), both through one flow over a `BranchSource` (`check_source`), and CI's light
check of a committed manifest (`check_manifest_file`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ReleaseError
from ..evaluation.records import record_problems
from ..layout import INDEX_FILE, name_in_folder
from ..manifest import EVAL_FILE, MANIFEST_FILE, SHA256_HEX, VERIFY_FILE, Manifest
from .report import CheckReport
from .rules import (
    REQUIRED_FILES,
    check_index,
    check_manifest_entries,
    check_model,
    check_required,
    check_verification,
    expected_group_size,
    read_all_shards,
)
from .sources import BranchSource, HubRevision, LocalBranch


def check_source(report: CheckReport, source: BranchSource, third_party: bool) -> CheckReport:
    """Every check of a branch, in one order, on whatever source holds its files: entries and
    required files, index against shards, the manifest (sizes and digests), the verification
    record, the shard headers, then config.json against the tensors and vLLM's rules.
    `third_party`: glmrel's records (manifest, provenance, recipe, verification) are listed as
    skipped instead of required."""
    names = source.files(report)

    def tokenizer_config() -> dict:
        if "tokenizer_config.json" not in names:  # absent, or refused (a link is never followed)
            return {}
        try:
            return dict(source.json("tokenizer_config.json"))
        except (OSError, ValueError, TypeError):
            return {}

    check_required(report, names, tokenizer_config, third_party)
    shards, weight_map, unread = check_index(report, names, lambda: source.json(INDEX_FILE))
    manifest: Manifest | None = None
    if third_party:
        report.skip("manifest", f"{MANIFEST_FILE}: glmrel's file record (--third-party)")
        report.skip("verification", f"{VERIFY_FILE}: glmrel's verification record (--third-party)")
        report.skip("evaluation", f"{EVAL_FILE}: glmrel's evaluation record (--third-party)")
    elif MANIFEST_FILE not in names:
        report.fail("manifest", source.no_manifest)
    else:
        try:
            manifest = source.manifest()
        except ReleaseError as e:
            report.fail("manifest", e.message)
    if manifest is not None:
        sizes, digest, how = source.sizes_and_digests(manifest, names - {MANIFEST_FILE})
        check_manifest_entries(report, manifest, sizes, digest, how)
    if not third_party:
        record: Any
        try:
            record = source.json(VERIFY_FILE) if VERIFY_FILE in names else None
        except (OSError, ValueError):
            record = "unreadable"
        check_verification(report, record, manifest, source.label)
        check_evaluation(report, source, names, manifest)
    found, unreadable = read_all_shards(report, [(s, source.header(s)) for s in shards])
    if "config.json" not in names:  # missing or refused (a link is never followed): said under files
        return report
    try:
        cfg = source.json("config.json")
    except (OSError, ValueError) as e:
        report.fail("config", f"config.json is unreadable: {e}")
        return report
    check_model(report, cfg, source.where("config.json"), found, weight_map, unread | unreadable)
    return report


def check_evaluation(report: CheckReport, source: BranchSource, names: set[str], manifest: Manifest | None) -> None:
    """eval.json is optional; where there is one, it must be about this very content and add
    up (a card and the Hub's metadata show what it says)."""
    if EVAL_FILE not in names:
        report.skip("evaluation", f"no {EVAL_FILE}: task recovery was not measured (`glmrel eval`)")
        return
    try:
        record: Any = source.json(EVAL_FILE)
    except (OSError, ValueError):
        record = "unreadable"
    if manifest is None:
        report.fail("evaluation", f"without a manifest the content {EVAL_FILE} names cannot be compared")
        return
    problems = record_problems(record, source.label, manifest.content_digest())
    if problems:
        report.fail("evaluation", problems[0])
        return
    tasks = ", ".join(
        f"{r['task']} " + ("n/a (the base scored 0)" if r["recovery_pct"] is None else f"{r['recovery_pct']}%")
        for r in record["recovery"]
    )
    report.ok("evaluation", f"scored this content ({manifest.content_digest()[:12]}): recovery {tasks}")


def check_branch(
    path: Path,
    *,
    group_size: int | None = None,
    no_hash: bool = False,
    third_party: bool = False,
    rehash: bool = True,
) -> CheckReport:
    """Check one branch folder. The group size comes from the argument or the folder's `_GS<n>`
    suffix. `third_party`: a branch glmrel did not build. `rehash` False: a file the release's
    hash cache vouches for (unchanged size, mtime, inode and ctime since it was hashed) is not
    read again (`publish` with nothing changed reads no weight file)."""
    folder = Path(path)
    if folder.is_symlink():
        raise ReleaseError(
            f"{folder} is a symbolic link (to {os.readlink(folder)}), not a branch folder",
            hint="pass the branch folder itself; a link could point anywhere, so check does not follow it",
        )
    if not folder.is_dir():
        raise ReleaseError(
            f"{folder} is not a folder", hint="pass the path of a built branch, e.g. out/demo/W4A16_GS64"
        )
    report = CheckReport(str(folder), expected_group_size(folder, group_size), hashed=not no_hash)
    return check_source(report, LocalBranch(folder, no_hash=no_hash, rehash=rehash), third_party)


def check_remote(
    repo_id: str,
    revision: str,
    *,
    group_size: int | None = None,
    api: Any = None,
    token: str | None = None,
    third_party: bool = False,
) -> CheckReport:
    """Check a published Hub revision without downloading weights (`HubRevision`)."""
    from huggingface_hub import HfApi

    api = api or HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    report = CheckReport(f"{repo_id}@{revision}", expected_group_size(Path(revision), group_size))
    with HubRevision(api, repo_id, revision) as source:
        return check_source(report, source, third_party)


def check_manifest_file(path: Path, group_size: int | None = None) -> CheckReport:
    """CI's light check of a committed manifest: schema, required files, quantization metadata."""
    report = CheckReport(str(path), group_size)
    if Path(path).is_symlink():  # a committed link would have CI read whatever it points to
        report.fail("manifest", f"{path} is a symbolic link (to {os.readlink(path)}); commit the manifest file itself")
        return report
    try:
        m = Manifest.load(Path(path))
    except ReleaseError as e:  # the report has no hint line: the fix goes with the problem
        report.fail("manifest", f"{e.message}; {e.hint}" if e.hint else e.message)
        return report
    gs = group_size if group_size is not None else expected_group_size(Path(m.branch), None)
    report.group_size = gs
    for req in REQUIRED_FILES + (VERIFY_FILE, INDEX_FILE):
        if req not in m.files:
            report.fail("manifest", f"required file {req} is not listed")
    if not any(n.endswith(".safetensors") for n in m.files):
        report.fail("manifest", "no *.safetensors shard is listed")
    for name, entry in m.files.items():
        if not name_in_folder(name):
            report.fail("manifest", f"entry {name!r} is not a file of the branch folder (a path or a hidden name)")
        elif not SHA256_HEX.fullmatch(entry.sha256) or entry.size < 0:
            report.fail("manifest", f"entry {name!r} is malformed (size or sha256)")
    q = m.quantization
    want = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
    }
    for k, v in want.items():
        if q.get(k) != v:
            report.fail("quantization", f"{k} is {q.get(k)!r}, expected {v!r}")
    if gs is not None and q.get("group_size") != gs:
        report.fail("quantization", f"group_size is {q.get('group_size')!r}, but the branch is GS{gs}")
    if "lm_head" not in (q.get("ignore") or []):
        report.fail("quantization", "lm_head is not in ignore")
    if report.passed:
        report.ok("manifest", f"{len(m.files)} files, {m.total_bytes} bytes, GS{q.get('group_size')}")
    return report
