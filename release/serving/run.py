"""Load one branch in a real vLLM and score it (run by the vLLM environment's Python, in a
process of its own: `glmrel vllm-check` starts it; glmrel never imports this module).

    PYTHON release/serving/run.py BRANCH_DIR CASES.json OUT.json
    PYTHON release/serving/run.py --mtp N BRANCH_DIR CASES.json OUT.json

CASES.json: {"sequences": [[token ids], ...], "reference_top1": [[ids], ...], "chat": [messages]}.
For every sequence it asks vLLM (bfloat16, eager) for the prompt logprobs (teacher forcing) and
compares vLLM's top-1 next token at each position with the reference's (transformers'), and
records how far vLLM's logprob of the reference token is from its own top-1 where they
differ (the largest such gap; positions where the reference is outside vLLM's top 20 counted). Then it serves the branch with vLLM's OpenAI server and asks one chat completion, which
goes through the branch's own chat template. Writes figures, versions and the device to OUT.json.

With --mtp N it loads the branch with its kept MTP layer as the drafter of N speculative
tokens (`speculative_config={"method": "mtp"}`), generates greedily from the first tokens of
each sequence, and writes vLLM's speculative-decoding counters: drafts, draft tokens,
accepted tokens (in all and per position) and the acceptance rate.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request

# the fraction of memory vLLM reserves (on CPU: of host RAM, for its KV cache); a small model
# with 1,024-token sequences needs little, and a CI machine shares its memory with the tests
TOP_K = 20  # logprobs per position: where vLLM's top-1 differs, where transformers' choice ranks
MEMORY = float(os.environ.get("GLMREL_VLLM_MEMORY", "0.1"))


def _score(branch: str, cases: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    llm = LLM(
        model=branch, dtype="bfloat16", enforce_eager=True, max_model_len=1024, seed=0, gpu_memory_utilization=MEMORY
    )
    load_s = time.time() - t0
    params = SamplingParams(max_tokens=1, prompt_logprobs=TOP_K, temperature=0.0)
    agree = total = outside = 0
    worst_gap = 0.0
    for ids, ref in zip(cases["sequences"], cases["reference_top1"]):
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        # prompt_logprobs[i] scores token i given tokens < i: position i-1's next-token guess
        for pos in range(1, len(ids)):
            lp = out.prompt_logprobs[pos]
            top = min(lp.items(), key=lambda kv: kv[1].rank)
            want = ref[pos - 1]
            total += 1
            if top[0] == want:
                agree += 1
            elif want in lp:  # how much less likely vLLM finds transformers' choice
                worst_gap = max(worst_gap, top[1].logprob - lp[want].logprob)
            else:
                outside += 1
    return {
        "load_s": round(load_s, 1),
        "positions": total,
        "top1_agree": agree,
        "max_logprob_gap": round(worst_gap, 4),
        f"reference_outside_top{TOP_K}": outside,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chat(branch: str, messages: list) -> dict:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", branch, "--served-model-name", "branch"]
        + ["--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "1024", "--port", str(port)]
        + ["--gpu-memory-utilization", str(MEMORY)]
        + ["--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if server.poll() is not None:
                err = server.stderr.read() if server.stderr else ""
                return {"error": f"the server exited ({server.returncode}): {err[-800:]}"}
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            return {"error": "the server did not come up in 300 s"}
        body = {"model": "branch", "messages": messages, "max_tokens": 24, "temperature": 0}
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
        choice = reply["choices"][0]
        return {
            "completion_tokens": reply["usage"]["completion_tokens"],
            "prompt_tokens": reply["usage"]["prompt_tokens"],
            "text": choice["message"].get("content") or "",
        }
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


MTP_PROMPT_TOKENS, MTP_NEW_TOKENS = 16, 32


def _mtp(branch: str, cases: dict, n: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    llm = LLM(
        model=branch,
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=1024,
        seed=0,
        gpu_memory_utilization=MEMORY,
        speculative_config={"method": "mtp", "num_speculative_tokens": n},
        disable_log_stats=False,
    )
    load_s = time.time() - t0
    prompts = [TokensPrompt(prompt_token_ids=ids[:MTP_PROMPT_TOKENS]) for ids in cases["sequences"]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=MTP_NEW_TOKENS, temperature=0.0), use_tqdm=False)
    counters: dict = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode_"):
            key = m.name[len("vllm:spec_decode_") :]
            if hasattr(m, "values"):
                old = counters.get(key) or [0] * len(m.values)
                counters[key] = [a + b for a, b in zip(old, m.values)]
            elif hasattr(m, "value"):
                counters[key] = counters.get(key, 0) + m.value
    drafted = counters.get("num_draft_tokens", 0)
    accepted = counters.get("num_accepted_tokens", 0)
    drafts = counters.get("num_drafts", 0)
    return {
        "num_speculative_tokens": n,
        "load_s": round(load_s, 1),
        "prompts": len(prompts),
        "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
        "drafts": int(drafts),
        "draft_tokens": int(drafted),
        "accepted_tokens": int(accepted),
        "accepted_per_position": [int(v) for v in counters.get("num_accepted_tokens_per_pos", [])],
        "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
        # vLLM's own figure: tokens per target forward (1 + accepted per draft)
        "mean_acceptance_length": round(1 + accepted / drafts, 4) if drafts else None,
    }


def main() -> None:
    args = sys.argv[1:]
    if args[0] == "--mtp":
        n, (branch, cases_path, out_path) = int(args[1]), args[2:5]
        _write(out_path, _mtp(branch, json.loads(open(cases_path).read()), n))
        return
    branch, cases_path, out_path = args[0:3]
    cases = json.loads(open(cases_path).read())
    import torch
    import vllm

    result = {
        "engine": "vllm",
        "version": vllm.__version__,
        "torch": torch.__version__,
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(0),
        "dtype": "bfloat16",
    }
    result.update(_score(branch, cases))
    result["chat"] = _chat(branch, cases["chat"])
    _write(out_path, result)


def _write(out_path: str, result: dict) -> None:
    """The result, whole or not at all: written beside, then renamed into place (vLLM's CPU
    build may abort as the process exits; glmrel keeps a result that is all there)."""
    with open(out_path + ".part", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out_path + ".part", out_path)


if __name__ == "__main__":
    main()
