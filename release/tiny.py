"""The embedded demo: a tiny GLM-4-MoE that glmrel builds itself, offline and deterministically.

It is GLM-4.7's architecture scaled down (dense prefix layer, sigmoid router with
``e_score_correction_bias``, shared expert, qk-norm, attention bias, one MTP layer stored
GLM-style as ``model.layers.{num_hidden_layers}.*``), with a byte-level BPE tokenizer and a
short language-model training run, so its logits mean something and its routing is uneven.

Everything comes from one fixed corpus shipped with glmrel (``release/data/demo_corpus.json.xz``,
Python standard-library modules, sha256 pinned below) and runs with reproducible CPU numerics
(``release/numerics.py``), so the demo's weights are the same bits on every run (and on machines
of one CPU vendor: an AMD EPYC and an Intel Xeon differ, tests/test_build.py). The
result is cached by a key over this file, the corpus and the torch version.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import lzma
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .errors import ReleaseError
from .numerics import REPRODUCIBLE_CPU_ENV, pin_reproducible_cpu

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
]
# The shape of GLM-4.7's chat template, reduced to what a base-model demo needs.
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# What every glmrel-built GLM-4-MoE shares with GLM-4.7's architecture, whatever its size
# (a dense prefix of one layer here; GLM-4.7 has three).
GLM4MOE_FEATURES = dict(
    first_k_dense_replace=1,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    attention_bias=True,
    use_qk_norm=True,
    partial_rotary_factor=0.5,
    tie_word_embeddings=False,
    num_nextn_predict_layers=1,
)
TINY_ARCH: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    n_routed_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=2048,
    **GLM4MOE_FEATURES,
)
VOCAB_SIZE = 4096
TRAIN_STEPS = 160
TRAIN_SEQ, TRAIN_BATCH = 128, 8
N_CALIBRATION = 48
N_HELDOUT = 8
CORPUS_FILE = "demo_corpus.json.xz"
CORPUS_SHA256 = "0bd0fcf962c1ea880e7aa947811d3b4261c2a8851ce1275e07ede960bd8a2157"


@dataclass(frozen=True)
class DemoAssets:
    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration.jsonl"

    @property
    def heldout(self) -> Path:
        return self.root / "heldout.json"


def corpus_bytes() -> bytes:
    """The demo corpus as shipped, checked against its pinned sha256."""
    data = resources.files("release").joinpath("data", CORPUS_FILE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CORPUS_SHA256:
        raise ReleaseError(
            f"the demo corpus release/data/{CORPUS_FILE} has sha256 {digest[:12]}, not the pinned {CORPUS_SHA256[:12]}",
            hint="restore it with `git checkout release/data` (the demo's weights are pinned to these bytes)",
        )
    return data


def _cache_key() -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(CORPUS_SHA256.encode())
    h.update(version("torch").encode())
    return h.hexdigest()[:16]


def default_cache_root() -> Path:
    env = os.environ.get("GLMREL_CACHE")
    return Path(env) if env else Path(__file__).resolve().parent.parent / ".cache"


def ensure_demo_assets(root: Path | None = None, log=print) -> DemoAssets:
    """Build the demo model, calibration file and held-out text once; reuse them after.

    The build runs in a child process started with the reproducible CPU settings
    (`release/numerics.py`): they must be in place before torch starts, and the caller may
    have started torch already (a benchmark, a notebook)."""
    base = (root or default_cache_root()) / f"tiny-glm4moe-{_cache_key()}"
    assets = DemoAssets(base)
    if (base / "DONE").exists():
        return assets
    base.parent.mkdir(parents=True, exist_ok=True)
    with _locked(base.parent / f"{base.name}.lock"):  # two builds at once (parallel tests, two shells) make one
        if (base / "DONE").exists():
            return assets
        _build_in_child(base, log)
    return assets


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing) while the block runs."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_in_child(base: Path, log=print) -> None:
    log("building the demo's tiny GLM-4-MoE (about a minute on 2 cores)")
    env = {**os.environ, **REPRODUCIBLE_CPU_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "release.tiny", "--root", str(base.parent)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0 or not (base / "DONE").exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ReleaseError(f"building the demo assets failed:\n{tail}", hint="run `python -m release.tiny` to see why")


def _build_here(root: Path, log=print) -> DemoAssets:
    """The build itself, in this process (which must have started with the pinned settings)."""
    pin_reproducible_cpu()
    base = root / f"tiny-glm4moe-{_cache_key()}"
    assets = DemoAssets(base)
    if (base / "DONE").exists():
        return assets
    tmp = base.with_name(base.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    _build(DemoAssets(tmp), log)
    (tmp / "DONE").write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
    if base.exists():  # another process finished first; keep theirs
        shutil.rmtree(tmp)
    else:
        tmp.rename(base)
    return assets


def corpus_texts() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) of the shipped demo corpus."""
    doc = json.loads(lzma.decompress(corpus_bytes()))
    return [d["text"] for d in doc["train"]], [d["text"] for d in doc["heldout"]]


