"""How fast is `glmrel check --no-hash` on a checkpoint of GLM-4.7's full shape? And hashing?

Builds a W4A16 branch with GLM-4.7's real inventory (92 layers + 1 MTP layer, 160 experts,
~40 shards, >100,000 tensors) from safetensors headers alone: each shard's data region is a
sparse hole (file truncated to its full length), so it costs no disk. The manifest lists real
sizes; its sha256 fields for the sparse shards are the hash of their (all-zero) content only
if --hash is given, which reads ~190 GB of zeros, so by default it is a --no-hash benchmark.

  python -m benchmarks.check_speed [--out DIR] [--group-size 64] [--keep]
  python -m benchmarks.check_speed --hash-bench [--hash-mib 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import GLM47_CONFIG
from release.architecture import Glm4MoeArch
from release.check import check_branch
from release.layout import DTYPE_BYTES, expected_inventory
from release.manifest import MANIFEST_SCHEMA, FileEntry, Manifest, hash_files, sha256_file
from release.owned import create_owned

N_SHARDS = 40


def build_sparse_branch(out: Path, group_size: int) -> Path:
    cfg = json.loads(GLM47_CONFIG.read_text())
    arch = Glm4MoeArch.from_config(cfg)
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": group_size,
                },
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": ["lm_head"] + [f"model.layers.{i}.mlp.gate" for i in arch.moe_layers] + [r"re:^model\.layers\.92\."],
    }
    expected, optional = expected_inventory(arch, group_size, "BF16")
    names = sorted(k for k in expected if k not in optional)
    folder = out / f"W4A16_GS{group_size}"
    create_owned(folder, "the check benchmark's branch")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    for name, body in {
        "generation_config.json": "{}",
        "tokenizer_config.json": json.dumps({"chat_template": "{{ messages }}"}),
        "tokenizer.json": "{}",
        "recipe.yaml": "# benchmark\n",
        "provenance.json": "{}",
    }.items():
        (folder / name).write_text(body)
    weight_map = {}
    per_shard = -(-len(names) // N_SHARDS)
    for s in range(N_SHARDS):
        shard = f"model-{s + 1:05d}-of-{N_SHARDS:05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names[s * per_shard : (s + 1) * per_shard]:
            dtypes, shape = expected[name]
            dtype = "BF16" if "BF16" in dtypes else sorted(dtypes)[0]
            n = DTYPE_BYTES[dtype]
            for d in shape:
                n *= d
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = shard
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with (folder / shard).open("wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)  # sparse: the data region is a hole
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    def entries() -> dict[str, FileEntry]:
        return {
            p.name: FileEntry(
                p.stat().st_size,
                # shards are not hashed: the benchmark checks with --no-hash only
                sha256_file(p) if not p.name.endswith(".safetensors") else "0" * 64,
            )
            for p in sorted(folder.iterdir())
            if p.name != "manifest.json"
        }

    # a passed verification of exactly this content, as `glmrel verify` records it
    digest = Manifest(MANIFEST_SCHEMA, folder.name, entries(), {}).content_digest()
    (folder / "verify.json").write_text(json.dumps({"passed": True, "content_sha256": digest, "failures": []}))
    Manifest(MANIFEST_SCHEMA, folder.name, entries(), {}).write(folder / "manifest.json")
    return folder


def bench_check(out: Path, group_size: int) -> None:
    t0 = time.perf_counter()
    folder = build_sparse_branch(out, group_size)
    built = time.perf_counter() - t0
    apparent = sum(p.stat().st_size for p in folder.iterdir())
    on_disk = sum(p.stat().st_blocks * 512 for p in folder.iterdir())
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        report = check_branch(folder, no_hash=True)
        times.append(time.perf_counter() - t0)
    cold = subprocess.run(
        [sys.executable, "-m", "release.cli", "check", str(folder), "--no-hash", "--json"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    t_cli = json.loads(cold.stdout)["passed"] if cold.stdout else None
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "release.cli", "check", str(folder), "--no-hash"],
        capture_output=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    cli_s = time.perf_counter() - t0
    print(
        f"GLM-4.7-shaped W4A16_GS{group_size}: {report.tensors} tensors in {report.shards} shards, "
        f"{apparent / 2**30:.1f} GiB apparent, {on_disk / 2**20:.1f} MiB on disk (built in {built:.1f}s)"
    )
    print(
        f"check --no-hash (in process): best {min(times):.2f}s, runs {', '.join(f'{t:.2f}' for t in times)}; passed={report.passed}"
    )
    print(f"glmrel check --no-hash (fresh process, incl. imports): {cli_s:.2f}s; passed={t_cli}")
    print("target: < 5 s on a 2-core machine")
    for v in report.vllm:
        if v.target.startswith("Hopper") and v.tp in (4, 8):
            print("  ", v.summary())
    if not report.passed or t_cli is not True:  # a timing of a failing check measures nothing
        why = report.failures[0].message if report.failures else (cold.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"check did not pass on the benchmark branch: {why}")


def bench_hash(mib: int) -> None:
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as d:
        files = []
        for i in range(max(2, workers) * 2):
            p = Path(d) / f"f{i}.bin"
            with p.open("wb") as f:
                for _ in range(mib):
                    f.write(os.urandom(1 << 20))
            files.append(p)
        total = len(files) * mib
        # warm the page cache for both so neither pays the disk
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
        t0 = time.perf_counter()
        subprocess.run(["sha256sum", str(files[0])], stdout=subprocess.DEVNULL, check=True)
        one = time.perf_counter() - t0
        ref = mib / one
        t0 = time.perf_counter()
        hash_files(files, workers=workers)
        ours = total / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        hash_files(files[:1], workers=1)
        ours_one = mib / (time.perf_counter() - t0)
    print(f"sha256sum, one file, one core: {ref:.0f} MiB/s")
    print(f"glmrel, one file, one core:    {ours_one:.0f} MiB/s ({ours_one / ref:.0%} of sha256sum)")
    print(
        f"glmrel, {len(files)} files on {workers} cores: {ours:.0f} MiB/s = {ours / workers:.0f} MiB/s per core "
        f"({ours / workers / ref:.0%} of sha256sum per core; target >= 80%)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--hash-bench", action="store_true")
    ap.add_argument("--hash-mib", type=int, default=256)
    a = ap.parse_args()
    if a.hash_bench:
        bench_hash(a.hash_mib)
        return
    out = a.out or Path(tempfile.mkdtemp(prefix="glmrel-bench-"))
    try:
        bench_check(out, a.group_size)
    finally:
        if not a.keep and a.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
