import pytest

from release.config import load_config
from release.errors import ReleaseError
from release.verify.branch import load_heldout, vllm_check


def test_vllm_check_says_skipped_and_why_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the skip path is for CPU-only machines")
    line, failed = vllm_check(tmp_path)
    assert line == "vLLM check skipped: no CUDA GPU on this machine"
    assert not failed and "passed" not in line


def test_heldout_must_be_a_list_of_texts(write_config, tmp_path):
    bad = tmp_path / "heldout.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(ReleaseError, match="must be a non-empty JSON list of strings"):
        load_heldout(load_config(write_config({"verify.heldout": str(bad)})))


@pytest.mark.slow
def test_streaming_equals_the_in_memory_load(demo_release, demo_assets):
    """The layer-by-layer comparison gives the log-probabilities of the whole model loaded with
    transformers (which decompresses the branch on load), for the base and every branch: the
    same KL, top-1 and perplexity as the in-memory verify (measured: bit for bit)."""
    import torch

    from release.verify.branch import BaseReference, in_memory_logprobs
    from release.verify.stream import stream_compare

    cfg = demo_release["config"]
    ref = BaseReference(demo_assets.model, load_heldout(cfg), cfg.verify.max_tokens)
    branches = {b.name: cfg.output_dir / b.name for b in cfg.branches}
    base, results = stream_compare(demo_assets.model, branches, ref.batches)
    pairs = [(base.logprobs, in_memory_logprobs(demo_assets.model, ref.batches))]
    pairs += [(results[n].logprobs, in_memory_logprobs(d, ref.batches)) for n, d in branches.items()]
    worst = 0.0
    for streamed, loaded in pairs:
        for a, b in zip(streamed, loaded):
            worst = max(worst, (a - b).abs().max().item())
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    print(f"largest log-probability difference, streamed vs loaded: {worst:.3g}")
    quality = demo_release["result"].quality
    for name in branches:
        p = base.logprobs
        q = results[name].logprobs
        kl = sum((x.exp() * (x - y)).sum().item() for x, y in zip(p, q)) / sum(x.shape[0] for x in p)
        assert kl == pytest.approx(quality[name].mean_kl, abs=1e-6)


@pytest.mark.slow
def test_one_piece_of_each_model_is_resident_at_a_time(demo_release, demo_assets, monkeypatch):
    import release.verify.stream as stream

    cfg = demo_release["config"]
    live: dict[str, str] = {}
    seen: list[str] = []
    most = [0]
    real = stream._materialized

    from contextlib import contextmanager

    @contextmanager
    def tracked(module, tensors, device, what):
        model = what.split(": ")[0]
        assert model not in live, f"{model}: {what} while {live[model]} is resident"
        live[model] = what
        most[0] = max(most[0], len(live))
        seen.append(what)
        try:
            with real(module, tensors, device, what) as m:
                yield m
        finally:
            del live[model]
        assert all(p.device.type == "meta" for p in module.parameters()), f"{what} was not released"

    monkeypatch.setattr(stream, "_materialized", tracked)
    ref_texts = load_heldout(cfg)[:2]
    from release.verify.branch import BaseReference

    ref = BaseReference(demo_assets.model, ref_texts, 64)
    stream.stream_compare(demo_assets.model, {"W4A16_GS64": cfg.output_dir / "W4A16_GS64"}, ref.batches)
    assert most[0] == 1, "one piece of one model at a time"
    per_model = {m: [w for w in seen if w.startswith(m + ":")] for m in {w.split(": ")[0] for w in seen}}
    assert len(per_model) == 2
    for pieces in per_model.values():  # every piece read once: embeddings, 4 layers, norm, lm_head
        assert [p.split(": ")[1] for p in pieces] == [
            "model.embed_tokens.",
            *[f"model.layers.{i}." for i in range(4)],
            "model.norm.",
            "lm_head.",
        ]


@pytest.mark.slow
def test_verify_records_each_layers_divergence(demo_release):
    for name, q in demo_release["result"].quality.items():
        assert q.method == "streamed layer by layer on cpu (float32)"
        assert [d["layer"] for d in q.layers] == [0, 1, 2, 3], name
        for d in q.layers:
            assert 0 < d["rel_error"] < 0.2 and 0.99 < d["cosine"] <= 1.0, (name, d)
    gs = {n: q.layers[0]["rel_error"] for n, q in demo_release["result"].quality.items()}
    assert gs["W4A16_GS32"] < gs["W4A16_GS64"] < gs["W4A16_GS128"], "finer groups, smaller error"


