"""Stands in for release/evaluation/lm_eval_run.py in tests (no vLLM here): checks the job
glmrel wrote and answers with fixed scores, the base model's higher than a branch's; the
generation task scores 0 on the base so the card's "n/a" path is exercised.
FAKE_LM_EVAL_FAIL=1 makes it fail as lm-eval would; FAKE_LM_EVAL_METRIC renames the metric."""

import json
import os
import sys
from pathlib import Path

runner, job_path, out_path = sys.argv[1:4]
assert Path(runner).name == "lm_eval_run.py", runner
job = json.loads(Path(job_path).read_text())
assert Path(job["model"], "config.json").is_file(), job["model"]
with open(os.environ["FAKE_LM_EVAL_LOG"], "a") as log:
    log.write(f"scored {job['model']} {json.dumps(job['tasks'])}\n")
if os.environ.get("FAKE_LM_EVAL_FAIL"):
    sys.stderr.write("Traceback ...\nValueError: task glmrel_demo_next_line_mc could not be loaded\n")
    sys.exit(1)
base = not Path(job["model"], "recipe.yaml").exists()
metric = os.environ.get("FAKE_LM_EVAL_METRIC", "acc")
tasks = {}
for t in job["tasks"]:
    if t["name"].endswith("_mc"):
        value = 0.5 if base else 0.45
        metrics = {metric: {"value": value, "stderr": 0.079, "filter": "none"}}
    else:
        metrics = {"exact_match": {"value": 0.0 if base else 0.0417, "stderr": 0.0, "filter": "none"}}
    tasks[t["name"]] = {
        "metrics": metrics,
        "higher_is_better": {metric: True, "exact_match": True},
        "num_fewshot": t["num_fewshot"],
        "samples": t["limit"] or 40,
        "samples_available": 40,
        "task_version": 1.0,
        "dataset_path": "json",
        "dataset_name": None,
        "output_type": "multiple_choice",
    }
Path(out_path).write_text(
    json.dumps(
        {
            "lm_eval": "0.4.13",
            "vllm": "0.32.0",
            "torch": "2.13.0+cpu",
            "device": "CPU (x86_64, 2 cores)",
            "load_s": 1.0,
            "seconds": 2.0,
            "tasks": tasks,
        }
    )
)
