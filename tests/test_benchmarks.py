"""The scale benchmark's report, from the records of its GPU runs committed in benchmarks/results."""

import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from benchmarks.scale import table

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "2026-11-27-h200-scale-glm47-2layer"


def test_report_from_recorded_gpu_runs():
    records = json.loads((RESULTS / "n16-32-v1.json").read_text())
    text = table(records)
    assert "| stock | 16 | 1 | MoE |" in text and "| glmrel | 32 | 1 | MoE |" in text
    assert "| 16 | 1 | MoE | 80.6 | 64.8 | 1.24x |" in text, "ratio = stock / glmrel of calibrate + smooth"
    assert "stock: per extra sample, peak GPU +807.7 MiB, peak host +1150.1 MiB" in text
    assert "glmrel: per extra sample, peak GPU +21.1 MiB, peak host +43.5 MiB" in text


def test_recorded_runs_are_the_engines_they_claim():
    for f in RESULTS.glob("*.json"):
        for r in json.loads(f.read_text()):
            assert r["engine"] in ("stock", "glmrel")
            if r["engine"] == "stock":
                assert r["expert_tokens_kept"] == 0, "stock keeps every token (no sampled caches)"
            assert "H200" in (r["gpu"] or ""), f"{f.name}: recorded on {r['gpu']}"


@pytest.mark.slow
def test_tiny_side_by_side_runs(tmp_path):
    """The benchmark itself, on the tiny model on CPU, as CI runs it (`make bench-scale`)."""
    import os

    out = tmp_path / "records.json"
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(  # --work relative to the working directory, as `make bench-scale` passes it
        [sys.executable, "-m", "benchmarks.scale", "--preset", "tiny", "--samples", "1,2", "--seq", "32"]
        + ["--work", "work", "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert sorted((r["engine"], r["samples"]) for r in records) == [
        ("glmrel", 1),
        ("glmrel", 2),
        ("stock", 1),
        ("stock", 2),
    ]
    for r in records:
        assert [layer["mappings"] for layer in r["layers"]] == [3, 11, 11, 11], (
            "1 dense + 3 MoE layers, every one timed"
        )
        assert r["oneshot_s"] > 0 and r["peak_host_gib"] > 0
        assert len(r["weights_digest"]) == 32
    assert "| 2 | 1 | MoE |" in proc.stdout and "stock / glmrel" in proc.stdout
    assert "stock: per extra sample" in proc.stdout and "glmrel: per extra sample" in proc.stdout


def test_multi_gpu_report_pairs_each_run_with_one_gpu():
    from benchmarks.scale import report

    layer = {"calib_s": 1.0, "smooth_s": 3.0, "peak_gpu_gib": 1.0, "peak_host_gib": 2.0, "mappings": 3}
    base = {"engine": "glmrel", "samples": 8, "tokens": 100, "dense_layers": 1, "oneshot_s": 5.0}
    base |= {"peak_gpu_gib": 1.0, "peak_host_gib": 2.0, "layers": [layer]}
    fast = dict(layer, calib_s=0.5, smooth_s=1.5)
    agreement = {"mappings": 3, "same_1e-2": 3, "min_cosine": 0.99999}
    ranks = [
        {"rank": 0, "allreduce_wait_s": 0.4, "layers": [{"calib_s": 0.5, "smooth_s": 1.5}]},
        {"rank": 1, "allreduce_wait_s": 0.0, "layers": [{"calib_s": 0.9, "smooth_s": 1.1}]},
    ]
    records = [dict(base, gpus=1), dict(base, gpus=2, layers=[fast], scales_vs_1gpu=agreement, ranks=ranks)]
    text = report(records)
    assert "rank 0: 0.5 + 1.5, wait 0.4; rank 1: 0.9 + 1.1, wait 0.0" in text
    assert "| 8 | 2 | 0 | dense | 4.0 | 2.0 | 2.00x |" in text
    assert "N=8, 2 GPUs: 3/3 mappings chose the same scales (1e-2) as on one GPU; min cosine 0.99999" in text
    assert "| glmrel | 8 | 0 | dense |" in text.split("| samples | GPUs |")[0], "the 1-GPU table lists 1-GPU runs"


def test_multi_gpu_scales_are_compared_whichever_run_came_first(tmp_path):
    """--gpus 4,1 or --append across device calls: the 1-GPU scales may be saved after the
    multi-GPU run's; each multi-GPU record is compared once both files exist."""
    import torch

    from benchmarks.scale import _compare_scales

    one, four = tmp_path / "one.pt", tmp_path / "four.pt"
    torch.save({"a": torch.ones(4), "b": torch.ones(4)}, one)
    torch.save({"a": torch.ones(4), "b": torch.tensor([1.0, 1.0, 1.0, 2.0])}, four)
    records = [{"engine": "glmrel", "samples": 8, "gpus": 4, "scales_file": str(four)}]
    _compare_scales(records)  # no 1-GPU run yet: nothing to compare with
    assert "scales_vs_1gpu" not in records[0]
    records.append({"engine": "glmrel", "samples": 8, "gpus": 1, "scales_file": str(one)})
    _compare_scales(records)
    assert records[0]["scales_vs_1gpu"]["same_1e-2"] == 1 and records[0]["scales_vs_1gpu"]["mappings"] == 2
    assert "scales_vs_1gpu" not in records[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "0"], "--gpus takes GPU counts of 1 or more"),
        (["--gpus", "two"], "--gpus takes GPU counts of 1 or more"),
        (["--append"], "--append adds to the records of --json FILE: pass --json too"),
    ],
)
def test_scale_benchmark_rejects_bad_gpu_options(tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--work", str(tmp_path), *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode != 0 and message in proc.stderr
    assert not any(tmp_path.iterdir()), "nothing built before the options are checked"


def test_report_of_the_same_run_comparison_at_64_samples():
    """The figures benchmarks/results/README.md quotes for N=64 come from these records."""
    from benchmarks.scale import report

    text = report(json.loads((RESULTS / "n64-stock-vs-glmrel.json").read_text()))
    assert "| 64 | 1 | MoE | 247.2 | 76.4 | 3.24x |" in text and "| 64 | 0 | dense | 25.6 | 21.6 | 1.18x |" in text
    gpus = report(json.loads((RESULTS / "n64-1-vs-2gpu-glmrel.json").read_text()))
    assert (
        "| 64 | 2 | 1 | MoE | 69.1 | 54.4 | 1.27x |" in gpus and "| 64 | 2 | 0 | dense | 27.0 | 14.6 | 1.85x |" in gpus
    )


def test_report_of_the_gram_engine_against_stock():
    """Run E: the default engine and stock in one run, N=64 (the figures benchmarks/results/README.md quotes)."""
    from benchmarks.scale import report

    records = json.loads((RESULTS / "n64-stock-vs-glmrel-gram.json").read_text())
    assert {r["engine"]: r["awq_options"]["expert_search"] for r in records} == {"glmrel": "gram", "stock": "sampled"}
    text = report(records)
    assert "| 64 | 1 | MoE | 274.8 | 64.5 | 4.26x |" in text
    gpus = report(json.loads((RESULTS / "n32-1-vs-2gpu-gram.json").read_text()))
    assert "| 32 | 2 | 1 | MoE | 42.1 | 43.7 | 0.96x |" in gpus
    assert "164/166 mappings chose the same scales" in gpus


def test_report_of_the_deferred_write_back_runs():
    """Runs H, I, J and K (the figures benchmarks/results/README.md quotes): the write-back alone, same weights;
    glmrel against stock in one run; 512 samples on an 80 GiB H100; 2 GPUs with the split
    write-back checked."""
    from benchmarks.scale import report

    off, on = (json.loads((RESULTS / f"n32-patch11-{x}-783e310.json").read_text())[0] for x in ("off", "on"))
    assert off["weights_digest"] == on["weights_digest"], "the deferred write-back leaves the weights bit for bit"
    assert off["awq_options"]["deferred_write_back"] is False and on["awq_options"]["deferred_write_back"] is True
    assert on["write_back"]["deferred_writes"] == 659 and off["write_back"]["deferred_writes"] == 0
    moe = [sum(r["layers"][1][k] for k in ("calib_s", "smooth_s")) for r in (off, on)]
    assert round(moe[0], 1) == 57.0 and round(moe[1], 1) == 25.5
    text = report(json.loads((RESULTS / "n16-64-stock64-patch11-601c064.json").read_text()))
    assert "| 64 | 1 | MoE | 252.3 | 31.9 | 7.91x |" in text and "| 64 | 0 | dense | 25.4 | 8.6 | 2.94x |" in text
    assert "glmrel: per extra sample, peak GPU +49.3 MiB" in text
    (big,) = json.loads(
        (RESULTS.parent / "2026-11-27-h100-scale-glm47-2layer" / "n512-glmrel-f089bd1.json").read_text()
    )
    assert "H100" in big["gpu"] and big["samples"] == 512 and big["seq"] == 2048
    moe_layer = big["layers"][1]
    assert moe_layer["reserved_gpu_gib"] < 80 and moe_layer["peak_host_gib"] < 64
    gpus = json.loads((RESULTS / "n64-128-1-vs-2gpu-patch11-a27bcfc.json").read_text())
    text = report(gpus)
    assert (
        "| 64 | 2 | 1 | MoE | 42.5 | 26.6 | 1.60x |" in text and "| 64 | 2 | 0 | dense | 12.3 | 6.1 | 2.00x |" in text
    )
    (two,) = [r for r in gpus if r["gpus"] == 2]
    assert two["write_back"]["checked"] == 497 and two["write_back"]["mismatches"] == 0
    assert "165/166 mappings chose the same scales" in text


def test_report_of_the_batched_balance_runs():
    """Runs L, N and O (the figures benchmarks/results/README.md quotes): batched balance layers on and off with the same weights,
    one GPU against two at N=64 and 256, and each rank's times."""
    from benchmarks.scale import report

    (off,) = json.loads((RESULTS / "n64-patch12-off-790b3d4.json").read_text())
    on = [r for r in json.loads((RESULTS / "n64-1-vs-2gpu-patch12-790b3d4.json").read_text()) if r["gpus"] == 1][0]
    assert off["weights_digest"] == on["weights_digest"], "batched balance layers leaves the weights bit for bit"
    assert off["awq_options"]["batched_balance_layers"] is False and on["awq_options"]["batched_balance_layers"]
    assert off["batched_balance"]["mappings"] == 0 and on["batched_balance"] == {"mappings": 6, "layers": 332}
    assert (off["mapping_s"]["mlp_or_moe_block"], on["mapping_s"]["mlp_or_moe_block"]) == (18.27, 15.15)
    assert "| 64 | 2 | 1 | MoE | 34.2 | 22.4 | 1.53x |" in report(
        json.loads((RESULTS / "n64-1-vs-2gpu-patch12-790b3d4.json").read_text())
    )
    big = json.loads((RESULTS / "n256-1-vs-2gpu-993d808.json").read_text())
    text = report(big)
    assert (
        "| 256 | 2 | 1 | MoE | 104.4 | 59.1 | 1.77x |" in text
        and "| 256 | 2 | 0 | dense | 33.5 | 16.9 | 1.98x |" in text
    )
    assert "166/166 mappings chose the same scales" in text
    assert [r["expert_searches_run"] for r in big] == [160, 80], "each of 2 ranks ran half of the Gram searches"
    ranks = json.loads((RESULTS / "n64-1-vs-2gpu-ranks-1dc78ed.json").read_text())
    text = report(ranks)
    assert "| 64 | 2 | 1 | MoE | 31.5 | 20.3 | 1.55x |" in text
    assert "rank 0: 1.6 + 4.5 / 6.9 + 13.5, wait 2.3; rank 1: 1.9 + 3.7 / 8.1 + 12.2, wait 0.3" in text
    assert ranks[0]["weights_digest"] == on["weights_digest"], (
        "batched balance layers without temporaries: the same weights"
    )


def test_memory_trace_without_a_gpu_says_so(tmp_path):
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the trace would run")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--preset", "tiny", "--memory-trace", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=120,
    )
    assert proc.returncode != 0 and "--memory-trace traces the CUDA allocator" in proc.stderr
    assert not any(tmp_path.iterdir()), "nothing built"


