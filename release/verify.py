"""Numerical verification of a built branch against its base model (needs torch).

Reloads the branch with transformers + compressed-tensors (the path users take), compares
next-token distributions with the base model on held-out text, decodes a short reply, and
tries vLLM when it is importable on a GPU. Every check that did not run says why.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import ReleaseConfig
from .errors import ReleaseError
from .manifest import folder_content_digest, write_if_changed

VERIFY_FILE = "verify.json"


@dataclass(frozen=True)
class QualityReport:
    branch: str
    passed: bool
    heldout_texts: int
    heldout_tokens: int
    mean_kl: float
    top1_agreement: float
    base_perplexity: float
    branch_perplexity: float
    max_kl: float
    min_top1: float
    decode_prompt: str
    decode_text: str
    vllm: str
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # what was measured: `manifest.content_digest` of the branch's files (all but the records
    # written after verification); check and publish refuse a verify.json about other content
    content_sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_heldout(cfg: ReleaseConfig) -> list[str]:
    path = cfg.verify.heldout
    if path is None:
        raise ReleaseError("verify.heldout is not set", hint="point verify.heldout at a JSON list of held-out texts")
    try:
        texts = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReleaseError(f"held-out text {path} is not a readable JSON list: {e}") from e
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise ReleaseError(f"held-out text {path} must be a non-empty JSON list of strings")
    return texts


class BaseReference:
    """The base model's log-probabilities on the held-out text, computed once per build."""

    def __init__(self, base_dir: Path, texts: list[str], max_tokens: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.batches = [
            self.tokenizer(t, return_tensors="pt", max_length=max_tokens, truncation=True)["input_ids"] for t in texts
        ]
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        self.logprobs = _logprobs(model, self.batches)
        self.perplexity = _perplexity(self.logprobs, self.batches)
        del model


def _logprobs(model, batches) -> list:
    import torch

    with torch.no_grad():
        return [torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1) for ids in batches]


def _perplexity(logprobs, batches) -> float:
    nll, n = 0.0, 0
    for lp, ids in zip(logprobs, batches):
        target = ids[0, 1:]
        nll -= lp[:-1].gather(-1, target[:, None]).sum().item()
        n += target.numel()
    return math.exp(nll / n)


def vllm_check(branch_dir: Path) -> tuple[str, bool]:
    """Load the branch in vLLM and generate a short chat reply, where vLLM and a GPU exist.

    Returns (status line, failed). Where it cannot run, the line says "skipped" and why —
    never "passed".
    """
    try:
        import torch
    except ImportError:
        return "vLLM check skipped: torch is not installed", False
    if not torch.cuda.is_available():
        return "vLLM check skipped: no CUDA GPU on this machine", False
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        return "vLLM check skipped: vllm is not installed", False
    try:
        llm = LLM(model=str(branch_dir), quantization="compressed-tensors", max_model_len=1024, enforce_eager=True)
        out = llm.chat(
            [{"role": "user", "content": "Say hello in one sentence."}],
            SamplingParams(max_tokens=16, temperature=0.0),
        )
        n = len(out[0].outputs[0].token_ids)
        del llm
    except Exception as e:  # any load or kernel error is the finding this check exists for
        return f"vLLM check FAILED: {type(e).__name__}: {e}", True
    if n == 0:
        return "vLLM check FAILED: generated no tokens", True
    return f"vLLM check passed: loaded with --quantization compressed-tensors and generated {n} tokens", False


def verify_branch(cfg: ReleaseConfig, branch: str, branch_dir: Path, reference: BaseReference) -> QualityReport:
    """Compare a built branch with the base model; write verify.json into the branch."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    if not (branch_dir / "config.json").is_file():
        raise ReleaseError(
            f"branch folder {branch_dir} has no config.json", hint=f"run `glmrel quantize --branch {branch}` first"
        )
    content = folder_content_digest(branch_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(branch_dir, dtype=torch.float32).eval()
    except Exception as e:
        raise ReleaseError(f"transformers could not reload branch {branch} from {branch_dir}: {e}") from e
    lps = _logprobs(model, reference.batches)
    kl_sum, top1, n = 0.0, 0, 0
    for p, q in zip(reference.logprobs, lps):
        kl_sum += (p.exp() * (p - q)).sum(-1).sum().item()
        top1 += (p.argmax(-1) == q.argmax(-1)).sum().item()
        n += p.shape[0]
    mean_kl, agreement = kl_sum / n, top1 / n
    ppl = _perplexity(lps, reference.batches)

    tok = reference.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Explain this code:\ndef add(a, b):\n    return a + b"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=16, do_sample=False)
    decoded = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    del model
    vllm_line, vllm_failed = vllm_check(branch_dir)
    failures = []
    if vllm_failed:
        failures.append(vllm_line)
    if not math.isfinite(mean_kl) or mean_kl > cfg.verify.max_kl:
        failures.append(f"mean KL {mean_kl:.4f} exceeds verify.max_kl {cfg.verify.max_kl}")
    if agreement < cfg.verify.min_top1:
        failures.append(f"top-1 agreement {agreement:.3f} is below verify.min_top1 {cfg.verify.min_top1}")
    if out.shape[1] <= ids.shape[1]:
        failures.append("the branch generated no tokens")
    report = QualityReport(
        branch=branch,
        passed=not failures,
        heldout_texts=len(reference.batches),
        heldout_tokens=n,
        mean_kl=round(mean_kl, 6),
        top1_agreement=round(agreement, 4),
        base_perplexity=round(reference.perplexity, 4),
        branch_perplexity=round(ppl, 4),
        max_kl=cfg.verify.max_kl,
        min_top1=cfg.verify.min_top1,
        decode_prompt=prompt,
        decode_text=decoded,
        vllm=vllm_line,
        failures=failures,
        seconds=round(time.time() - t0, 2),
        content_sha256=content,
    )
    if folder_content_digest(branch_dir) != content:
        raise ReleaseError(
            f"the files of {branch_dir} changed while it was being verified; no verify.json was written",
            hint=f"run `glmrel verify --branch {branch}` again once nothing else writes to the branch",
        )
    write_if_changed(branch_dir / VERIFY_FILE, json.dumps(report.to_json(), indent=2) + "\n")
    return report