def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def _chunks(texts: list[str], n: int, rng: random.Random, lo: int, hi: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        t = rng.choice(texts)
        if len(t) < hi + 10:
            continue
        s = rng.randrange(0, len(t) - hi)
        out.append(t[s : s + rng.randrange(lo, hi)])
    return out


def _build(assets: DemoAssets, log) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    torch.manual_seed(0)
    random.seed(0)
    train_text, heldout_text = corpus_texts()
    tok = _train_tokenizer(train_text)
    cfg = Glm4MoeConfig(
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        **TINY_ARCH,
    )
    model = Glm4MoeForCausalLM(cfg)
    with torch.no_grad():  # exercise the correction bias, as GLM-4.7's router is trained with one
        for layer in model.model.layers[cfg.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.01)

    ids = tok("\n".join(train_text), return_tensors="pt").input_ids[0]
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    t0 = time.time()
    for step in range(TRAIN_STEPS):
        idx = torch.randint(0, ids.numel() - TRAIN_SEQ - 1, (TRAIN_BATCH,), generator=gen)
        batch = torch.stack([ids[i : i + TRAIN_SEQ] for i in idx])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 60 == 0 or step == TRAIN_STEPS - 1:
            log(f"  tiny model: step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    model.to(torch.bfloat16)  # type: ignore[arg-type]  # transformers' decorator hides to()'s signature
    model.generation_config.do_sample = False
    model.save_pretrained(assets.model)
    tok.save_pretrained(assets.model)
    _append_mtp_layer(assets.model, cfg, load_file, save_file)

    _write_texts(assets, train_text, heldout_text)


def _write_texts(assets: DemoAssets, train_text: list[str], heldout_text: list[str]) -> None:
    """The demo's calibration conversations and held-out texts, from the corpus's halves."""
    rng = random.Random(1)
    questions = _chunks(train_text, N_CALIBRATION, rng, 80, 200)
    answers = _chunks(train_text, N_CALIBRATION, rng, 200, 600)
    with assets.calibration.open("w") as f:
        for q, a in zip(questions, answers):
            msgs = [
                {"role": "user", "content": "Explain this code:\n" + q},
                {"role": "assistant", "content": a},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    assets.heldout.write_text(json.dumps([t[:2000] for t in heldout_text[:N_HELDOUT]], indent=0))


def demo_texts(folder: Path) -> tuple[Any, DemoAssets]:
    """The demo's tokenizer, calibration file and held-out texts without its model, for a
    benchmark that brings a model of its own (benchmarks/synthetic.py): the files
    `ensure_demo_assets` writes, in seconds where its model takes a minute or more of training on
    each fresh machine. Returns the tokenizer and `folder` as assets (no `model` there)."""
    folder.mkdir(parents=True, exist_ok=True)
    train_text, heldout_text = corpus_texts()
    assets = DemoAssets(folder)
    _write_texts(assets, train_text, heldout_text)
    return _train_tokenizer(train_text), assets


def _append_mtp_layer(model_dir: Path, cfg, load_file, save_file) -> None:
    """Store a GLM-style MTP layer as model.layers.{N}.*, as GLM-4.7's checkpoint does.

    transformers does not model the MTP layer (it ignores these keys on load), which is
    exactly why llm-compressor drops them on save. Its decoder block is a copy of the last
    layer's trained weights: the demo needs the tensors to exist, not to predict well.
    """
    import torch

    path = model_dir / "model.safetensors"
    sd = load_file(str(path))
    n, last = cfg.num_hidden_layers, cfg.num_hidden_layers - 1
    for k in list(sd):
        if k.startswith(f"model.layers.{last}."):
            sd[k.replace(f"model.layers.{last}.", f"model.layers.{n}.", 1)] = sd[k].clone()
    g = torch.Generator().manual_seed(7)
    h = cfg.hidden_size
    p = f"model.layers.{n}."
    sd[p + "eh_proj.weight"] = (torch.randn(h, 2 * h, generator=g) * 0.02).to(torch.bfloat16)
    sd[p + "enorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    sd[p + "hnorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    sd[p + "shared_head.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    sd[p + "shared_head.head.weight"] = sd["lm_head.weight"].clone()
    sd[p + "embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(path), metadata={"format": "pt"})


def main() -> None:
    """`python -m release.tiny [--root DIR]`: build the demo assets in this process."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--root", type=Path, default=None)
    a = ap.parse_args()
    print(_build_here(a.root or default_cache_root()).root)


if __name__ == "__main__":  # pragma: no cover
    main()