def _frame(name, line=1):
    return {"filename": f"/site/release/{name}.py", "line": line, "name": name}


def test_memory_trace_breakdown_finds_the_peak_and_what_was_alive():
    """benchmarks/gpu_memory.py on a hand-made allocator trace: the peak is the most bytes alive
    at once, and what was alive then is grouped by the code that allocated it."""
    from benchmarks.gpu_memory import breakdown, compare

    torch_frame = {"filename": "/site/torch/nn/functional.py", "line": 9, "name": "linear"}
    events = [
        {"action": "free_requested", "addr": 99, "size": 5, "frames": []},  # allocated before the trace
        {"action": "alloc", "addr": 1, "size": 100, "frames": [torch_frame, _frame("cache")]},
        {"action": "alloc", "addr": 2, "size": 50, "frames": [_frame("search")]},
        {"action": "free_requested", "addr": 2, "size": 50, "frames": []},
        {"action": "alloc", "addr": 3, "size": 70, "frames": [_frame("cache")]},  # peak: 170
        {"action": "free_completed", "addr": 2, "size": 50, "frames": []},
        {"action": "free_requested", "addr": 3, "size": 70, "frames": []},
        {"action": "alloc", "addr": 4, "size": 60, "frames": [_frame("search")]},  # 160: not the peak
    ]
    out = breakdown({"device_traces": [events]}, depth=1)
    assert out["peak_event"] == 4 and out["unmatched_frees"] == 1
    assert [(s["site"], s["count"]) for s in out["sites"]] == [("release/cache.py:1 cache", 2)]
    assert out["sites"][0]["gib"] == round(170 / 2**30, 3)
    a = {"sites": [{"site": "x", "gib": 1.0}, {"site": "y", "gib": 2.0}]}
    b = {"sites": [{"site": "x", "gib": 1.0}, {"site": "y", "gib": 4.0}]}
    rows = compare(a, b, 16, 32)
    assert rows[0].split()[0] == "+128.0" and rows[0].endswith("y")


def test_balance_quantization_benchmark_on_cpu():
    """benchmarks.balance_quant at toy size: stock's per-layer grid-point step and the batched balance layers' give
    the same weights, scales and zero points."""
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.balance_quant",
            "--experts",
            "6",
            "--out",
            "16",
            "--in",
            "256",
            "--reps",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "14 balance layers [16, 256] bf16" in proc.stdout
    assert "ms per grid point" in proc.stdout and "bit for bit: True" in proc.stdout


def test_sync_free_routing_benchmark_on_cpu(tmp_path):
    """benchmarks.sync_free_routing at toy size, across a chunk seam: the masked rows give the
    sliced rows' output bit for bit, and each mode is timed."""
    import subprocess
    import sys

    out = tmp_path / "record.json"
    args = ["--experts", "6", "--top-k", "2", "--hidden", "64", "--inter", "32", "--tokens", "48"]
    args += ["--chunk-bytes", str(2 * 48 * (5 * 32 + 64) * 2)]  # two experts a chunk: three chunks
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sync_free_routing", *args, "--iters", "1", "--repeats", "1"]
        + ["--json", str(out)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["chunks"] == 3 and record["bit_equal"] is True and record["max_abs_diff"] == 0.0
    assert all(len(v) == 1 and v[0] > 0 for v in record["ms_per_call"].values())


def test_engine_ab_times_each_variant_and_compares_its_scales(tmp_path):
    """benchmarks/engine_ab.sh on the CPU at toy size: a synthetic model made once, each variant
    of the engine's options timed by profile_layer, and each variant's chosen scales compared with
    the first's (the fused experts with sync_free_routing choose the same as without)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # python3: this suite's
        "VARIANTS": "fused_on_cpu=true fused_on_cpu=true,sync_free_routing=true",
        **{"N": "2", "SEQ": "32", "PRESET": "tiny", "LAYERS": "2", "DENSE": "1", "DEVICE": "cpu"},
        **{"SYN": str(tmp_path / "syn"), "LIMIT": "500", "MIN_RUN_S": "5"},
        "BASE_SCALES": str(tmp_path / "ab" / "01-fused_on_cpu-true-scales.pt"),
    }
    proc = subprocess.run(
        ["bash", "benchmarks/engine_ab.sh", str(tmp_path / "ab")],
        capture_output=True,
        text=True,
        cwd=repo,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "run 1 (fused_on_cpu=true): exit 0" in proc.stdout and "run 2 (" in proc.stdout, proc.stdout
    records = sorted((tmp_path / "ab").glob("[0-9][0-9]-*.json"))
    assert len(records) == 2 and all(json.loads(r.read_text())["timed"]["oneshot_s"] > 0 for r in records)
    # the code that ran, named by its files' content (a device copy's .git may be older than its files)
    import hashlib

    files = sorted(str(p.relative_to(repo)) for d in ("release", "benchmarks") for p in (repo / d).rglob("*.py"))
    listing = "".join(f"{hashlib.sha256((repo / f).read_bytes()).hexdigest()}  {f}\n" for f in files)
    digest = hashlib.sha256(listing.encode()).hexdigest()[:16]
    assert f"code {digest}" in (tmp_path / "ab" / "machine.txt").read_text()
    # no copies ahead on the CPU (onload-ahead copies to a GPU), so nothing sampled, but recorded
    assert all(json.loads(r.read_text())["timed"]["main_thread_during_copies"]["samples"] == 0 for r in records)
    assert [json.loads(r.read_text())["timed"]["engine_options"] for r in records] == [
        {"fused_on_cpu": True},
        {"fused_on_cpu": True, "sync_free_routing": True},
    ]
    kinds = json.loads(next((tmp_path / "ab").glob("02-*-vs-first.txt")).read_text())
    assert all(k["equal"] == k["mappings"] > 0 for k in kinds.values()), kinds
    # a run's name is its variant's, nothing appended, `=` written `-` (the device tool brings back
    # no file whose name holds an `=`)
    assert [r.name for r in records] == [
        "01-fused_on_cpu-true.json",
        "02-fused_on_cpu-true_sync_free_routing-true.json",
    ]
    # BASE_SCALES (a run of an earlier call): here run 1's own file, compared once it exists
    kinds = json.loads((tmp_path / "ab" / "02-fused_on_cpu-true_sync_free_routing-true-vs-base.txt").read_text())
    assert all(k["equal"] == k["mappings"] > 0 for k in kinds.values()) and "scales vs base:" in proc.stdout, kinds


def test_report_of_the_512_sample_scaling_runs():
    """Runs P and Q (the figures benchmarks/results/README.md quotes): the recipe's 512 x 2048 on 1, 2 and 4 GPUs of
    one 4xH200 machine; one H100 80GB with a 28 GiB resident cache."""
    from benchmarks.scale import report

    records = json.loads((RESULTS / "n512-1-2-4gpu-ec296b7.json").read_text())
    assert sorted(r["gpus"] for r in records) == [1, 2, 4] and {r["samples"] for r in records} == {512}
    text = report(records)
    assert (
        "| 512 | 4 | 1 | MoE | 221.5 | 55.6 | 3.99x |" in text
        and "| 512 | 4 | 0 | dense | 108.0 | 17.6 | 6.14x |" in text
    )
    assert (
        "| 512 | 2 | 1 | MoE | 221.5 | 106.4 | 2.08x |" in text
        and "| 512 | 2 | 0 | dense | 108.0 | 32.2 | 3.35x |" in text
    )
    assert text.count("166/166 mappings chose the same scales") == 2
    by = {r["gpus"]: r for r in records}
    # one GPU sent 560 of its cached batches to host RAM; two and four kept all on the card
    assert by[1]["resident_cache"]["offloaded_batches"] == 560
    assert by[2]["resident_cache"]["offloaded_batches"] == by[4]["resident_cache"]["offloaded_batches"] == 0
    # the MoE block's grid-search forward, which never touches host RAM, scales linearly
    fwd = [by[g]["search_phase_s"]["mlp_or_moe_block"]["forward_loss"] for g in (1, 2, 4)]
    assert fwd == [89.23, 44.53, 22.42]
    (h100,) = json.loads(
        (RESULTS.parent / "2026-11-27-h100-scale-glm47-2layer" / "n512-resident28-ec296b7.json").read_text()
    )
    assert "H100" in h100["gpu"] and h100["awq_options"]["resident_cache_gib"] == 28.0
    dense, moe = h100["layers"]
    assert round(dense["peak_host_gib"], 1) == 55.4 and round(moe["reserved_gpu_gib"], 1) == 65.1
    assert h100["weights_digest"] == by[1]["weights_digest"], "H100 and H200, either budget: the same weights"


def test_rehearsal_finds_a_branch_start_behind_a_progress_bar():
    """Run X recorded its third branch start as "Loading weights: 0%|..." (a tqdm line and the
    branch's "loading" line shared a line of output); the branch is now read from its tag."""
    from benchmarks.rehearsal import BRANCH_START

    line = "Loading weights:   0%|          | 0/35 [00:00<?, ?it/s\r[W4A16_GS128] loading /w/model\n"
    assert BRANCH_START.search(line)[1] == "W4A16_GS128"
    assert BRANCH_START.search("[W4A16_GS32] loading zai-org/GLM-4.7")[1] == "W4A16_GS32"
    assert BRANCH_START.search("offloading the base model's weights") is None
    assert BRANCH_START.search("[W4A16_GS64] from the pass's store: group size 64, in X's layout")[1] == "W4A16_GS64"


@pytest.mark.slow
def test_the_single_pass_benchmark_runs_in_two_calls_on_a_one_layer_model(tmp_path):
    """benchmarks.single_pass as the GPU record ran it (one MoE layer, `--drop`, the pass store
    elsewhere, the two modes in two calls sharing one --json), at CI size: the side branches are
    assembled after the propagating branch's weights (which `--drop` keeps until then), nothing
    is left on disk, and with one decoder layer the side branch is its own build bit for bit (its
    only layer sees the calibration data in both ways)."""
    repo = Path(__file__).resolve().parent.parent

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, cwd=repo)

    syn, work, record = tmp_path / "syn", tmp_path / "work", tmp_path / "sp.json"
    sizes = ["--group-size", "32", "--group-size", "64", "--group-size", "128", "--samples", "8", "--seq", "64"]
    made = run("benchmarks.synthetic", "--preset", "tiny", "--layers", "1", "--dense", "0", "--out", str(syn), *sizes)
    assert made.returncode == 0, made.stderr[-2000:]
    common = [
        "--config",
        str(syn / "release.yaml"),
        "--work",
        str(work),
        "--no-verify",
        "--drop",
        "--json",
        str(record),
    ]
    one = run("benchmarks.single_pass", *common, "--pass-store", str(tmp_path / "store"), "--modes", "one_pass")
    assert one.returncode == 0, one.stderr[-3000:]
    sep = run("benchmarks.single_pass", *common, "--modes", "separate", "--separate-branch", "W4A16_GS128")
    assert sep.returncode == 0, sep.stderr[-3000:]
    r = json.loads(record.read_text())
    assert set(r["builds"]) == {"one_pass", "separate"} and r["wall_ratio"] > 0
    sides = r["builds"]["one_pass"]["branches"]
    assert "load" not in sides["W4A16_GS64"] and sides["W4A16_GS64"]["finish"]["from_store"] > 0
    rows = {row["branch"]: row for row in r["branches"]}
    assert rows["W4A16_GS128"]["differ"] == 0 and rows["W4A16_GS128"]["tensors"] > 0
    assert not list(work.rglob("*.safetensors")) and not list((tmp_path / "store").rglob("*.safetensors"))


@pytest.mark.slow
def test_the_dress_rehearsal_runs_the_release_path(tmp_path):
    """benchmarks.rehearsal at CI size: build-all, check, publish to git and to the Hub double,
    each twice for publish, with its figures recorded per stage."""
    import json

    out = tmp_path / "rehearsal.json"
    args = ["--preset", "tiny", "--layers", "2", "--samples", "4", "--seq", "64", "--device", "cpu"]
    args += ["--work", str(tmp_path / "work"), "--json", str(out)]

    def rehearsal(*more: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "benchmarks.rehearsal", *args, *more],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=Path(__file__).resolve().parent.parent,
        )

    # in calls, as on the device (10 minutes a call): each goes on where the last stopped
    refused = rehearsal("--stages", "check")
    assert refused.returncode != 0 and "run the model stage first" in refused.stderr
    # the model alone (to build from by hand, as under a profiler): no report on a release
    model = rehearsal("--stages", "model")
    assert model.returncode == 0 and "the model and its config only" in model.stdout, model.stderr[-2000:]
    assert json.loads(out.read_text())["stages"] == []
    # a deadline already past when build-all starts: it is cut at once, and recorded so
    cut = rehearsal("--stages", "build", "--deadline", "0.01")
    assert cut.returncode != 0 and "cut at the deadline in build-all" in cut.stderr, cut.stderr[-2000:]
    (first,) = json.loads(out.read_text())["stages"]
    assert first["stage"] == "build-all" and first["cut_at_deadline"] and first["exit"] != 0
    proc = rehearsal("--stages", "build,check,publish")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == [
        "build-all",
        "build-all (resumed)",
        "check GS32",
        "check GS64",
        "check GS128",
        "publish git",
        "publish git again",
        "publish hub",
        "publish hub again",
    ]
    del stages["build-all"]
    assert all(s["exit"] == 0 and s["wall_s"] > 0 and s["disk_gib"] > 0 for s in stages.values())
    built = stages["build-all (resumed)"]["branches"]
    assert [b["branch"] for b in built] == ["W4A16_GS32", "W4A16_GS64", "W4A16_GS128"]
    assert all(b["built_s"] is not None for b in built)
    starts = stages["build-all (resumed)"]["host_rss_at_branch_start_gib"]
    assert [b["branch"] for b in starts] == ["W4A16_GS32", "W4A16_GS64", "W4A16_GS128"]
    assert all(b["host_rss_gib"] > 0 for b in starts)
    for again in ("publish git again", "publish hub again"):
        assert "nothing to do" in stages[again]["output_tail"], stages[again]["output_tail"]
    assert all(v["passed"] and v["method"].startswith("streamed") for v in report["verify"].values())


