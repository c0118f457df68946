"""`glmrel eval`: lm-evaluation-harness through vLLM on the base model and every branch.

vLLM cannot share glmrel's environment (see release/serving/external.py), so lm-eval runs in
vLLM's: glmrel writes one job per model and starts `lm_eval_run.py` with that environment's
Python, which loads the model once with lm-eval's `vllm` model type and runs every configured
task. The base model is scored once per release (`base-eval.json`, reused while the base, the
settings and the versions hold); each branch's scores, with the base's and the recovery, go
into its `eval.json`, bound to the branch's content. A branch already scored on its present
content with the same settings is not scored again (`--force` does).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ..build_log import write_build_log
from ..config import ReleaseConfig
from ..errors import ReleaseError
from ..manifest import folder_content_digest, refresh_manifest, require_built, write_if_changed
from ..serving.external import vllm_python
from .records import BASE_EVAL_FILE, EVAL_FILE, RUNNER, SCHEMA, read_record, recovery, settings, settings_key

RUNNER_PATH = Path(__file__).with_name("lm_eval_run.py")
# lm-eval's version and the vLLM distribution's (vllm-cpu on CPU, vllm on GPUs), and torch's
PROBE = (
    "import json\nfrom importlib.metadata import version, PackageNotFoundError\nout = {}\n"
    "for key, names in (('lm_eval', ('lm_eval', 'lm-eval')), ('vllm', ('vllm', 'vllm-cpu')), ('torch', ('torch',))):\n"
    "    for n in names:\n        try:\n            out[key] = version(n); break\n"
    "        except PackageNotFoundError:\n            pass\nprint(json.dumps(out))\n"
)
LM_EVAL_HINT = "`make vllm-cpu-env` installs lm-eval beside vLLM; elsewhere: `pip install lm-eval==0.4.13` into it"


def env_versions(python: Path) -> dict[str, str]:
    """lm-eval's, vLLM's and torch's versions in the vLLM environment; refuses one without lm-eval."""
    proc = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=120)
    try:
        found = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
    except (ValueError, IndexError):
        found = {}
    missing = [k for k in ("lm_eval", "vllm", "torch") if k not in found]
    if missing:
        raise ReleaseError(f"the vLLM environment at {python} has no {' or '.join(missing)}", hint=LM_EVAL_HINT)
    return found


def earlier_record(path: Path) -> dict[str, Any] | None:
    """An earlier run's record, to reuse; one that cannot be read is scored again and rewritten."""
    try:
        return read_record(path)
    except ReleaseError:
        return None


def model_args(cfg: ReleaseConfig, base: bool = False) -> dict[str, Any]:
    """What lm-eval's `vllm` model type is given (its own arguments and vLLM's)."""
    spec = cfg.eval
    tp = (spec.base_tensor_parallel_size or spec.tensor_parallel_size) if base else spec.tensor_parallel_size
    args: dict[str, Any] = {
        "dtype": "bfloat16",
        "max_model_len": spec.max_model_len,
        "max_gen_toks": spec.max_gen_toks,
        "tensor_parallel_size": tp,
        "gpu_memory_utilization": spec.gpu_memory_utilization,
        "batch_size": "auto",
        "seed": 0,
        "enforce_eager": True,
    }
    if spec.thinking is not None:
        args["enable_thinking"] = spec.thinking
    return args


def run_lm_eval(
    cfg: ReleaseConfig, model_dir: Path, python: Path, base: bool = False, timeout: int = 24 * 3600
) -> dict[str, Any]:
    """Score one model folder; returns the runner's result (tasks, versions, device, seconds)."""
    spec = cfg.eval
    job = {
        "model": str(model_dir),
        "model_args": model_args(cfg, base),
        "apply_chat_template": spec.apply_chat_template,
        "include_path": str(spec.include_path) if spec.include_path else None,
        "tasks": [{"name": t.name, "num_fewshot": t.num_fewshot, "limit": t.limit} for t in spec.tasks],
    }
    # vLLM 0.32's offline loop divides by its progress bar's elapsed time, which a disabled
    # tqdm (glmrel's quiet console sets TQDM_DISABLE) reports as 0: the child keeps its bars
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "TQDM_DISABLE"}
    env.setdefault("HF_DATASETS_OFFLINE", "0")
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        try:
            proc = subprocess.run(
                [str(python), str(RUNNER_PATH), str(job_path), str(out)],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                # lm-eval reads a local task's data files relative to where it runs
                cwd=str(spec.include_path or tmp),
            )
        except subprocess.TimeoutExpired as e:
            raise ReleaseError(f"lm-eval on {model_dir} did not finish in {timeout} s") from e
        # the runner renames a finished result into place: one that is there is whole, even
        # where vLLM's CPU build aborted as the process exited (it does, now and then)
        if not out.is_file():
            tail = (proc.stderr or proc.stdout)[-2000:]
            raise ReleaseError(
                f"lm-eval through vLLM failed on {model_dir} (exit {proc.returncode}):\n{tail}",
                hint="the lines above are lm-eval's and vLLM's; fix the task or the environment and run again",
            )
        return json.loads(out.read_text())


