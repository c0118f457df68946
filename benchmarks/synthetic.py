"""Random-init GLM-4-MoE checkpoints at chosen sizes, for GPU runs and benchmarks.

Presets:
  tiny    the demo's dimensions (CI-sized)
  medium  hidden 2048, 6 layers (1 dense), 64 experts top-8: ~1.6B params, a real GPU workload
  glm47   GLM-4.7's real per-layer dimensions (hidden 5120, 96/8 heads, 160 experts top-8,
          moe_intermediate 1536, shared expert); --layers sets the depth (--dense of them dense, 1 by
          default; --layers 1 --dense 0 is one MoE layer)

The tokenizer, calibration conversations and held-out text are the demo's, so no network is
needed; the config's vocab_size keeps GLM-4.7's where the preset asks (unused rows are harmless).

  python -m benchmarks.synthetic --preset medium --out /tmp/syn [--layers 6] [--device cuda]
writes /tmp/syn/model and /tmp/syn/release.yaml (one branch per --group-size).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from release.owned import create_owned

PRESETS = {
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        n_routed_experts=8,
        num_experts_per_tok=2,
        layers=4,
        vocab_size=None,
    ),
    "medium": dict(
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        n_routed_experts=64,
        num_experts_per_tok=8,
        layers=6,
        vocab_size=None,
    ),
    "glm47": dict(
        hidden_size=5120,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_attention_heads=96,
        num_key_value_heads=8,
        head_dim=128,
        n_routed_experts=160,
        num_experts_per_tok=8,
        layers=2,
        vocab_size=151552,
    ),
}


def build(
    preset: str,
    out: Path,
    layers: int | None,
    device: str,
    group_sizes: list[int],
    samples: int,
    seq: int,
    dense: int = 1,
) -> Path:
    import torch
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    from release.tiny import GLM4MOE_FEATURES, _append_mtp_layer, demo_texts

    out = out.resolve()  # the release config holds these paths, and reads them relative to itself
    # the demo's tokenizer and texts, not its trained model: a fresh GPU machine spent a minute
    # or more of each call's device time training a model this benchmark does not use
    tok, assets = demo_texts(out / "texts")
    p = dict(PRESETS[preset])
    n_layers = layers or p.pop("layers")
    p.pop("layers", None)
    vocab = p.pop("vocab_size") or len(tok)
    cfg = Glm4MoeConfig(
        vocab_size=vocab,
        num_hidden_layers=n_layers,
        max_position_embeddings=max(4096, seq),
        **{**GLM4MOE_FEATURES, "first_k_dense_replace": dense},
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        **p,
    )
    t0 = time.time()
    torch.manual_seed(0)
    with torch.device(device):
        model = Glm4MoeForCausalLM(cfg).to(torch.bfloat16)
        with torch.no_grad():
            for layer in model.model.layers[dense:]:
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.01)
    model_dir = out / "model"
    create_owned(model_dir, "the synthetic base model")  # never empties a folder glmrel did not make
    model.to("cpu").save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    if not (model_dir / "model.safetensors").exists():  # sharded: append MTP to a shard of its own
        _append_mtp_sharded(model_dir, cfg)
    else:
        from safetensors.torch import load_file, save_file

        _append_mtp_layer(model_dir, cfg, load_file, save_file)
    n_params = sum(x.numel() for x in model.parameters())
    print(f"built {preset} ({n_layers} layers, {n_params / 1e9:.2f}B params) in {time.time() - t0:.0f}s -> {model_dir}")
    rows = assets.calibration.read_text().splitlines()
    calib = out / "calibration.jsonl"
    # enough conversations for `samples`: repeat the demo's, each made long enough for `seq`
    with calib.open("w") as f:
        for i in range(max(samples, len(rows))):
            msgs = json.loads(rows[i % len(rows)])["messages"]
            while sum(len(m["content"]) for m in msgs) < seq * 4:
                msgs = msgs + json.loads(rows[(i + len(msgs)) % len(rows)])["messages"]
            f.write(json.dumps({"messages": msgs}) + "\n")
    release = {
        "name": f"synthetic-{preset}",
        "base_model": {"path": str(model_dir)},
        "hub_repo": f"glmrel-bench/synthetic-{preset}",
        "output_dir": str(out / "branches"),
        "recipe": str(Path(__file__).resolve().parent.parent / "recipes" / "glm4moe_awq_w4a16.yaml.j2"),
        "calibration": {"path": str(calib), "num_samples": samples, "max_seq_length": seq, "seed": 42},
        "branches": [{"name": f"W4A16_GS{g}", "group_size": g} for g in group_sizes],
        # random weights: the thresholds only catch a broken branch, not a bad quantization
        "verify": {"heldout": str(assets.heldout), "max_tokens": 256, "max_kl": 2.0, "min_top1": 0.3},
        "dtype": "bfloat16",
    }
    path = out / "release.yaml"
    path.write_text(yaml.safe_dump(release, sort_keys=False))
    return path


def _append_mtp_sharded(model_dir: Path, cfg) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    n, last = cfg.num_hidden_layers, cfg.num_hidden_layers - 1
    sd = {}
    for key, shard in index["weight_map"].items():
        if key.startswith(f"model.layers.{last}.") or key in ("lm_head.weight", "model.embed_tokens.weight"):
            with safe_open(str(model_dir / shard), "pt") as h:
                sd[key] = h.get_tensor(key)
    mtp = {
        k.replace(f"model.layers.{last}.", f"model.layers.{n}.", 1): v
        for k, v in sd.items()
        if k.startswith("model.layers.")
    }
    h = cfg.hidden_size
    p = f"model.layers.{n}."
    mtp[p + "eh_proj.weight"] = (torch.randn(h, 2 * h) * 0.02).to(torch.bfloat16)
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        mtp[p + norm + ".weight"] = torch.ones(h, dtype=torch.bfloat16)
    mtp[p + "shared_head.head.weight"] = sd["lm_head.weight"].clone()
    mtp[p + "embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(mtp, str(model_dir / "model-mtp.safetensors"), metadata={"format": "pt"})
    index["weight_map"].update({k: "model-mtp.safetensors" for k in mtp})
    index_path.write_text(json.dumps(index, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--dense", type=int, default=1, help="how many of the layers are dense (GLM-4.7: 3 of 92)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--group-size", type=int, action="append", default=None)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    a = ap.parse_args()
    print(build(a.preset, a.out, a.layers, a.device, a.group_size or [128], a.samples, a.seq, a.dense))


if __name__ == "__main__":
    main()