def _record(path):
    return json.loads((RESULTS.parent / path).read_text())


def _stage(name):
    return lambda r: next(s for s in r["stages"] if s["stage"] == name)["wall_s"]


def _run(i, key):
    return lambda r: r["runs"][i][key]


def _one(key, *path):
    def get(r):
        value = r[0] if isinstance(r, list) else r
        for k in (key, *path):
            value = value[k]
        return value

    return get


def _moe_calibration_s(r):
    """profile_layer --json: the MoE layer's calibration pass (the second subgraph's)."""
    return next(p["s"] for p in r["timed"]["passes"] if p["pass"] == "(2/2): Calibrating")


def _pass_s(name):
    """profile_layer --json: one pipeline pass's seconds, by its name."""
    return lambda r: next(p["s"] for p in r["timed"]["passes"] if p["pass"] == name)


SYNC_FREE_README = RESULTS.parent / "2026-12-07-h100-sync-free-routing" / "README.md"
SYNC_FREE_RUNS = (
    "call1/01-default.json",
    "call1/02-sync-free.json",
    "call1/03-default.json",
    "call2/01-sync-free.json",
    "call2/02-default.json",
    "call2/03-sync-free.json",
)
COPY_README = RESULTS.parent / "2026-12-07-cpu-copy-tensors" / "README.md"
PINNED_README = RESULTS.parent / "2026-12-07-h100-pinned-onload-ahead" / "README.md"
PINNED_RUNS = ("call1/01-default.json", "call2/01-pinned.json", "call2/02-pageable.json")
CAUSAL = "2026-12-07-h100-causal-calibration-attention-and-offload"
CAUSAL_README = RESULTS.parent / CAUSAL / "README.md"
CAUSAL_RUNS = ("run1-default.json", "run2-causal.json", "run3-default.json")
ROPE = "2026-12-07-h100-fused-rope-and-offload-save-split"
ROPE_README = RESULTS.parent / ROPE / "README.md"
DOCS = RESULTS.parent.parent.parent / "docs" / "performance.md"  # the figures users read
ACCOUNT = RESULTS.parent / "README.md"  # the run-by-run account docs/performance.md links to
# Every figure a document quotes from a committed record: (document, record, how to read the
# value from it, how the document writes it). The test reads each from its record, so a
# document that drifts from its record fails, and no figure is written twice in the suite.
CITED = [
    (ACCOUNT, "2026-11-30-h200x2-offload-glm47-4layer/U-1gpu-ram-vs-offload.json", _run(0, "wall_s"), "{:.1f} s"),
    (ACCOUNT, "2026-11-30-h200x2-offload-glm47-4layer/U-1gpu-ram-vs-offload.json", _run(1, "wall_s"), "{:.1f} s"),
    (
        ACCOUNT,
        "2026-11-30-h200x2-offload-glm47-4layer/U-1gpu-ram-vs-offload.json",
        _run(0, "peak_host_rss_gib"),
        "{:.1f} GiB",
    ),
    (
        ACCOUNT,
        "2026-11-30-h200x2-offload-glm47-4layer/U-1gpu-ram-vs-offload.json",
        _run(1, "peak_host_rss_gib"),
        "{:.1f} GiB",
    ),
    (DOCS, "2026-11-30-h200x2-offload-glm47-4layer/Y-2gpu-offload-cgroup34.8.json", _run(0, "wall_s"), "{:.1f} s"),
    (DOCS, "2026-12-03-h200-offload-direct-load/call1-ram-512.json", _run(0, "wall_s"), "{:.1f} s"),
    (DOCS, "2026-12-03-h200-offload-direct-load/call2-offload-512.json", _run(0, "wall_s"), "{:.1f} s"),
    (ACCOUNT, "2026-12-03-h200-offload-direct-load/call1-ram-512.json", _run(0, "wall_s"), "{:.1f} s"),
    (ACCOUNT, "2026-12-03-h200-offload-direct-load/call2-offload-512.json", _run(0, "wall_s"), "{:.1f} s"),
    (
        DOCS,
        "2026-12-03-h200-offload-direct-load/call2-offload-512.json",
        _run(0, "peak_offload_folder_gib"),
        "{:.1f} GiB",
    ),
    (DOCS, "2026-11-30-h200x2-rehearsal-glm47-2layer/run-X-c465fcc-2gpu.json", _stage("build-all"), "{:.1f} s"),
    (ACCOUNT, "2026-11-30-h200x2-rehearsal-glm47-2layer/run-X-c465fcc-2gpu.json", _stage("build-all"), "{:.1f} s"),
    (DOCS, "2026-11-30-h200x2-rehearsal-glm47-2layer/run-X-c465fcc-2gpu.json", _stage("publish hub"), "{:.1f} s"),
    (
        ACCOUNT,
        "2026-11-30-h200x2-rehearsal-glm47-2layer/run-X-c465fcc-2gpu.json",
        _stage("publish hub again"),
        "{:.1f} s",
    ),
    (
        DOCS,
        "2026-11-30-h200x2-rehearsal-glm47-2layer/run-X-c465fcc-2gpu.json",
        lambda r: " / ".join(f"{b['host_rss_gib']:.2f}" for b in _stage_record(r)["host_rss_at_branch_start_gib"]),
        "{} GiB",
    ),
    (ACCOUNT, "2026-11-30-h200-engine-package-before-after/before-9fb33a4.json", _one("oneshot_s"), "{:.1f}"),
    (ACCOUNT, "2026-11-30-h200-engine-package-before-after/after-7a5957d.json", _one("oneshot_s"), "{:.1f} s"),
    *[
        (RESULTS.parent / "2026-11-30-h200-engine-extension-before-after" / "README.md", f, get, fmt)
        for f in (
            "2026-11-30-h200-engine-extension-before-after/before-9fb33a4.json",
            "2026-11-30-h200-engine-extension-before-after/after-8c22299.json",
        )
        for get, fmt in ((_one("oneshot_s"), "{:.1f} s"), (_one("weights_digest"), "`{}`"))
    ],
    *[
        (RESULTS.parent / "2026-12-03-h200-house-digest" / "README.md", f, get, fmt)
        for f in ("2026-12-03-h200-house-digest/loop-fused-off.json", "2026-12-03-h200-house-digest/fused-on.json")
        for get, fmt in ((_one("oneshot_s"), "{:.1f} s"), (_one("weights_digest"), "`{}`"))
    ],
    *[
        (doc, f"2026-12-03-h200-batched-hooks-moe-layer/{run}-512.json", get, fmt)
        for doc in (DOCS, RESULTS.parent / "2026-12-03-h200-batched-hooks-moe-layer" / "README.md")
        for run in ("before-87dccd0", "routed-down")
        for get, fmt in ((_moe_calibration_s, "{:.2f} s"), (_one("timed", "oneshot_s"), "{:.2f}"))
    ],
    *[
        (
            RESULTS.parent / "2026-12-03-h200-search-kernels" / "README.md",
            f"2026-12-03-h200-search-kernels/{f}",
            get,
            fmt,
        )
        for f, get, fmt in (
            ("call2-search-512.json", _one("timed", "layers", 0, "smooth_s"), "{:.2f} s"),
            ("call2-search-512.json", _one("timed", "search_phase_s", "attention_qkv", "forward_loss"), "{:.2f} s"),
            ("call2-search-512.json", _one("timed", "search_phase_s", "mlp_or_moe_block", "forward_loss"), "{:.2f} s"),
            ("call2-search-512.json", _one("timed", "oneshot_s"), "{:.2f} s"),
            ("call3-pass-512.json", _one("timed", "layers", 1, "smooth_s"), "{:.2f} s"),
            ("call3-pass-512.json", _one("timed", "layers", 1, "side_s"), "{:.2f} s"),
            ("call3-pass-512.json", _one("timed", "layers", 0, "smooth_s"), "{:.2f} s"),
            ("call3-pass-512.json", _one("timed", "layers", 0, "side_s"), "{:.2f} s"),
            *[
                ("call3-pass-512.json", _pass_s(f"({k}/3): {phase}"), "{:.2f} s")
                for k in (2, 3)
                for phase in ("Calibrating", "Propagating")
            ],
            ("call1-sf-head-1.json", _one("parts", "moe", "projected_s"), "{:.2f} s"),
            ("call1-sf-new-1.json", _one("parts", "attention_mask_eager", "projected_s"), "{:.2f} s"),
            ("call1-sf-new-1.json", _one("parts", "attention_mask_none", "projected_s"), "{:.2f} s"),
            ("call2-sf-fused.json", _one("parts", "moe", "projected_s"), "{:.2f} s"),
            ("call3-sf-kernels.json", _one("parts", "moe", "projected_s"), "{:.2f} s"),
            ("call2-sbs-causal-64.json", _one("runs", "a", "mean_kl"), "{}"),
            ("call4-sbs-kernels-64.json", _one("runs", "b", "mean_kl"), "{}"),
        )
    ],
    *[
        (doc, f"2026-12-05-h100-side-grid-window/{f}", _one("timed", "layers", 0, "side_s"), "{:.2f} s")
        for doc in (DOCS, RESULTS.parent / "2026-12-05-h100-side-grid-window" / "README.md")
        for f in ("call2-full-256.json", "call2-w2-256.json")
    ],
    (
        RESULTS.parent / "2026-12-05-h100-side-grid-window" / "README.md",
        "2026-12-05-h100-side-grid-window/call2-full-256.json",
        lambda r: r["timed"]["side_grid"]["if_windowed"]["2"],
        "| **2** | **{0[tried_points]}** | **{0[same_choice]} of {0[searches]}** |",
    ),
    (
        RESULTS.parent / "2026-12-05-h100-side-grid-window" / "README.md",
        "2026-12-05-h100-side-grid-window/call2-w2-256.json",
        lambda r: r["timed"]["side_grid"]["searched_points"],
        "{} of 120 (two widened)",
    ),
    *[
        (doc, f"2026-12-05-h200-side-grid-window-512/{f}", _one("timed", "layers", 0, "side_s"), "{:.2f}")
        for doc in (DOCS, RESULTS.parent / "2026-12-05-h200-side-grid-window-512" / "README.md")
        for f in ("call1-full.json", "call2-w2.json", "call3-w2b.json", "call3-full2.json")
    ],
    *[
        (
            RESULTS.parent / "2026-12-05-h200-side-grid-window-512" / "README.md",
            f"2026-12-05-h200-side-grid-window-512/{f}",
            lambda r: (r["timed"]["side_grid"]["searched_points"], r["timed"]["side_grid"]["widened"]),
            "{0[0]} of 120 ({0[1]} widened)",
        )
        for f in ("call2-w2.json", "call3-w2b.json")
    ],
    (
        RESULTS.parent / "2026-12-05-h200-side-grid-window-512" / "README.md",
        "2026-12-05-h200-side-grid-window-512/call1-full.json",
        lambda r: (w := r["timed"]["side_grid"]["if_windowed"]["2"], round(100 * w["loss_excess_max"], 2)),
        "{0[0][same_choice]} of {0[0][searches]} choices equal to the\n  whole grid's, the others' loss {0[1]} % at most",
    ),
    *[
        (doc, f"2026-12-06-profile-calibration-pass/{f}", _moe_calibration_s, "{:.2f} s")
        for doc in (DOCS, RESULTS.parent / "2026-12-06-profile-calibration-pass" / "README.md")
        for f in ("call1/base.json", "call2/base-512.json", "call2/new-512.json")
    ],
    *[
        (
            RESULTS.parent / "2026-12-06-profile-calibration-pass" / "README.md",
            f"2026-12-06-profile-calibration-pass/{f}",
            get,
            fmt,
        )
        for f, get, fmt in (
            ("call1/base.json", _one("profile", "profiled_wall_s"), "wall {} s"),
            ("call1/base.json", _one("profile", "kernel_s"), "GPU kernels {} s"),
            ("call1/base.json", _one("timed", "oneshot_s"), "oneshot {} s"),
            ("call2/base-512.json", _one("timed", "oneshot_s"), "| oneshot | {} s"),
            ("call2/new-512.json", _one("timed", "oneshot_s"), "| {} s |"),
        )
    ],
    *[
        (doc, f"2026-12-07-calibration-pass-waits/{f}", _pass_s(name), "{:.3f} s")
        for doc in (DOCS, ACCOUNT, RESULTS.parent / "2026-12-07-calibration-pass-waits" / "README.md")
        for f in ("call1/new-256.json", "call1/base-256.json", "call1/new2-256.json")
        for name in ("(2/2): Calibrating", "(2/2): Propagating")
    ],
    *[
        (
            RESULTS.parent / "2026-12-07-calibration-pass-waits" / "README.md",
            f"2026-12-07-calibration-pass-waits/{f}",
            get,
            fmt,
        )
        for f in ("call2/base-256.json", "call2/new-256.json", "call2/base2-256.json")
        for get, fmt in ((_pass_s("(2/2): Calibrating"), "{:.3f} s"), (_pass_s("(2/2): Propagating"), "{:.3f} s"))
    ],
    *[
        (
            RESULTS.parent / "2026-12-07-calibration-pass-waits" / "README.md",
            f"2026-12-07-calibration-pass-waits/call1/{f}",
            get,
            fmt,
        )
        for f in ("new-256.json", "base-256.json", "new2-256.json")
        for get, fmt in (
            (_one("timed", "oneshot_s"), "{:.2f} s"),
            (_one("timed", "layers", 0, "gpu_util_calib_pct"), "{:.1f} %"),
        )
    ],
    *[
        (doc, f"2026-12-07-h100-onload-ahead/{f}", _pass_s("(3/3): Calibrating"), "{:.3f} s")
        for doc in (DOCS, ACCOUNT, RESULTS.parent / "2026-12-07-h100-onload-ahead" / "README.md")
        for f in ("call1/new-256.json", "call2/new2-256.json", "call1/off-256.json", "call2/off2-256.json")
    ],
    *[
        (RESULTS.parent / "2026-12-07-h100-onload-ahead" / "README.md", f"2026-12-07-h100-onload-ahead/{f}", get, fmt)
        for f in (
            "call1/base-256.json",
            "call1/off-256.json",
            "call2/off2-256.json",
            "call1/new-256.json",
            "call2/new2-256.json",
        )
        for get, fmt in (
            (_pass_s("(2/3): Calibrating"), "{:.3f} s"),
            (_pass_s("(3/3): Calibrating"), "{:.3f} s"),
            (_one("timed", "oneshot_s"), "{:.2f} s"),
            (_one("timed", "layers", 1, "calib_s"), "{:.3f} s"),
            (lambda r: [row["peak_gpu_gib"] for row in r["timed"]["layers"]], "{0[0]} / {0[1]} GiB"),
        )
    ],
    *[
        (doc, "2026-12-07-h100-onload-ahead/call3/offload-128.json", _run(i, "wall_s"), "{:.1f} s")
        for doc in (DOCS, ACCOUNT, RESULTS.parent / "2026-12-07-h100-onload-ahead" / "README.md")
        for i in (0, 1)
    ],
    *[
        (doc, f"2026-12-07-h100-sync-free-routing/{f}", _pass_s("(3/3): Calibrating"), "{:.3f}")
        for doc in (DOCS, ACCOUNT)
        for f in SYNC_FREE_RUNS
    ],
    *[
        (SYNC_FREE_README, f"2026-12-07-h100-sync-free-routing/{f}", get, fmt)
        for f in SYNC_FREE_RUNS
        for get, fmt in (
            (_pass_s("(2/3): Calibrating"), "{:.3f} s"),
            (_pass_s("(3/3): Calibrating"), "{:.3f} s"),
            (_one("timed", "layers", 1, "calib_s"), "{:.3f} s"),
            (_one("timed", "oneshot_s"), "{:.2f} s"),
        )
    ],
    *[
        (
            SYNC_FREE_README,
            "2026-12-07-h100-sync-free-routing/call1/sync-free-routing-micro.json",
            lambda r, mode=mode: r["ms_per_call"][mode],
            "{0[0]:.3f}, {0[1]:.3f} and {0[2]:.3f} ms",
        )
        for mode in ("sliced", "masked")
    ],
    *[
        (PINNED_README, f"2026-12-07-h100-pinned-onload-ahead/{f}", get, fmt)
        for f in PINNED_RUNS
        for get, fmt in (
            (_pass_s("(2/3): Calibrating"), "{:.3f} s"),
            (_pass_s("(3/3): Calibrating"), "{:.3f} s"),
            (_one("timed", "oneshot_s"), "{:.2f} s"),
            (_one("timed", "onload_ahead", "copy_s"), "{:.3f} s"),
        )
    ],
    *[
        (PINNED_README, f"2026-12-07-h100-pinned-onload-ahead/{f}", _pass_s("(1/3): Propagating"), "{:.3f} s")
        for f in PINNED_RUNS[:2]
    ],
    *[
        (doc, "2026-12-07-h100-pinned-onload-ahead/call1/01-default.json", _pass_s("(3/3): Calibrating"), "{:.3f} s")
        for doc in (DOCS, ACCOUNT)
    ],
    *[
        (
            COPY_README,
            "2026-12-07-cpu-copy-tensors/mtp-carry.json",
            lambda r, mode=mode: [x["s"] for x in r["runs"] if x["mode"] == mode],
            "{0[0]}, {0[1]}, {0[2]}, {0[3]}",
        )
        for mode in ("compressed-tensors", "glmrel")
    ],
    *[
        (COPY_README, f"2026-12-07-cpu-copy-tensors/shard-writes-{via}.json", get, fmt)
        for via in ("save-file", "copy")
        for get, fmt in (
            (_one("peak_rss_gib"), "**{} GiB**"),
            (lambda r: [x["s"] for x in r["runs"]], "{0[0]}, {0[1]}, {0[2]}, {0[3]}"),
            (lambda r: r["digest"][:16], "{}…"),
        )
    ],
    *[
        (doc, f"{CAUSAL}/{f}", _pass_s("(3/3): Calibrating"), "{:.3f}")
        for doc in (DOCS, ACCOUNT, CAUSAL_README)
        for f in CAUSAL_RUNS
    ],
    *[
        (CAUSAL_README, f"{CAUSAL}/{f}", get, fmt)
        for f in CAUSAL_RUNS
        for get, fmt in (
            (_pass_s("(2/3): Calibrating"), "{:.3f} s"),
            (_pass_s("(3/3): Calibrating"), "**{:.3f} s**"),
            (_pass_s("(2/3): Propagating"), "{:.3f} s"),
            (_pass_s("(3/3): Propagating"), "{:.3f} s"),
            (_one("timed", "oneshot_s"), "{:.2f} s"),
            (_one("timed", "onload_ahead", "copy_s"), "{:.3f} s"),
            (lambda r: [row["smooth_s"] for row in r["timed"]["layers"]], "{0[0]:.3f} / {0[1]:.3f} s"),
        )
    ],
    *[
        (doc, f"{CAUSAL}/offload/offload-128.json", _run(i, "wall_s"), "{:.1f} s")
        for doc in (DOCS, ACCOUNT, CAUSAL_README)
        for i in (0, 1)
    ],
    *[
        (
            CAUSAL_README,
            f"{CAUSAL}/offload/offload-128.json",
            lambda r, k=k: [x["timings_s"][k] for x in r["runs"]],
            fmt,
        )
        for k in ("load", "oneshot", "save", "seal")
        for fmt in ("| {0[0]} s | {0[1]} s |",)
    ],
    *[
        (doc, f"{ROPE}/ab/01-default.json", lambda r: [row["smooth_s"] for row in r["timed"]["layers"]], fmt)
        for doc, fmt in ((DOCS, "{0[0]:.3f} / {0[1]:.3f} s"), (ROPE_README, "| {0[0]:.3f} / {0[1]:.3f} s |"))
    ],
    *[
        (ROPE_README, f"{ROPE}/ab/01-default.json", get, fmt)
        for get, fmt in (
            (_pass_s("(2/3): Calibrating"), "| {:.3f} s |"),
            (_pass_s("(3/3): Calibrating"), "| {:.3f} s |"),
            (_one("timed", "oneshot_s"), "| {} s |"),
        )
    ],
    (DOCS, f"{ROPE}/ab/01-default.json", _pass_s("(3/3): Calibrating"), "calibration pass {:.3f} →"),
    *[
        (doc, f"{ROPE}/offload/offload-128.json", _run(i, "wall_s"), "{:.1f} s")
        for doc in (DOCS, ACCOUNT, ROPE_README)
        for i in (0, 1)
    ],
    *[
        (ROPE_README, f"{ROPE}/offload/offload-128.json", lambda r, k=k: [x["timings_s"][k] for x in r["runs"]], fmt)
        for k in ("load", "oneshot", "save_weights", "save_mtp", "seal")
        for fmt in ("| {0[0]} s | {0[1]} s |",)
    ],
    (
        RESULTS.parent / "2026-11-30-cpu-demo-single-pass" / "README.md",
        "2026-11-30-cpu-demo-single-pass/record.json",
        lambda r: (r["builds"]["one_pass"]["wall_s"], r["builds"]["separate"]["wall_s"]),
        "{0[0]:.1f} s one pass against {0[1]:.1f} s",
    ),
]


