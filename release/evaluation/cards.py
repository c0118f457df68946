"""What the cards say of `glmrel eval`'s records: the recovery table of each branch, the
side-by-side on the landing page, and the Hub's evaluation metadata (`model-index`, written
with huggingface_hub's `EvalResult` into the card's front matter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult

from ..config import ReleaseConfig
from ..errors import ReleaseError
from ..manifest import folder_content_digest
from .records import EVAL_FILE, read_record, record_problems


def branch_eval(folder: Path, branch: str) -> dict[str, Any] | None:
    """A branch's eval.json for its card (None: not evaluated). A record about other content,
    or one that does not add up, is an error: a card never shows scores of other weights."""
    record = read_record(folder / EVAL_FILE)
    if record is None:
        return None
    problems = record_problems(record, branch, folder_content_digest(folder))
    if problems:
        raise ReleaseError(f"{folder / EVAL_FILE}: {problems[0]}", hint=f"run `glmrel eval --branch {branch}` again")
    return record


def eval_view(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The figures a card's recovery table shows."""
    if record is None:
        return None
    how = record.get("how") or {}
    return {
        "rows": record["recovery"],
        "lm_eval": record["versions"]["lm_eval"],
        "vllm": record["versions"]["vllm"],
        "device": record["device"],
        "base_device": record["base"]["device"],
        "chat_template": how.get("apply_chat_template"),
        "thinking": how.get("thinking"),
        "tensor_parallel_size": (how.get("model_args") or {}).get("tensor_parallel_size"),
    }


def landing_eval(branches: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The landing page's side-by-side: per task, the base's score and each branch's with its
    recovery (branches without a record show as not evaluated)."""
    views = {b["name"]: b["eval"] for b in branches if b.get("eval")}
    if not views:
        return None
    first = next(iter(views.values()))
    rows = []
    for i, r in enumerate(first["rows"]):
        cells = []
        for b in branches:
            v = b.get("eval")
            row = v["rows"][i] if v and i < len(v["rows"]) and v["rows"][i]["task"] == r["task"] else None
            cells.append(row)
        rows.append(
            {
                "task": r["task"],
                "metric": r["metric"],
                "num_fewshot": r["num_fewshot"],
                "base": r["base"],
                "cells": cells,
            }
        )
    return {"rows": rows, "lm_eval": first["lm_eval"], "vllm": first["vllm"], "device": first["device"]}


def eval_results(cfg: ReleaseConfig, branch: str, record: dict[str, Any] | None) -> list[EvalResult] | None:
    """The Hub's evaluation metadata for one branch's card: one result per task, this branch's
    score on the configured metric, with where it was measured (its eval.json on the Hub).
    The dataset is the task's configured Hub id (eval.tasks[].dataset), else the task's name."""
    if record is None:
        return None
    datasets = {t.name: t.dataset for t in cfg.eval.tasks}
    source = f"https://huggingface.co/{cfg.hub_repo}/blob/{branch}/{EVAL_FILE}"
    versions = record["versions"]
    out = []
    for r in record["recovery"]:
        scores = record["tasks"].get(r["task"], {})
        metric = r["metric"].split(",")[0]
        out.append(
            EvalResult(
                task_type="text-generation",
                # the Hub groups model-index results by dataset type: a task without a Hub
                # dataset id (a local one, e.g. the demo's JSON files) is named by its task
                dataset_type=datasets.get(r["task"]) or r["task"],
                dataset_name=r["task"],
                dataset_config=scores.get("dataset_name"),
                dataset_args={"num_few_shot": r["num_fewshot"]},
                metric_type=metric,
                metric_name=f"{r['metric']} ({r['num_fewshot']}-shot)",
                metric_value=r["branch"],
                source_name=f"glmrel eval: lm-eval {versions['lm_eval']} through vLLM {versions['vllm']}",
                source_url=source,
            )
        )
    return out