def _run_record(result: dict[str, Any], cfg: ReleaseConfig, base: bool = False) -> dict[str, Any]:
    """The parts of a run a record keeps: no paths of this machine, no timings."""
    return {
        "versions": {k: result[k] for k in ("lm_eval", "vllm", "torch")},
        "device": result["device"],
        "how": {
            "runner": RUNNER,
            "model_type": "vllm (lm-eval)",
            "model_args": {k: v for k, v in model_args(cfg, base).items() if k != "gpu_memory_utilization"},
            "apply_chat_template": cfg.eval.apply_chat_template,
            "thinking": cfg.eval.thinking,
        },
        "tasks": result["tasks"],
    }


def base_scores(
    cfg: ReleaseConfig, base_dir: Path, base_fingerprint: str, python: Path, key: str, force: bool, echo
) -> dict[str, Any]:
    """The base model's record: reused when it is about this base, settings and versions."""
    path = cfg.output_dir / BASE_EVAL_FILE
    old = earlier_record(path)
    if not force and old and old.get("key") == key and old.get("base_fingerprint") == base_fingerprint:
        echo(f"[base] eval: reusing {path.name} (same base model, settings and versions)")
        return old
    echo(f"[base] eval: lm-eval through vLLM on {base_dir}")
    t0 = time.time()
    result = run_lm_eval(cfg, base_dir, python, base=True)
    record = {
        "schema": SCHEMA,
        "model": "base",
        "base_fingerprint": base_fingerprint,
        "key": key,
        "settings": settings(cfg.eval),
    }
    record.update(_run_record(result, cfg, base=True))
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    write_if_changed(path, json.dumps(record, indent=2) + "\n")
    write_build_log(cfg.output_dir, "base", "eval", {"seconds": round(time.time() - t0, 1), "load_s": result["load_s"]})
    return record


def evaluate(
    cfg: ReleaseConfig,
    base_dir: Path,
    base_fingerprint: str,
    branches: list[str],
    python: Path | None = None,
    force: bool = False,
    echo=print,
) -> dict[str, dict[str, Any]]:
    """Score the base model (once) and each branch; write each branch's eval.json and manifest.
    Returns the branches' records."""
    spec = cfg.eval
    if not spec.tasks:
        raise ReleaseError(
            "the config's eval section lists no tasks",
            hint="add eval.tasks (name, metric, num_fewshot, limit); configs/glm-4.7.yaml has GLM-4.7's",
        )
    folders = {}
    for name in branches:
        cfg.branch(name)
        folder = cfg.output_dir / name
        require_built(folder, name)  # only what glmrel built and sealed is scored
        folders[name] = folder
    py = vllm_python(python or spec.python)
    versions = env_versions(py)
    config = settings(spec)
    key = settings_key(config, versions)
    base: dict[str, Any] | None = None
    records = {}
    for name, folder in folders.items():
        digest = folder_content_digest(folder)
        old = earlier_record(folder / EVAL_FILE)
        if not force and old and old.get("key") == key and old.get("content_sha256") == digest:
            echo(f"[{name}] eval: up to date (scored this content with these settings)")
            records[name] = old
            continue
        base = base or base_scores(cfg, base_dir, base_fingerprint, py, key, force, echo)
        echo(f"[{name}] eval: lm-eval through vLLM")
        t0 = time.time()
        result = run_lm_eval(cfg, folder, py)
        if folder_content_digest(folder) != digest:
            raise ReleaseError(
                f"the files of {folder} changed while lm-eval scored it; no {EVAL_FILE} was written",
                hint=f"run `glmrel eval --branch {name}` again once nothing else writes to the branch",
            )
        run = _run_record(result, cfg)
        record = {"schema": SCHEMA, "branch": name, "content_sha256": digest, "key": key, "settings": config}
        record.update(run)
        record["base"] = {
            "base_fingerprint": base_fingerprint,
            "versions": base["versions"],
            "device": base["device"],
            "tasks": base["tasks"],
        }
        record["recovery"] = recovery(spec, base["tasks"], run["tasks"])
        write_if_changed(folder / EVAL_FILE, json.dumps(record, indent=2) + "\n")
        refresh_manifest(folder, name)
        write_build_log(
            cfg.output_dir, name, "eval", {"seconds": round(time.time() - t0, 1), "load_s": result["load_s"]}
        )
        records[name] = record
    return records


def summary(name: str, record: dict[str, Any]) -> str:
    """One line per branch: each task's score against the base's and the recovery."""
    parts = []
    for r in record["recovery"]:
        pct = "n/a (base scored 0)" if r["recovery_pct"] is None else f"{r['recovery_pct']:.1f}%"
        parts.append(f"{r['task']} {r['metric']} {r['branch']:.4f} vs base {r['base']:.4f} ({pct})")
    return f"[{name}] " + "; ".join(parts)