def _stage_record(r, name="build-all"):
    return next(s for s in r["stages"] if s["stage"] == name)


@pytest.mark.parametrize("doc,record,get,fmt", CITED, ids=[f"{c[0].parent.name}/{c[0].name}:{c[1]}" for c in CITED])
def test_every_quoted_figure_is_its_records(doc, record, get, fmt):
    figure = fmt.format(get(_record(record)))
    assert figure in doc.read_text(), f"{doc} does not quote {figure} from {record}"


def test_offload_record_keeps_the_weights_under_a_cap_below_the_model():
    """Runs U and Y: the branch built with the base weights offloaded to disk under a cgroup
    limit below the model's size has the in-RAM build's weights, and stayed under the limit."""
    folder = RESULTS.parent / "2026-11-30-h200x2-offload-glm47-4layer"
    record = json.loads((folder / "U-1gpu-ram-vs-offload.json").read_text())
    ram, off = record["runs"]
    assert (ram["mode"], off["mode"]) == ("ram", "offload") and ram["exit"] == off["exit"] == 0
    assert ram["weights_sha256"] == off["weights_sha256"]
    assert off["peak_host_rss_gib"] < ram["peak_host_rss_gib"]
    limit = float(off["memory_limit"].split("= ")[1].split()[0])
    assert limit < record["model_gib"] and off["cgroup_memory_peak_gib"] <= limit + 0.05
    y = json.loads((folder / "Y-2gpu-offload-cgroup34.8.json").read_text())
    (run,) = y["runs"]
    assert (run["mode"], run["gpus"], run["exit"]) == ("offload", 2, 0)
    limit = float(run["memory_limit"].split("= ")[1].split()[0])
    assert limit < y["model_gib"] and run["cgroup_memory_peak_gib"] <= limit + 0.05


