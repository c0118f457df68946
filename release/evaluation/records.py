"""Evaluation records: what `glmrel eval` measured, bound to what it measured.

A branch's `eval.json` (published with the branch, like verify.json) holds lm-eval's scores of
the branch, the base model's scores on the same settings, and the recovery per task (branch /
base x 100), with the versions of lm-eval and vLLM, the device, and how lm-eval was run. It
names the content digest of the files it scored (`manifest.content_digest`): a changed weight
makes it about other content, and `check` then refuses the branch. The base model's scores are
kept once per release in `<output_dir>/base-eval.json`, reused while the base model, the
settings and the versions are the same.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from ..config import EvalSpec
from ..errors import ReleaseError
from ..manifest import EVAL_FILE

__all__ = ["EVAL_FILE"]
BASE_EVAL_FILE = "base-eval.json"
SCHEMA = 1
RUNNER = "release/evaluation/lm_eval_run.py"


def task_files(spec: EvalSpec) -> dict[str, str]:
    """sha256 of every file of the local task folder (a changed question changes the settings)."""
    folder = spec.include_path
    if folder is None:
        return {}
    if not folder.is_dir():
        raise ReleaseError(
            f"eval.include_path {folder} is not a folder",
            hint="point eval.include_path at a folder of lm-eval task YAMLs, or drop it for lm-eval's own tasks",
        )
    out = {}
    for f in sorted(folder.iterdir()):
        if f.is_symlink() or not f.is_file():
            raise ReleaseError(
                f"eval.include_path holds {f.name}, which is not a regular file",
                hint="keep only the task YAMLs and their data files (no links or sub-folders) in that folder",
            )
        out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def settings(spec: EvalSpec) -> dict[str, Any]:
    """Everything that decides a score (not where vLLM runs or how much memory it may take)."""
    return {
        "tasks": [{"name": t.name, "num_fewshot": t.num_fewshot, "limit": t.limit} for t in spec.tasks],
        "apply_chat_template": spec.apply_chat_template,
        "thinking": spec.thinking,
        "max_model_len": spec.max_model_len,
        "max_gen_toks": spec.max_gen_toks,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "base_tensor_parallel_size": spec.base_tensor_parallel_size or spec.tensor_parallel_size,
        "dtype": "bfloat16",
        "task_files": task_files(spec),
    }


def settings_key(config: dict[str, Any], versions: dict[str, str]) -> str:
    """One digest over the settings and the lm-eval / vLLM / torch versions."""
    blob = json.dumps({"settings": config, "versions": versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def metric_of(task: str, scores: dict[str, Any], metric: str) -> dict[str, Any]:
    """The configured metric of one task's scores, or an error naming what lm-eval reported."""
    metrics = scores.get("metrics") or {}
    if metric not in metrics:
        raise ReleaseError(
            f"lm-eval reported no metric {metric!r} for task {task} (it reported: {', '.join(sorted(metrics)) or 'none'})",
            hint=f"set eval.tasks[{task}].metric to one of those names",
        )
    return metrics[metric]


def recovery(spec: EvalSpec, base: dict[str, Any], branch: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task: the metric, the base's and the branch's value and stderr, recovery in %."""
    rows = []
    for t in spec.tasks:
        b = metric_of(t.name, base[t.name], t.metric)
        q = metric_of(t.name, branch[t.name], t.metric)
        higher = (branch[t.name].get("higher_is_better") or {}).get(t.metric.split(",")[0], True)
        pct = 100.0 * q["value"] / b["value"] if b["value"] and math.isfinite(b["value"]) else None
        rows.append(
            {
                "task": t.name,
                "metric": t.metric,
                "num_fewshot": t.num_fewshot,
                "samples": branch[t.name].get("samples"),
                "base": b["value"],
                "base_stderr": b["stderr"],
                "branch": q["value"],
                "branch_stderr": q["stderr"],
                "recovery_pct": None if pct is None else round(pct, 2),
                "higher_is_better": bool(higher),
            }
        )
    return rows


def read_record(path: Path) -> dict[str, Any] | None:
    """A record as a dict; None when the file is absent. A file that is not a JSON object is an error."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReleaseError(f"{path} is not readable JSON: {e}", hint="run `glmrel eval` again to rewrite it") from e
    if not isinstance(data, dict):
        raise ReleaseError(f"{path} is not a JSON object", hint="run `glmrel eval` again to rewrite it")
    return data


def record_problems(record: Any, branch: str, content_digest: str) -> list[str]:
    """Why an eval.json cannot be trusted for this branch's content (empty: it can): the digest
    it names must be the content's, and its recovery must be its own scores' quotient."""
    rerun = f"run `glmrel eval --branch {branch}` again"
    if not isinstance(record, dict):
        return [f"{EVAL_FILE} is not a JSON object; {rerun}"]
    if record.get("schema") != SCHEMA:
        return [f"{EVAL_FILE} has schema {record.get('schema')!r}, this glmrel reads {SCHEMA}; {rerun}"]
    if record.get("content_sha256") != content_digest:
        return [
            f"{EVAL_FILE} scored other content (it scored {str(record.get('content_sha256'))[:12]}, the branch "
            f"is now {content_digest[:12]}): the weights changed since; {rerun}"
        ]
    rows = record.get("recovery")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and "task" in r for r in rows):
        return [f"{EVAL_FILE} holds no recovery table; {rerun}"]
    for r in rows:
        b, q = r.get("base"), r.get("branch")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (b, q)):
            return [f"{EVAL_FILE}: task {r['task']} lacks a finite base or branch score; {rerun}"]
        want = None if not b else round(100.0 * q / b, 2)
        if r.get("recovery_pct") != want:
            return [
                f"{EVAL_FILE}: task {r['task']}'s recovery {r.get('recovery_pct')} is not branch / base ({want}); {rerun}"
            ]
    return []
