"""Numerical verification of built branches against their base model (needs torch).

The base model and the branches are compared by streaming them layer by layer
(`release/verify/stream.py`): one decoder layer per model resident at a time, read from the
safetensors shards, the branch's decompressed by compressed-tensors as transformers does when
it loads the branch (on the demo the log-probabilities equal the in-memory load's bit for
bit, tested). So `verify` runs at GLM-4.7 size on one GPU, reading each model once, and
records where quantization error enters and how it grows: each decoder layer's output against
the base's. A short greedy decode runs where the branch fits in host memory, and vLLM where
it and a GPU exist; every check that did not run says why.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..build_log import write_build_log
from ..config import ReleaseConfig
from ..errors import ReleaseError
from ..manifest import VERIFY_FILE, folder_content_digest, require_sealed, write_if_changed


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
    # what was measured: `manifest.content_digest` of the branch's files (all but the records
    # written after verification); check and publish refuse a verify.json about other content
    content_sha256: str = ""
    # each decoder layer's output against the base model's (release/verify/stream.py), and how
    method: str = ""
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> QualityReport:
        """A verify.json record (its extra keys, e.g. `glmrel vllm-check`'s, stay in the file)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})

    def summary(self) -> str:
        """One line, as `build-all` prints it."""
        return (
            f"[{self.branch}] verify: KL {self.mean_kl:.5f}, top-1 {self.top1_agreement:.3f}, "
            f"ppl {self.branch_perplexity:.2f} (base {self.base_perplexity:.2f}) -> "
            f"{'PASSED' if self.passed else 'FAILED'}"
        )

    def to_text(self) -> str:
        """The report, as `glmrel verify` prints it."""
        return (
            f"{self.branch}: {'PASSED' if self.passed else 'FAILED'}\n"
            f"  mean KL {self.mean_kl:.6f} (max {self.max_kl}), top-1 agreement {self.top1_agreement:.4f}"
            f" (min {self.min_top1})\n"
            f"  perplexity {self.branch_perplexity:.3f} vs base {self.base_perplexity:.3f} on {self.heldout_tokens}"
            f" tokens\n  {self.vllm}" + "".join(f"\n  FAIL: {f}" for f in self.failures)
        )


HELDOUT_HINT = 'verify.heldout is a UTF-8 JSON list of texts, e.g. ["The first text.", "The second."]'


def load_heldout(cfg: ReleaseConfig) -> list[str]:
    path = cfg.verify.heldout
    if path is None:
        raise ReleaseError("verify.heldout is not set", hint="point verify.heldout at a JSON list of held-out texts")
    try:
        texts = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise ReleaseError(f"held-out text {path} is not a readable JSON list: {e}", hint=HELDOUT_HINT) from e
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise ReleaseError(f"held-out text {path} must be a non-empty JSON list of strings", hint=HELDOUT_HINT)
    return texts


class BaseReference:
    """The base model and the tokenized held-out text that every branch is compared on."""

    def __init__(self, base_dir: Path, texts: list[str], max_tokens: int) -> None:
        from transformers import AutoTokenizer

        self.base_dir = Path(base_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.batches = [
            self.tokenizer(t, return_tensors="pt", max_length=max_tokens, truncation=True)["input_ids"] for t in texts
        ]


def in_memory_logprobs(model_dir: Path, batches: list[Any]) -> list[Any]:
    """Log-probabilities from the whole model loaded with transformers (compressed-tensors
    decompresses a branch on load): the reference the streaming comparison is tested against."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _logprobs(model, batches)


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


DECODE_MAX_BYTES = 4 << 30  # the transformers decode is for small models; vLLM decodes large ones


def _fits_in_memory(branch_dir: Path) -> tuple[bool, str]:
    """Whether the branch, dequantized to float32 for a transformers decode on the host, is
    small: under 4 GiB and a quarter of this machine's memory (INT4 packs 8 weights in 4 bytes,
    so ~8x its files)."""
    weights = sum(p.stat().st_size for p in branch_dir.glob("*.safetensors"))
    need = 8 * weights
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False, "cannot tell this machine's memory"
    if need > min(total / 4, DECODE_MAX_BYTES):
        return False, (
            f"the branch needs ~{need / 2**30:.1f} GiB dequantized on the host (this machine has "
            f"{total / 2**30:.0f} GiB); at this size the vLLM check decodes"
        )
    return True, ""


def _decode(branch_dir: Path, tokenizer: Any) -> tuple[str, str, bool]:
    """A short greedy chat reply from the branch loaded with transformers: (prompt, reply,
    generated anything)."""
    import torch
    from transformers import AutoModelForCausalLM

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain this code:\ndef add(a, b):\n    return a + b"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    try:
        model = AutoModelForCausalLM.from_pretrained(branch_dir, dtype=torch.float32).eval()
    except Exception as e:
        raise ReleaseError(f"transformers could not reload branch {branch_dir}: {e}") from e
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=16, do_sample=False)
    return prompt, tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), out.shape[1] > ids.shape[1]


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
    """Compare one built branch with the base model; write verify.json into the branch."""
    return verify_branches(cfg, {branch: branch_dir}, reference)[branch]


def verify_branches(
    cfg: ReleaseConfig, branches: dict[str, Path], reference: BaseReference, log=lambda s: None
) -> dict[str, QualityReport]:
    """Compare built branches with the base model in one streaming pass (the base model is
    read once); write each branch's verify.json. The record names the digest of the content
    it measured; a branch whose files change meanwhile gets none."""
    import torch

    from .stream import phase, stream_compare

    t0 = time.time()
    for name, folder in branches.items():
        if not (folder / "config.json").is_file():
            raise ReleaseError(
                f"branch folder {folder} has no config.json", hint=f"run `glmrel quantize --branch {name}` first"
            )
        require_sealed(folder, name)  # only what glmrel built and sealed is measured
    with phase("digest"):
        contents = {name: folder_content_digest(folder) for name, folder in branches.items()}
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    base, results = stream_compare(reference.base_dir, branches, reference.batches, device=device, log=log)
    base_ppl = _perplexity(base.logprobs, reference.batches)
    method = f"streamed layer by layer on {device.type} (float32)"
    reports = {}
    for name, folder in branches.items():
        lps = results[name].logprobs
        kl_sum, top1, n = 0.0, 0, 0
        for p, q in zip(base.logprobs, lps):
            kl_sum += (p.exp() * (p - q)).sum(-1).sum().item()
            top1 += (p.argmax(-1) == q.argmax(-1)).sum().item()
            n += p.shape[0]
        mean_kl, agreement = kl_sum / n, top1 / n
        fits, why = _fits_in_memory(folder)
        if fits:
            with phase("decode"):
                prompt, decoded, generated = _decode(folder, reference.tokenizer)
        else:
            prompt, decoded, generated = "", f"decode skipped: {why}", True
        with phase("vllm_check"):
            vllm_line, vllm_failed = vllm_check(folder)
        failures = []
        if vllm_failed:
            failures.append(vllm_line)
        if not math.isfinite(mean_kl) or mean_kl > cfg.verify.max_kl:
            failures.append(f"mean KL {mean_kl:.4f} exceeds verify.max_kl {cfg.verify.max_kl}")
        if agreement < cfg.verify.min_top1:
            failures.append(f"top-1 agreement {agreement:.3f} is below verify.min_top1 {cfg.verify.min_top1}")
        if not generated:
            failures.append("the branch generated no tokens")
        report = QualityReport(
            branch=name,
            passed=not failures,
            heldout_texts=len(reference.batches),
            heldout_tokens=n,
            mean_kl=round(mean_kl, 6),
            top1_agreement=round(agreement, 4),
            base_perplexity=round(base_ppl, 4),
            branch_perplexity=round(_perplexity(lps, reference.batches), 4),
            max_kl=cfg.verify.max_kl,
            min_top1=cfg.verify.min_top1,
            decode_prompt=prompt,
            decode_text=decoded,
            vllm=vllm_line,
            failures=failures,
            content_sha256=contents[name],
            method=method,
            layers=[
                {"layer": d.layer, "rel_error": float(f"{d.rel_error:.6g}"), "cosine": float(f"{d.cosine:.8g}")}
                for d in results[name].layers
            ],
        )
        with phase("digest"):
            changed = folder_content_digest(folder) != contents[name]
        if changed:
            raise ReleaseError(
                f"the files of {folder} changed while it was being verified; no verify.json was written",
                hint=f"run `glmrel verify --branch {name}` again once nothing else writes to the branch",
            )
        write_if_changed(folder / VERIFY_FILE, json.dumps(report.to_json(), indent=2) + "\n")
        # how long it took is this run's, not the branch's: the build log, never verify.json
        write_build_log(folder.parent, name, "verify", {"seconds": round(time.time() - t0, 2), "method": method})
        reports[name] = report
    return reports