def test_offload_record_of_the_per_expert_load_keeps_the_weights_and_writes_only_smoothed_ones():
    """The 2026-12-03 pair: the offloaded build (cap below the model's size, page cache dropped)
    has the in-RAM build's weights, stayed under its limit, and its offload folder never held
    more than the smoothed layers (well under half the model; 1.2x before the per-expert load)."""
    folder = RESULTS.parent / "2026-12-03-h200-offload-direct-load"
    (ram,) = json.loads((folder / "call1-ram-512.json").read_text())["runs"]
    off_record = json.loads((folder / "call2-offload-512.json").read_text())
    (off,) = off_record["runs"]
    assert (ram["mode"], off["mode"]) == ("ram", "offload") and ram["exit"] == off["exit"] == 0
    assert ram["weights_sha256"] == off["weights_sha256"]
    assert off_record["page_cache"] == {"offload": "dropped"}
    limit = float(off["memory_limit"].split("= ")[1].split()[0])
    assert limit < off_record["model_gib"] and off["cgroup_memory_peak_gib"] <= limit + 0.05
    assert 0 < off["peak_offload_folder_gib"] < 0.5 * off_record["model_gib"]
    assert round(off["wall_s"] / ram["wall_s"], 2) == 1.29


def test_rehearsal_record_ran_the_release_path_with_flat_host_memory():
    """Run X (the 2-GPU rehearsal through publish): every stage passed, the host RSS at each
    branch's start stayed flat, and the second publish had nothing to do."""
    x = json.loads(
        (RESULTS.parent / "2026-11-30-h200x2-rehearsal-glm47-2layer" / "run-X-c465fcc-2gpu.json").read_text()
    )
    st = {s["stage"]: s for s in x["stages"]}
    assert x["gpus"] == 2 and st["build-all"]["exit"] == 0
    starts = [b["host_rss_gib"] for b in st["build-all"]["host_rss_at_branch_start_gib"]]
    assert len(starts) == 3 and max(starts) - starts[0] < 2.0  # flat across branches
    assert "nothing to do" in st["publish hub again"]["output_tail"]
    assert "skipped" in st["publish git"]


def test_every_gpu_digest_record_of_the_engine_has_the_same_weights():
    """The engine's GPU weights digest at GLM-4.7 layer dims, 64 x 2048 (issue 29 asks that
    it stay): the package split's pair, the extension's pair and this session's house rewrite
    (fused experts off and on) all recorded the same digest, on H200s."""
    records = [
        "2026-11-30-h200-engine-package-before-after/before-9fb33a4.json",
        "2026-11-30-h200-engine-package-before-after/after-7a5957d.json",
        "2026-11-30-h200-engine-extension-before-after/before-9fb33a4.json",
        "2026-11-30-h200-engine-extension-before-after/after-8c22299.json",
        "2026-12-03-h200-house-digest/loop-fused-off.json",
        "2026-12-03-h200-house-digest/fused-on.json",
    ]
    runs = [_record(r)[0] for r in records]
    assert all((r["samples"], r["seq"]) == (64, 2048) and "H200" in r["gpu"] for r in runs)
    assert len({r["weights_digest"] for r in runs}) == 1
    fused = _record("2026-12-03-h200-house-digest/fused-on.json")[0]["awq_options"]["fused_gpu_experts"]
    loop = _record("2026-12-03-h200-house-digest/loop-fused-off.json")[0]["awq_options"]["fused_gpu_experts"]
    assert (fused, loop) == (True, False)


def test_single_pass_records_back_what_the_readme_says():
    """The demo's one-pass figures (benchmarks/single_pass.py) are within the issue's 2 % KL
    bar; the GPU run is recorded as partial, with the figure its README gives read from its log."""
    folder = RESULTS.parent / "2026-11-30-cpu-demo-single-pass"
    record = json.loads((folder / "record.json").read_text())
    rows = {r["branch"]: r for r in record["branches"]}
    assert rows["W4A16_GS32"]["role"] == "propagating" and rows["W4A16_GS32"]["differ"] == 0
    sides = [r for r in rows.values() if r["role"] == "side"]
    assert len(sides) == 2 and all(0 not in r["layers"] and r["differ"] > 0 for r in sides)
    assert max(abs(r["kl_change_pct"]) for r in rows.values()) <= 2.0
    gpu = RESULTS.parent / "2026-11-30-h200-single-pass-glm47-2layer-partial"
    log = (gpu / "one-pass-cut.log").read_text()
    stamps = re.findall(r"^(2026-11-30T\d\d:\d\d:\d\d\.\d+) \| (\w+) \|", log, re.M)
    t = {f"{name}{i}": datetime.fromisoformat(ts) for i, (ts, name) in enumerate(stamps)}
    first_init = next(v for k, v in t.items() if k.startswith("reset"))
    first_finalize = next(v for k, v in t.items() if k.startswith("finalize"))
    oneshot = round((first_finalize - first_init).total_seconds(), 1)
    assert f"{oneshot} s" in (gpu / "README.md").read_text() and "[W4A16_GS128] loading" in log


def test_the_512_sample_side_by_side_figures_are_read_from_its_records():
    """The H200 side-by-side at 512 x 2048 (one MoE layer at GLM-4.7 dims): the README's
    figures are those of its JSON, provenance and log, including the cut pass's bounds, which
    are derived here from llm-compressor's timestamps as the record says."""
    folder = RESULTS.parent / "2026-11-30-h200-single-pass-glm47-moe-layer-512"
    text = (folder / "README.md").read_text()
    seps = [json.loads((folder / f"separate-{g}.json").read_text())["builds"]["separate"] for g in ("GS128", "GS32")]
    walls = [s["wall_s"] for s in seps]
    assert f"**{walls[0]} s** (GS128) and **{walls[1]} s** (GS32)" in text
    lead = json.loads((folder / "one-pass-provenance-W4A16_GS32.json").read_text())
    side = json.loads((folder / "one-pass-provenance-W4A16_GS64.json").read_text())
    assert lead["calibration_pass"] == {
        "branches": ["W4A16_GS32", "W4A16_GS64", "W4A16_GS128"],
        "propagated_through": "W4A16_GS32",
    }
    t = lead["timings_s"]
    layer = t["awq_engine"]["layers"][0]
    for figure in (t["calibration_pass_s"], layer["calib_s"], layer["smooth_s"], layer["side_s"]):
        assert f"{figure:.1f} s" in text, figure
    assert "load" not in side["timings_s"] and side["timings_s"]["finish"]["seconds"] > 0
    log = (folder / "one-pass-cut.log").read_text()
    stamps = [
        (datetime.fromisoformat(ts), what)
        for ts, what in re.findall(r" (2026-11-30T[\d:.]+) \| (\w+ \| \w+ - \w+)", log)
    ]
    copied = [ts for ts, what in stamps if what.endswith("INFO - Copied")]  # each branch's MTP layer written
    quantizing = [ts for ts, what in stamps if what.startswith("targets_embeddings")]  # each side's Quantizer
    start = copied[0].timestamp() - t["calibration_pass_s"]
    at_gs128 = quantizing[1].timestamp() - start
    gs64_write = (copied[1] - quantizing[0]).total_seconds()
    gs64_rest = (quantizing[1] - copied[1]).total_seconds()
    low, high = at_gs128 + gs64_write, at_gs128 + gs64_write + gs64_rest
    three = sum(walls) + sum(walls) / 2
    for figure in (f"{at_gs128:.1f} s after", f"{gs64_write:.1f} s", f"{gs64_rest:.1f} s", f"{low:.0f}–{high:.0f} s"):
        assert figure in text, figure
    assert f"~{three:.0f} s for three" in text and f"({low / three:.2f}–{high / three:.2f})" in text
    readme = (RESULTS.parent.parent.parent / "docs" / "performance.md").read_text()  # the figures users read
    assert "2026-11-30-h200-single-pass-glm47-moe-layer-512" in readme and f"{(low + high) / 2 / three:.2f}x" in readme


def test_the_release_estimate_is_the_per_layer_arithmetic(tmp_path):
    """benchmarks.release_estimate reads a profile_layer record's MoE layer (its second
    subgraph's passes and smoothing) and adds up the release: one pass for three branches on one
    GPU or over N ranks (a + b / N per layer), or a pass per branch over N ranks."""
    from benchmarks import release_estimate as est

    record = {
        "timed": {
            "passes": [
                {"pass": "(1/2): Calibrating", "s": 0.5},
                {"pass": "(1/2): Propagating", "s": 0.4},
                {"pass": "(2/2): Calibrating", "s": 12.0},
                {"pass": "(2/2): Propagating", "s": 3.0},
            ],
            "layers": [{"calib_s": 20.0, "smooth_s": 40.0}],
        }
    }
    moe = est.MoeLayer.from_record(record)
    assert moe == est.MoeLayer(calibration_s=12.0, smoothing_s=40.0, propagation_s=3.0)
    one = est.estimate(moe, dense_s=60.0, gpus=1)
    side = 2 * est.SIDE_OVER_LEAD
    assert one["moe_layer_s"] == round(55.0 + side * 40.0, 1)
    assert one["calibration_h"] == round((89 * (55.0 + side * 40.0) + 3 * 60.0 * (1 + side)) / 3600, 2)
    eight = est.estimate(moe, dense_s=60.0, gpus=8)
    layer = 55.0 + side * 40.0
    assert eight["moe_layer_s"] == round(4.8 + (layer - 4.8) / 8, 1)
    dense = 3.0 + (60.0 * (1 + side) - 3.0) / 8
    assert eight["calibration_h"] == round((89 * (4.8 + (layer - 4.8) / 8) + 3 * dense) / 3600, 2)
    apart = est.estimate(moe, dense_s=60.0, gpus=8, separate=True)
    assert apart["moe_layer_s"] == round(4.8 + 50.2 / 8, 1)
    assert apart["calibration_h"] == round(3 * (89 * (4.8 + 50.2 / 8) + 3 * (3.0 + 57.0 / 8)) / 3600, 2)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(record))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.release_estimate", "--record", str(path), "--dense-s", "60"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert (
        proc.returncode == 0
        and f"{one['calibration_h']} h" in proc.stdout
        and f"{eight['calibration_h']} h" in proc.stdout
        and f"{apart['calibration_h']} h" in proc.stdout
    )


@pytest.mark.parametrize("which", ["record", "rest"])
@pytest.mark.parametrize("bad", ["missing", "not json"])
def test_the_release_estimate_refuses_a_record_it_cannot_read(tmp_path, monkeypatch, which, bad):
    """A mistyped or damaged record path gets Error + Hint and a non-zero exit, not a traceback."""
    from benchmarks import release_estimate as est

    good = RESULTS.parent / "2026-12-03-h200-search-kernels" / "call3-pass-512.json"
    broken = tmp_path / "record.json"
    if bad == "not json":
        broken.write_text("{ cut off")
    args = ["--record", str(broken if which == "record" else good)]
    if which == "rest":
        args += ["--rest-records", str(good), str(broken)]
    monkeypatch.setattr(sys, "argv", ["release_estimate", *args])
    with pytest.raises(SystemExit) as exc:
        est.main()
    message = str(exc.value.code)
    assert message.startswith(f"Error: {broken}: not a readable JSON record") and "\nHint: " in message