def test_decode_is_skipped_and_said_where_the_branch_does_not_fit(tmp_path, monkeypatch):
    import release.verify.branch as verify

    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    monkeypatch.setattr(verify.os, "sysconf", lambda name: 1000 if name == "SC_PHYS_PAGES" else 1)
    fits, why = verify._fits_in_memory(tmp_path)
    assert not fits and why.startswith("the branch needs ~0.0 GiB dequantized on the host (this machine has 0 GiB)")
    monkeypatch.setattr(verify, "DECODE_MAX_BYTES", 1000)
    monkeypatch.setattr(verify.os, "sysconf", lambda name: 1 << 20)
    fits, why = verify._fits_in_memory(tmp_path)
    assert not fits and why.endswith("at this size the vLLM check decodes"), "over 4 GiB: no host decode"
    monkeypatch.setattr(verify, "DECODE_MAX_BYTES", 1 << 30)
    assert verify._fits_in_memory(tmp_path) == (True, "")


def test_a_verify_record_reads_back_as_the_report_it_was(tmp_path):
    """build-all keeps a skipped branch's earlier verify.json as a QualityReport: the same
    fields, the keys other tools added to the file (vllm-check's) left in the file."""
    from release.verify.branch import QualityReport

    report = QualityReport(
        branch="W4A16_GS64", passed=True, heldout_texts=2, heldout_tokens=10, mean_kl=0.01, top1_agreement=0.9,
        base_perplexity=5.0, branch_perplexity=5.1, max_kl=0.05, min_top1=0.8, decode_prompt="p", decode_text="t",
        vllm="vLLM check skipped: no GPU", layers=[{"layer": 0, "rel_error": 0.1, "cosine": 0.99}],
    )  # fmt: skip
    record = {**report.to_json(), "vllm_run": {"top1_agreement": 1.0}}
    assert QualityReport.from_json(record) == report
    assert report.summary() == "[W4A16_GS64] verify: KL 0.01000, top-1 0.900, ppl 5.10 (base 5.00) -> PASSED"
    assert report.to_text().splitlines()[:2] == [
        "W4A16_GS64: PASSED",
        "  mean KL 0.010000 (max 0.05), top-1 agreement 0.9000 (min 0.8)",
    ]


@pytest.mark.slow
def test_read_ahead_reads_the_next_pieces_in_threads_and_changes_no_bit(demo_release, demo_assets, monkeypatch):
    """The pieces to come are read by the pool's threads at most `read_ahead` before they are
    materialized, and the log-probabilities and divergences are those of reading each piece
    when it is needed (read_ahead=0)."""
    import threading

    import torch

    import release.verify.stream as stream
    from release.verify.branch import BaseReference

    cfg = demo_release["config"]
    ref = BaseReference(demo_assets.model, load_heldout(cfg)[:2], 64)
    branches = {"W4A16_GS64": cfg.output_dir / "W4A16_GS64"}
    base0, res0 = stream.stream_compare(demo_assets.model, branches, ref.batches, read_ahead=0)

    reads: list[tuple[str, str]] = []
    materialized: list[int] = []
    real_read, real_mat = stream.Checkpoint.read, stream._materialized

    def read(self, prefix, device):
        reads.append((threading.current_thread().name, prefix))
        return real_read(self, prefix, device)

    def mat(module, tensors, device, what):
        materialized.append(len(reads))
        return real_mat(module, tensors, device, what)

    monkeypatch.setattr(stream.Checkpoint, "read", read)
    monkeypatch.setattr(stream, "_materialized", mat)
    base, res = stream.stream_compare(demo_assets.model, branches, ref.batches, read_ahead=2)
    assert len(reads) == len(materialized) == 2 * 7, "every piece of both models read once"
    assert all(t.startswith("glmrel-verify-read") for t, _ in reads), "read by the pool's threads"
    for k, issued in enumerate(materialized):  # when piece k is materialized: read up to k + 2
        assert k + 1 <= issued <= k + 3, (k, issued)
    for a, b in zip(base0.logprobs + res0["W4A16_GS64"].logprobs, base.logprobs + res["W4A16_GS64"].logprobs):
        assert torch.equal(a, b)
    assert res0["W4A16_GS64"].layers == res["W4A16_GS64"].layers


@pytest.mark.slow
def test_a_read_that_fails_in_a_thread_fails_the_verify_and_stops_the_pool(demo_release, demo_assets, monkeypatch):
    import threading

    import release.verify.stream as stream
    from release.verify.branch import BaseReference

    cfg = demo_release["config"]
    ref = BaseReference(demo_assets.model, load_heldout(cfg)[:1], 32)
    real_read = stream.Checkpoint.read

    def read(self, prefix, device):
        if prefix == "model.layers.2.":
            raise OSError(f"read error in {self.folder}")
        return real_read(self, prefix, device)

    monkeypatch.setattr(stream.Checkpoint, "read", read)
    with pytest.raises(OSError, match="read error"):
        stream.stream_compare(demo_assets.model, {"W4A16_GS64": cfg.output_dir / "W4A16_GS64"}, ref.batches)
    assert not [t for t in threading.enumerate() if t.name.startswith("glmrel-verify-read")], "the pool is shut down"
