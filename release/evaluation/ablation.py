"""`glmrel ablate`: the same branch built with other recipe settings, in a scratch folder, and
scored like the release (verify's KL and top-1, `glmrel eval`'s tasks), side by side.

A variant is a name and config overrides (`no-moe-aware:calibration.moe_calibrate_all_experts=false`).
Each gets a config of its own under the scratch folder (the release's, its paths made absolute,
only the chosen branch, its output there and no publish remote), so nothing of the release is
touched. The base model's scores are computed once (the release's base-eval.json is reused
where it matches).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..config import ReleaseConfig, format_validation_error, resolve_paths
from ..errors import ReleaseError

VARIANT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*):(.+)$")
BASELINE = "release"  # the variant with no override: the release's own settings


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """`NAME:KEY=VALUE[,KEY=VALUE...]` -> (name, {dotted key: YAML value})."""
    hint = (
        "write a variant as NAME:KEY=VALUE[,KEY=VALUE], e.g. no-moe-aware:calibration.moe_calibrate_all_experts=false"
    )
    m = VARIANT.match(text.strip())
    if not m:
        raise ReleaseError(f"variant {text!r} is not NAME:KEY=VALUE", hint=hint)
    name, body = m.groups()
    if name == BASELINE:
        raise ReleaseError(
            f"variant name {BASELINE!r} is the release's own settings", hint="name the variant otherwise"
        )
    overrides: dict[str, Any] = {}
    for part in body.split(","):
        key, sep, value = part.partition("=")
        if not sep or not re.fullmatch(r"[a-z_]+(\.[a-z_]+)*", key.strip()):
            raise ReleaseError(f"variant {name}: {part!r} is not KEY=VALUE with a dotted config key", hint=hint)
        if key.strip() in overrides:
            raise ReleaseError(f"variant {name} sets {key.strip()} twice", hint="give each key one value")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def variant_config(
    config_path: Path, branch: str, name: str, overrides: dict[str, Any], work: Path
) -> tuple[Path, str]:
    """The variant's config, validated: where it goes (`work/<name>/release.yaml`) and its text.
    Nothing is written: the caller writes every variant's once all of them, and the run's other
    preconditions, have passed."""
    raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    raw = resolve_paths(raw, Path(config_path).resolve().parent)
    branches = [b for b in raw.get("branches") or [] if isinstance(b, dict) and b.get("name") == branch]
    if not branches:
        raise ReleaseError(f"unknown branch {branch!r}", hint="pass --branch with a branch of the config")
    raw["branches"] = branches
    folder = work / name
    raw["output_dir"] = str(folder / "out")
    raw.pop("publish_remote", None)
    raw.pop("changelog", None)  # no cards: the table is the result
    # a variant is measured, not gated: its KL and top-1 are in the table whatever they are
    raw["verify"] = {**(raw.get("verify") or {}), "max_kl": 1e9, "min_top1": 0.0}
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for k in parents:
            if not isinstance(node.get(k, {}), dict):
                raise ReleaseError(f"variant {name}: {key} does not name a config field", hint="see docs/config.md")
            node = node.setdefault(k, {})
        node[leaf] = value
    path = folder / "release.yaml"
    try:
        ReleaseConfig.model_validate(raw)
    except ValidationError as e:
        raise ReleaseError(
            f"variant {name}: {format_validation_error(e, path)}", hint="fix the override; see docs/config.md"
        ) from e
    return path, yaml.safe_dump(raw, sort_keys=False)


def table(rows: list[dict[str, Any]]) -> str:
    """The side-by-side a releaser reads: per variant, KL and top-1 against the base, and each
    task's score with its recovery."""
    if not rows:
        return "no variant was scored"
    tasks = [r["task"] for r in rows[0]["recovery"]]
    head = "| variant | overrides | mean KL | top-1 | " + " | ".join(f"{t} (recovery)" for t in tasks) + " |"
    lines = [head, "|" + " --- |" * (4 + len(tasks))]
    for r in rows:
        cells = []
        for t in tasks:
            row = next((x for x in r["recovery"] if x["task"] == t), None)
            if row is None:
                cells.append("not scored")
            else:
                pct = "n/a" if row["recovery_pct"] is None else f"{row['recovery_pct']:.1f}%"
                cells.append(f"{row['branch']:.4f} ({pct})")
        over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(the release's)"
        lines.append(f"| {r['variant']} | {over} | {r['mean_kl']:.6f} | {r['top1']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