def test_a_one_pass_record_gives_the_estimate_its_measured_dense_layer_and_side_branches():
    """A `profile_layer --one-pass` record of one dense and one MoE layer in a pass of three
    group sizes: the estimate takes both layers and the side branches' time from it (the pass's
    side time scaled to the release's two side branches), not run P's dense layer or the assumed
    side ratio."""
    from benchmarks import release_estimate as est

    record = {
        "timed": {
            "pass": ["A", "B"],  # one side branch measured: the release has two
            "passes": [
                {"pass": "(1/3): Calibrating", "s": 0.5},
                {"pass": "(1/3): Propagating", "s": 0.4},
                {"pass": "(2/3): Calibrating", "s": 4.0},
                {"pass": "(2/3): Propagating", "s": 1.0},
                {"pass": "(3/3): Calibrating", "s": 12.0},
                {"pass": "(3/3): Propagating", "s": 3.0},
            ],
            "layers": [
                {"mappings": 3, "calib_s": 5.0, "smooth_s": 10.0, "side_s": 9.0},
                {"mappings": 163, "calib_s": 20.0, "smooth_s": 40.0, "side_s": 30.0},
            ],
        }
    }
    moe, dense = est.MoeLayer.from_record(record), est.MoeLayer.dense_from_record(record)
    assert moe == est.MoeLayer(calibration_s=12.0, smoothing_s=40.0, propagation_s=3.0, side_s=60.0)
    assert dense == est.MoeLayer(calibration_s=4.0, smoothing_s=10.0, propagation_s=1.0, side_s=18.0)
    one = est.estimate(moe, gpus=1, dense=dense)
    assert one["moe_layer_s"] == 115.0 and one["dense_measured"] and one["side_measured"]
    assert one["calibration_h"] == round((89 * 115.0 + 3 * 33.0) / 3600, 2)
    apart = est.estimate(moe, gpus=1, separate=True, dense=dense)
    assert apart["calibration_h"] == round(3 * (89 * 55.0 + 3 * 15.0) / 3600, 2)


def test_profile_layer_one_pass_on_the_tiny_model(tmp_path):
    """`profile_layer --one-pass` on a tiny synthetic model (1 dense + 1 MoE layer, three group
    sizes) on the CPU: the side branches are smoothed in the pass and timed per layer, their
    stores are removed, and release_estimate reads the record as measured."""
    import yaml

    repo = Path(__file__).resolve().parent.parent
    syn = tmp_path / "syn"

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=repo, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    sizes = ["--group-size", "32", "--group-size", "64", "--group-size", "128", "--samples", "2", "--seq", "32"]
    run("benchmarks.synthetic", "--preset", "tiny", "--layers", "2", "--dense", "1", "--out", str(syn), *sizes)
    out = tmp_path / "pass.json"
    run(
        "benchmarks.profile_layer",
        *("--config", str(syn / "release.yaml"), "--samples", "2", "--seq", "32", "--profile-samples", "0"),
        *("--one-pass", "--json", str(out)),
    )
    timed = json.loads(out.read_text())["timed"]
    assert timed["pass"] == ["W4A16_GS32", "W4A16_GS64", "W4A16_GS128"]
    # onload-ahead's times (on a GPU only: here each layer's `after` finds nothing to copy), from
    # the run's start as the passes' are
    spans = timed["onload_ahead"]["spans"]
    assert spans and all(k == "after" and 0 <= a <= b <= timed["wall_s"] + 0.1 for k, a, b in spans), spans
    assert all(p["start_s"] >= 0 for p in timed["passes"])
    assert [row["mappings"] for row in timed["layers"]] == [3, 11]
    assert all(row["side_s"] > 0 for row in timed["layers"])
    branches = yaml.safe_load((syn / "release.yaml").read_text())["output_dir"]
    assert not list((syn / branches).glob(".profile-pass-*")), "the side branches' stores are removed"
    printed = run("benchmarks.release_estimate", "--record", str(out))
    assert "dense layer on one GPU" in printed and "measured; side branches measured" in printed


def test_profile_layer_refuses_an_unknown_engine_option_before_loading_anything(tmp_path):
    """`profile_layer --engine KEY=VALUE` with a KEY ScaleOptions lacks fails at once, naming the
    known keys, before any child process loads a model (it used to fail in each child, after the load)."""
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_layer", "--config", str(tmp_path / "absent.yaml")]
        + ["--engine", "onload_ahed=[]"],
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "--engine 'onload_ahed=[]'" in proc.stderr and "onload_ahead" in proc.stderr
    assert "RECORD" not in proc.stdout


def test_the_performance_page_states_the_estimate_its_record_gives():
    """docs/performance.md's full-release figures are benchmarks.release_estimate's on the H200
    one-pass record of the engine's latest dense and MoE layers (run, not copied)."""
    from benchmarks import release_estimate as est

    record = json.loads((RESULTS.parent / "2026-12-03-h200-search-kernels" / "call3-pass-512.json").read_text())
    moe, dense = est.MoeLayer.from_record(record), est.MoeLayer.dense_from_record(record)
    assert dense is not None and moe.side_s is not None, "a one-pass record: nothing assumed"
    page = " ".join((RESULTS.parent.parent.parent / "docs" / "performance.md").read_text().split())
    for gpus, separate in ((1, False), (8, False), (8, True)):
        assert f"{est.estimate(moe, gpus=gpus, separate=separate, dense=dense)['calibration_h']} h" in page, gpus
    assert f"{moe.calibration_s:.1f} s calibration pass" in page and f"{moe.smoothing_s:.1f} s search" in page
    rest = est.rest()
    assert f"{rest['total_h']} h" in page, "the older estimate of the rest, from bytes over rates"
    latest = RESULTS.parent / "2026-12-05-h200-rest-of-the-release-three-pairs"
    pairs = [est.marginal_rest(latest / f"p4{t}-rehearsal-2.json", latest / f"p4{t}-rehearsal-3.json") for t in "abc"]
    m = est.pooled_rest(pairs)
    per = m["per_moe_layer_s"]
    assert f"{m['per_moe_layer_total_s']} s a MoE layer on their mean" in page and f"**{m['total_h']:.2f} h**" in page
    assert f"(saves {per['save']} s, verify {per['verify']} s, the rest of build-all {per['other']} s" in page
    assert f"about {round(sum(m['fixed_s'].values()))} s fixed" in page and f"standard deviation {m['sd_h']} h" in page
    assert "the pairs " + ", ".join(str(x["total_h"]) for x in sorted(pairs, key=lambda x: x["total_h"])[:2]) in page
    calibration = est.estimate(moe, gpus=8, dense=dense)["calibration_h"]
    assert f"So {round(calibration + m['total_h'], 2)} h on one 8×H200 node plus the upload" in page
    readme = " ".join((RESULTS.parent.parent.parent / "README.md").read_text().split())
    assert f"estimated at **{round(calibration + m['total_h'], 2)} h on one 8×H200 node**" in readme
    one_gpu = est.estimate(moe, gpus=1, dense=dense)["calibration_h"]
    assert f"{one_gpu} h of calibration on one H200" in readme
    lo, hi = m["range_h"]
    assert f"{round(calibration + lo, 2)}-{round(calibration + hi, 2)} h across the three pairs" in page
    earlier = [
        RESULTS.parent / "2026-12-04-h200-marginal-moe-layer",
        RESULTS.parent / "2026-12-04-h200-hash-cache-follows-rename",
    ]
    older = [
        est.marginal_rest(earlier[0] / f"pair{i}-rehearsal-2.json", earlier[0] / f"pair{i}-rehearsal-3.json")
        for i in (1, 2)
    ]
    older += [
        est.marginal_rest(earlier[1] / f"pair3-{w}-rehearsal-2.json", earlier[1] / f"pair3-{w}-rehearsal-3.json")
        for w in ("old", "new")
    ]
    lo, hi = min(x["total_h"] for x in older), max(x["total_h"] for x in older)
    assert f"gave {lo}-{hi} h for the rest" in page


def test_pooled_rest_is_the_mean_of_the_pairs_with_their_spread():
    from benchmarks import release_estimate as est

    def pair(total: float, save: float) -> dict:
        stages = dict.fromkeys(est.REST_STAGES, 0.0) | {"save": save}
        return {"per_moe_layer_s": stages, "fixed_s": dict.fromkeys(est.REST_STAGES, 10.0), "total_h": total}

    m = est.pooled_rest([pair(0.1, 2.0), pair(0.3, 4.0)])
    assert m["total_h"] == 0.2 and m["range_h"] == (0.1, 0.3) and m["sd_h"] == round(0.02**0.5, 2)
    assert m["per_moe_layer_s"]["save"] == 3.0 and m["per_moe_layer_total_s"] == 3.0
    assert m["fixed_s"]["save"] == 10.0
    assert est.pooled_rest([pair(0.1, 2.0)])["sd_h"] is None


def test_the_rest_of_the_release_is_bytes_over_measured_rates():
    """release_estimate.rest: GLM-4.7's bytes (a branch: INT4 Linears with a bf16 scale per group,
    the embeddings, lm_head and routers in bf16) over the load and save rates of run U's in-RAM
    build and run X's one streaming verify of three branches, read from their records."""
    from benchmarks import release_estimate as est

    assert [round(est.branch_gib(g)) for g in (32, 64, 128)] == [188, 178, 173]  # ~0.53 B a parameter
    u = next(r for r in json.loads(est.RUN_U.read_text())["runs"] if r["mode"] == "ram")
    x = json.loads(est.RUN_X.read_text())["verify"]
    r = est.rest()
    base = 355e9 * 2 / 2**30
    assert r["base_gib"] == round(base, 1)
    assert r["hours"]["load"] == round(base / (u["model_gib"] / u["timings_s"]["load"]) / 3600, 2)
    assert r["hours"]["save"] == round(3 * base * u["timings_s"]["save"] / u["model_gib"] / 3600, 2)
    whole = max(v["seconds"] for v in x.values())  # one streaming pass verified the three
    assert r["hours"]["verify"] == round(base * whole / est.RUN_X_BASE_GIB / 3600, 2)
    assert r["upload_h"]["10 Gbit/s"] == round(r["branches_gib"] * 2**30 * 8 / 10e9 / 3600, 2)


def test_the_rest_is_fixed_seconds_plus_the_cost_of_one_more_moe_layer(tmp_path):
    """release_estimate.marginal_rest: two one-pass rehearsals of 2 and 3 layers (the first
    dense) give per stage the cost of one more MoE layer and the fixed seconds; the release is
    fixed + (89 + 2 dense layers scaled by their parameters) x per layer. A stage that cost less
    with more layers counts as fixed, never negative; the "other" seconds are the build-all
    wall less the calibration and every named stage; records in the wrong order are refused."""
    from benchmarks import release_estimate as est

    def record(layers: int, load, lead_save, side_s, verify, seal, wall, oneshot, name=""):
        side = {"finish": {"seconds": side_s / 2}, "save": side_s / 2}
        path = tmp_path / f"r{layers}{name}.json"
        path.write_text(
            json.dumps(
                {
                    "layers": layers,
                    "stages": [{"stage": "build-all", "wall_s": wall}],
                    "quantize_timings_s": {
                        "32": {"load": load, "save": lead_save, "oneshot": oneshot, "calibration_pass_s": 1.0},
                        "64": side,
                        "128": side,
                    },
                    "verify": {"32": {"seconds": verify - 2}, "64": {"seconds": verify}},
                    "seal_s": {"32": seal, "64": seal, "128": None},
                }
            )
        )
        return path

    small = record(2, load=1.0, lead_save=10.0, side_s=4.0, verify=40.0, seal=0.5, wall=200.0, oneshot=50.0)
    large = record(3, load=1.5, lead_save=14.0, side_s=6.0, verify=45.0, seal=0.25, wall=260.0, oneshot=90.0)
    stages = est.rest_stages(small)["stages"]
    assert stages == {"load": 1.0, "save": 18.0, "verify": 40.0, "seal": 1.0, "other": 200 - 50 - 60.0}
    m = est.marginal_rest(small, large)
    # one more MoE layer: load 0.5, save (14 + 12) - (10 + 8) = 8, verify 5, seal 0 (it fell),
    # other (260 - 90 - 73) - 90 = 7
    assert m["per_moe_layer_s"] == {"load": 0.5, "save": 8.0, "verify": 5.0, "seal": 0.0, "other": 7.0}
    assert m["fixed_s"] == {"load": 0.5, "save": 10.0, "verify": 35.0, "seal": 1.0, "other": 83.0}
    layers = 89 + 2 * est.DENSE_OVER_MOE
    assert 0.08 < est.DENSE_OVER_MOE < 0.09  # a dense layer: ~0.33 B parameters of a MoE layer's ~3.9 B
    assert m["total_h"] == round((129.5 + layers * 20.5) / 3600, 2)
    with pytest.raises(SystemExit, match="not more than"):
        est.marginal_rest(large, small)
    noisy = record(
        3, load=1.5, lead_save=20.0, side_s=8.0, verify=50.0, seal=0.25, wall=300.0, oneshot=90.0, name="-noisy"
    )
    # side branches made at the same time (since d9161d9): the longest counts, not their sum
    at_once = json.loads(large.read_text())
    for t in at_once["quantize_timings_s"].values():
        if "finish" in t:
            t["side_branches_at_once"] = 2
    (tmp_path / "at-once.json").write_text(json.dumps(at_once))
    assert est.rest_stages(tmp_path / "at-once.json")["stages"]["save"] == 14.0 + 6.0
    assert est.rest_stages(large)["stages"]["save"] == 14.0 + 2 * 6.0
    profile = RESULTS.parent / "2026-12-03-h200-search-kernels" / "call3-pass-512.json"
    printed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.release_estimate",
            "--record",
            str(profile),
            "--rest-records",
            str(small),
            str(large),
            "--rest-records",  # a second pair: the sum is the pairs' mean, with their spread
            str(small),
            str(noisy),
        ],
        capture_output=True,
        text=True,
        cwd=RESULTS.parent.parent.parent,
        check=True,
    ).stdout
    layers_measured = json.loads(profile.read_text())
    moe, dense = est.MoeLayer.from_record(layers_measured), est.MoeLayer.dense_from_record(layers_measured)
    calibration = est.estimate(moe, gpus=8, dense=dense)["calibration_h"]
    other = est.marginal_rest(small, noisy)
    mean = round((m["total_h"] + other["total_h"]) / 2, 2)
    assert f"the rest {mean} h (measured per layer on one GPU, the mean of 2 pairs)" in printed, printed
    assert f"= {round(calibration + mean, 2)} h, plus the upload" in printed, printed
    lo, hi = sorted((m["total_h"], other["total_h"]))
    assert lo < hi and "the mean of the 2 pairs" in printed and f"the pairs span {lo}-{hi} h" in printed, printed


def test_h2d_sources_counts_unpinned_copies_by_call_site_and_restores_torch():
    """profile_layer --h2d-samples: a copy of an unpinned CPU tensor to a CUDA device is counted
    under the line that made it (the CUDA side is stood in for: this machine has no GPU)."""
    import torch

    from benchmarks.profile_layer import H2DSources

    originals = (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.copy_)
    with H2DSources() as sources:

        def wrapper(t: torch.Tensor, to_gpu: bool) -> None:  # as Tensor.to's wrapper calls it
            sources._note(t, dst_cuda=to_gpu)

        wrapper(torch.ones(4, 8), True)
        wrapper(torch.ones(4, 8), False)  # not to a GPU: not counted
        torch.ones(2).to(torch.float64)  # a CPU cast goes through the wrapper, counts nothing
    (row,) = sources.top()
    assert row["copies"] == 1 and row["shapes"] == [[4, 8]] and "test_benchmarks.py" in row["site"]
    assert (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.copy_) == originals


def test_the_pass_clock_places_each_pass_so_the_time_between_them_reads_off(monkeypatch):
    """profile_layer's PassClock: each pass's seconds and its start from the clock's start, so the
    time spent between a propagation pass and the next calibration pass (the engine's work, or a
    wait) is the next pass's start minus this one's start and seconds."""
    import time

    from llmcompressor.pipelines.sequential import pipeline

    from benchmarks.profile_layer import PassClock

    def batches(model, loader, names, desc):
        for i in range(2):
            time.sleep(0.01)
            yield i, None

    monkeypatch.setattr(pipeline, "_get_batches", batches)
    with PassClock() as clock:
        list(pipeline._get_batches(None, None, None, "(1/2): Propagating"))
        time.sleep(0.05)  # work between the passes
        list(pipeline._get_batches(None, None, None, "(2/2): Calibrating"))
    assert pipeline._get_batches is batches
    first, second = clock.passes
    assert [first["pass"], second["pass"]] == ["(1/2): Propagating", "(2/2): Calibrating"]
    assert first["s"] >= 0.02 and second["s"] >= 0.02
    between = second["start_s"] - first["start_s"] - first["s"]  # each figure rounded to the millisecond
    assert 0.05 - 0.002 <= between < 0.5, clock.passes


def test_the_calibrating_window_profiles_one_pass_only(monkeypatch):
    """profile_layer --profile-calibrating K: the profiler runs over subgraph K's calibration
    pass, from its first batch to its last, and over nothing else; the pipeline's iterator is
    restored after."""
    import torch
    from llmcompressor.pipelines.sequential import pipeline

    from benchmarks.profile_layer import CalibratingWindow, profile_figures

    def batches(model, loader, names, desc):
        for i in range(3):
            yield i, torch.ones(64, 64) @ torch.ones(64, 64) + (i if "Calibrating" in desc else 0)

    monkeypatch.setattr(pipeline, "_get_batches", batches)
    with CalibratingWindow(2) as window:
        assert list(pipeline._get_batches(None, None, None, "(1/2): Calibrating"))
        assert window.prof is None, "another subgraph's pass is not profiled"
        list(pipeline._get_batches(None, None, None, "(2/2): Propagating"))
        assert window.prof is None, "nor its propagation"
        assert len(list(pipeline._get_batches(None, None, None, "(2/2): Calibrating"))) == 3
    assert pipeline._get_batches is batches
    assert window.prof is not None and window.wall_s > 0
    figures = profile_figures(window.prof, window.wall_s, None)
    assert any(row["name"] == "aten::mm" and row["calls"] == 3 for row in figures["top_ops_by_calls"]), figures
    assert "by_stack" not in figures

    # --stacks: the same window's operators by their callers (here, the function `batches` above)
    with CalibratingWindow(2, stacks=True) as window:
        list(pipeline._get_batches(None, None, None, "(2/2): Calibrating"))
    rows = profile_figures(window.prof, window.wall_s, None, stacks=True)["by_stack"]["by_cpu"]
    mm = [r for r in rows if r["op"] == "aten::mm"]  # (a generator's first call and later ones may differ)
    assert sum(r["calls"] for r in mm if any(": batches" in f for f in r["stack"])) == 3, rows


def test_sync_sites_count_the_waits_of_one_pass_by_call_site(monkeypatch):
    """profile_layer --sync-samples: torch's sync debug mode over subgraph K's calibration pass
    only, each wait it reports counted by the line that made it; other warnings pass through,
    the debug mode and the pipeline's iterator are put back, and without a CUDA device the
    record says it was skipped instead of counting none."""
    import warnings

    import torch
    from llmcompressor.pipelines.sequential import pipeline

    from benchmarks.profile_layer import SyncSites

    modes = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    passed = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: passed.append(str(message)))

    def batches(model, loader, names, desc):
        for i in range(3):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # what torch says at each wait
            if i == 0:
                warnings.warn("something else", stacklevel=1)
            yield i, None

    monkeypatch.setattr(pipeline, "_get_batches", batches)
    with SyncSites(2) as sites:
        list(pipeline._get_batches(None, None, None, "(1/2): Calibrating"))
        list(pipeline._get_batches(None, None, None, "(2/2): Propagating"))
        assert not sites.sites and not sites.ran, "another pass is not watched"
        list(pipeline._get_batches(None, None, None, "(2/2): Calibrating"))
    assert pipeline._get_batches is batches and modes == ["warn", "default"]
    (row,) = sites.top()
    assert row["waits"] == 3 and "batches" in row["site"].split(" < ")[0], row
    assert passed == ["something else"], "in the window a warning that is not a wait is shown as before"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with SyncSites(2) as sites:
        list(pipeline._get_batches(None, None, None, "(2/2): Calibrating"))
    assert sites.ran and sites.skipped and not sites.sites


def test_search_forward_times_each_parent_on_the_tiny_preset(tmp_path):
    """benchmarks.search_forward on the CPU at the tiny preset: every parent timed and projected,
    the grid points' forwards equal to the reference (the weights do not change there, so a
    nonzero loss would mean a forward that is not deterministic), and another copy of experts.py
    run in place of the package's."""
    import shutil

    from benchmarks import search_forward

    other = tmp_path / "experts_copy.py"
    shutil.copy(Path(search_forward.__file__).parent.parent / "release" / "awq" / "experts.py", other)
    args = ["--preset", "tiny", "--device", "cpu", "--seq", "32", "--merge", "2", "--batches", "2", "--grid", "1"]
    out = search_forward.main([*args, "--parts", "moe,mlp,attention", "--json", str(tmp_path / "sf.json")])
    assert set(out["parts"]) == {"moe", "mlp", "attention_mask_eager", "attention_mask_none"}
    assert all(p["projected_s"] > 0 and p["loss"] == 0.0 for p in out["parts"].values())
    assert out["parts"]["moe"]["paths"]["kernels"] == {"weighted_sum": False, "silu_gate": False}, "no Triton on a CPU"
    assert json.loads((tmp_path / "sf.json").read_text()) == out
    copy = search_forward.main([*args, "--parts", "moe", "--experts-module", str(other)])
    assert copy["experts_module"] == str(other) and copy["parts"]["moe"]["loss"] == 0.0


def test_verify_profile_names_where_the_streaming_verify_spends_its_time(demo_release):
    """benchmarks.verify_profile on one branch of the demo release: every span of the streaming
    verify is timed (the base and the branch read, decompressed, made real and run through each
    of the 4 layers), the spans fit inside the wall time, and the branch's verify.json is what
    build-all wrote (the same comparison, the same content)."""
    from benchmarks import verify_profile

    cfg, branch = demo_release["config"], "W4A16_GS128"
    record = cfg.output_dir / branch / "verify.json"
    before = record.read_bytes()
    rec = verify_profile.profile_verify(demo_release["config_path"], [branch])
    spans = rec["spans_s"]
    assert {"read", "decompress", "fuse", "materialize", "forward", "divergence", "digest", "decode"} <= set(spans)
    models, layers = 2, 4
    assert spans["forward"]["calls"] == models * layers and spans["divergence"]["calls"] == layers
    assert spans["fuse"]["calls"] == models * 3, "the MoE layers' experts fused, per model"
    assert 0 < rec["spans_sum_s"] <= rec["wall_s"]
    assert rec["passed"] == {branch: True}
    assert record.read_bytes() == before
    from release.verify import stream

    compare = stream.stream_compare
    ahead = verify_profile.profile_verify(demo_release["config_path"], [branch], read_ahead=2)
    assert ahead["read_ahead"] == 2 and ahead["passed"] == {branch: True} and record.read_bytes() == before
    assert stream.stream_compare is compare, "verify's own stream_compare is put back"


def test_the_glm47_preset_has_glm47s_own_dimensions():
    """Every GPU figure "at GLM-4.7 dims" comes from benchmarks.synthetic's glm47 preset: its
    per-layer dimensions are those of GLM-4.7's own config.json (shipped in configs/)."""
    from benchmarks import GLM47_CONFIG
    from benchmarks.synthetic import PRESETS

    config = json.loads(GLM47_CONFIG.read_text())
    preset = PRESETS["glm47"]
    dims = {k: v for k, v in preset.items() if k != "layers"}
    assert dims == {k: config[k] for k in dims}, {k: (v, config.get(k)) for k, v in dims.items()}


def test_sync_free_record_keeps_the_scales_and_places_the_onload_ahead_copies():
    """The 2026-12-07 H100 record: every later run of a call chose its first run's scales for
    every mapping (the masked and the sliced routed rows alike), and its README quotes, run by
    run, the helper's copies and how long after them the propagation pass began."""
    folder = RESULTS.parent / "2026-12-07-h100-sync-free-routing"
    text = SYNC_FREE_README.read_text()
    for f in SYNC_FREE_RUNS:
        record = json.loads((folder / f).read_text())["timed"]
        compared = folder / f.replace(".json", "-vs-first.json")
        if not f.split("/")[1].startswith("01-"):
            kinds = json.loads(compared.read_text())
            assert sum(k["mappings"] for k in kinds.values()) == 326
            assert all(k["equal"] == k["mappings"] for k in kinds.values()), (f, kinds)
        (after, a0, _a1), (copies, c0, c1) = record["onload_ahead"]["spans"][:2]
        assert (after, copies) == ("after", "copies") and a0 <= c0 <= c1
        start = next(p["start_s"] for p in record["passes"] if p["pass"] == "(2/3): Propagating")
        row = f"| {a0:.3f} s | {c0:.3f}–{c1:.3f} s ({record['onload_ahead']['copy_s']:.3f} s) | {start:.3f} s | {start - c1:.3f} s |"
        assert row in text, row


def test_copy_record_wrote_the_same_bytes_without_the_tensors_in_memory():
    """The 2026-12-07 CPU record of layout.copy_tensors: both modes wrote the same MTP shard and
    index and the same side-branch shards; the copy's peak RSS grew by none of the layer."""
    folder = RESULTS.parent / "2026-12-07-cpu-copy-tensors"
    carry = json.loads((folder / "mtp-carry.json").read_text())
    assert carry["same_bytes"] is True
    growth = {
        m: {x["rss_growth_gib"] for x in carry["runs"] if x["mode"] == m} for m in ("compressed-tensors", "glmrel")
    }
    assert max(growth["glmrel"]) < 0.1 < carry["gib"] - 0.1 < min(growth["compressed-tensors"])
    writes = [json.loads((folder / f"shard-writes-{via}.json").read_text()) for via in ("save-file", "copy")]
    assert writes[0]["digest"] == writes[1]["digest"] and writes[1]["peak_rss_gib"] < writes[0]["peak_rss_gib"] - 1


def test_pinned_record_keeps_the_scales_and_places_the_main_thread():
    """The 2026-12-07 pinned onload-ahead record: the pinned and the pageable copies chose the
    same scales for every mapping; its README's timeline (end of smoothing, the copies, the
    propagation pass) and the sampler's counts are the records'."""
    folder = RESULTS.parent / "2026-12-07-h100-pinned-onload-ahead"
    text = PINNED_README.read_text()
    kinds = json.loads((folder / "call2/02-pageable-vs-first.json").read_text())
    assert sum(k["mappings"] for k in kinds.values()) == 326
    assert all(k["equal"] == k["mappings"] for k in kinds.values()), kinds
    for f, staged in (("call2/01-pinned.json", 496), ("call2/02-pageable.json", 0)):
        record = json.loads((folder / f).read_text())["timed"]
        ahead = record["onload_ahead"]
        assert ahead["staged"] == staged and ahead["served"] == ahead["tensors"] == 496
        (after, a0, _a1), (copies, c0, c1) = ahead["spans"][:2]
        assert (after, copies) == ("after", "copies")
        start = next(p["start_s"] for p in record["passes"] if p["pass"] == "(2/3): Propagating")
        assert f"{c0:.3f}–{c1:.3f} s" in text and f"{a0:.3f} → {start:.3f} s: **{start - a0:.3f} s**" in text
        sampled = record["main_thread_during_copies"]
        assert f"of {sampled['samples']} in" in text
    call1 = json.loads((folder / "call1/01-default.json").read_text())["timed"]
    counts = {row["site"].split(" < ")[0]: row["samples"] for row in call1["main_thread_during_copies"]["sites"]}
    assert counts["/tmp/site/llmcompressor/observers/min_max.py:71 _get_min_max"] == 49
    assert counts["/tmp/site/llmcompressor/observers/min_max.py:72 _get_min_max"] == 36
    assert call1["main_thread_during_copies"]["samples"] == 88


def test_the_copies_sampler_names_where_the_main_thread_is_while_the_helper_copies(monkeypatch):
    """benchmarks/thread_sampler.py: while `OnloadAhead._onload` runs (the helper's copies), the
    main thread's call sites are sampled; outside it nothing is; the patch is undone on exit."""
    import threading
    import time

    from benchmarks.thread_sampler import CopiesSampler
    from release.awq.read_ahead import OnloadAhead

    seen: list[bool] = []

    def fake_onload(self, *args):  # the stock copies, as the helper thread runs them
        seen.append(sampler.active.is_set())
        time.sleep(0.3)

    monkeypatch.setattr(OnloadAhead, "_onload", fake_onload)

    def held_here():  # the main thread, waiting while the helper copies
        helper = threading.Thread(target=OnloadAhead._onload, args=(None,))
        helper.start()
        helper.join()

    with CopiesSampler(period=0.01) as sampler:
        time.sleep(0.15)  # no copies: not sampled
        assert sampler.samples == 0
        held_here()
        assert OnloadAhead._onload is not fake_onload
    assert OnloadAhead._onload is fake_onload and seen == [True]
    assert sampler.samples >= 3, sampler.samples
    assert any("held_here" in row["site"] for row in sampler.top()), sampler.top()


def test_offload_record_says_what_onload_ahead_did():
    """benchmarks.offload keeps the engine's onload-ahead and read-ahead counts from the build
    log, without the spans (their clock is the build's, not the record's), and None where the
    engine onloaded nothing ahead (a CPU build, or the option off)."""
    from benchmarks.offload import engine_figures

    counts = {"tensors": 496, "staged": 496, "copy_s": 0.7, "wait_s": 0.0, "spans": [["copies", 1.0, 1.7]]}
    engine = {"onload_ahead_counts": counts, "read_ahead_counts": {"layers": 1, "gib": 7.3}}
    figures = engine_figures({"awq_engine": engine, "load": 1.0})
    assert figures == {
        "onload_ahead": {"tensors": 496, "staged": 496, "copy_s": 0.7, "wait_s": 0.0},
        "read_ahead": {"layers": 1, "gib": 7.3},
    }
    assert engine_figures({"awq_engine": {"onload_ahead_counts": {}}}) == {"onload_ahead": None, "read_ahead": None}
    assert engine_figures({}) == {"onload_ahead": None, "read_ahead": None}


def test_causal_record_keeps_its_scales_and_its_timeline():
    """Session 39's record: the two default runs chose the same scales bit for bit; the causal
    run kept 1 of 326 (all within 0.19 %), as its README says; `take` never waited; the
    README's end-of-smoothing-to-propagation windows are the records'; and the offloaded build
    wrote the in-RAM build's weights under a cap below the model's size."""
    folder = RESULTS.parent / CAUSAL
    text = CAUSAL_README.read_text()
    same = json.loads((folder / "compare-run3-run1.txt").read_text())
    assert sum(k["mappings"] for k in same.values()) == 326
    assert all(k["equal"] == k["mappings"] and k["max_rel"] == 0.0 for k in same.values()), same
    causal = json.loads((folder / "compare-run2-run1.txt").read_text())
    assert sum(k["mappings"] for k in causal.values()) == 326 and sum(k["equal"] for k in causal.values()) == 1
    assert max(k["max_rel"] for k in causal.values()) < 0.0019 and "1 of 326" in text
    for f, forwards in zip(CAUSAL_RUNS, (0, 2048, 0)):
        record = json.loads((folder / f).read_text())["timed"]
        assert record["engine"]["causal_calibration_forwards"] == forwards
        ahead = record["onload_ahead"]
        assert ahead["wait_s"] == 0.0 and ahead["staged"] == ahead["served"] == 496
        after = ahead["spans"][0][1]
        start = next(p["start_s"] for p in record["passes"] if p["pass"] == "(2/3): Propagating")
        assert f"{after:.3f} → {start:.3f} s: {start - after:.3f} s" in text
    offload = json.loads((folder / "offload/offload-128.json").read_text())["runs"]
    assert [r["mode"] for r in offload] == ["ram", "offload"]
    assert offload[0]["weights_sha256"] == offload[1]["weights_sha256"]
    assert offload[1]["cgroup_memory_peak_gib"] < offload[1]["model_gib"]
    assert f"**{offload[1]['wall_s'] / offload[0]['wall_s']:.2f}x**" in text


def test_fused_rope_record_keeps_its_bits_its_times_and_its_offload():
    """Session 40's record: the rotary kernel's GPU test passed; in both timed pairs the
    attention forward was faster with the kernel and gave transformers' output bits; the
    profile's totals are the README's; the engine A/B's printed summary agrees with run 1's
    kept record, and run 2 chose all 326 scales bit for bit; the offloaded build wrote the in-RAM
    build's weights under a cap below the model's size and its ratio is the README's."""
    folder = RESULTS.parent / ROPE
    text = ROPE_README.read_text()
    assert "3 passed" in (folder / "rope/test_rope.log").read_text()
    log = (folder / "rope/rope.log").read_text()
    stock = re.findall(r"^attention_mask_none: ([\d.]+) ms", log, re.M)
    fused = re.findall(r"^attention_mask_none_fused_rope: ([\d.]+) ms", log, re.M)
    assert len(stock) == len(fused) == 2 and all(float(f) < float(s) for s, f in zip(stock, fused))
    assert log.count("output equal to stock's: True") == 2 and "False" not in log
    assert f"| first pair, per merged batch | {stock[0]} ms | {fused[0]} ms |" in text
    assert f"| second pair | {stock[1]} ms | {fused[1]} ms |" in text
    parts = json.loads((folder / "rope/rope.json").read_text())["parts"]
    assert parts["attention_mask_none_fused_rope"]["equal_to_stock"] is True
    totals = re.findall(r"Self CUDA time total: ([\d.]+)ms", (folder / "rope/rope-profile.log").read_text())
    assert len(totals) == 2 and all(f"{t} ms" in text for t in totals)
    summary = (folder / "ab/engine_ab-output.txt").read_text()
    runs = re.findall(r"^(\S+) oneshot ([\d.]+) layers \(calib, smooth\) (\[.*\])$", summary, re.M)
    assert [r[0] for r in runs] == ["01-default", "02-fused_rope=true"]
    one = json.loads((folder / "ab/01-default.json").read_text())["timed"]
    layers = [[row["calib_s"], row["smooth_s"]] for row in one["layers"]]
    assert (
        float(runs[0][1]) == one["oneshot_s"] and json.loads(runs[0][2].replace("(", "[").replace(")", "]")) == layers
    )
    fused_layers = json.loads(runs[1][2].replace("(", "[").replace(")", "]"))
    assert f"**{fused_layers[0][1]:.3f} / {fused_layers[1][1]:.3f} s**" in text
    assert all(f[1] < d[1] for f, d in zip(fused_layers, layers)), "the kernel's smoothing was the faster"
    equal = re.findall(r"'(\d+)/(\d+) equal'", summary.split("scales vs first:")[1])
    assert sum(int(a) for a, _ in equal) == sum(int(b) for _, b in equal) == 326 and "326 of 326" in text
    offload = json.loads((folder / "offload/offload-128.json").read_text())["runs"]
    assert [r["mode"] for r in offload] == ["ram", "offload"]
    assert offload[0]["weights_sha256"] == offload[1]["weights_sha256"]
    assert offload[1]["cgroup_memory_peak_gib"] < offload[1]["model_gib"]
    assert offload[1]["onload_ahead"]["staged"] == 495 and offload[1]["read_ahead"]["layers"] == 1
    assert f"**{offload[1]['wall_s'] / offload[0]['wall_s']:.2f}x**" in text
