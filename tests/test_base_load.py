"""How a build loads its base model (release/build/calibrate.py `load_base_model`): a checkpoint
that stores its experts one Linear each (GLM-4.7's layout) loads straight into per-expert
Linears, so an offloaded load writes nothing; a fused checkpoint is loaded and linearized; a
checkpoint missing a weight is refused, never loaded with a random one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from release.errors import ReleaseError
from release.layout import experts_per_expert
from release.owned import MARKER


def _state(model) -> dict:
    """Every tensor of the model by name, on the CPU (offloaded ones read back)."""
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def _written(folder: Path) -> tuple[int, int]:
    """Bytes of the regular files under `folder` (glmrel's ownership marker aside), and the
    number of symlinks there."""
    files = [Path(r) / f for r, _, fs in os.walk(folder) for f in fs if f != MARKER]
    return sum(f.stat().st_size for f in files if not f.is_symlink()), sum(f.is_symlink() for f in files)


def _copy_checkpoint(src: Path, dst: Path, change) -> Path:
    """`src` copied into `dst` with its one shard's tensors passed through `change(dict) -> dict`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = change(load_file(str(src / "model.safetensors")))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_experts_per_expert_reads_the_layout_from_the_names():
    per = {"model.layers.1.mlp.experts.0.gate_proj.weight": "a", "model.layers.1.mlp.gate.weight": "a"}
    fused = {"model.layers.1.mlp.experts.gate_up_proj": "a", "model.layers.1.mlp.experts.down_proj": "a"}
    assert experts_per_expert(per)
    assert not experts_per_expert(fused)
    assert not experts_per_expert(per | fused), "a checkpoint with both layouts is not loaded straight"
    assert not experts_per_expert({"model.layers.0.mlp.gate_proj.weight": "a"}), "a dense model has no experts"


def test_a_per_expert_checkpoint_loads_straight_into_linears_and_offloads_without_writing(write_config, demo_assets):
    """The demo checkpoint stores its experts per expert. Loaded in RAM it gives exactly the
    model that loading and then linearizing gives; offloaded (cap ~2 MB: nearly every weight on
    disk) the offload folder holds only symlinks into the checkpoint after loading (the old path
    wrote every expert twice: fused by transformers, then linearized). A plain load afterwards
    still builds transformers' fused experts: the load mapping was put back."""
    import torch
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import AutoModelForCausalLM
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    from release.build import calibrate
    from release.config import load_config

    registered = [repr(m) for m in get_checkpoint_conversion_mapping("glm4_moe")]
    old = linearize_moe(AutoModelForCausalLM.from_pretrained(demo_assets.model, dtype=torch.bfloat16).eval())
    expected = _state(old)

    cfg = load_config(write_config({"dtype": "bfloat16"}))
    model = calibrate.load_base_model(cfg, demo_assets.model, "t", echo=lambda s: None)
    assert isinstance(model.model.layers[1].mlp.experts, LinearExperts2D)
    got = _state(model)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)

    offloaded = load_config(write_config({"dtype": "bfloat16", "offload.cpu_gib": 0.002}))
    folder = calibrate.offload_folder(offloaded)
    try:
        model = calibrate.load_base_model(offloaded, demo_assets.model, "t", echo=lambda s: None)
        written, links = _written(folder)
        assert written == 0 and links > 50, f"loading wrote {written} bytes into the offload ({links} symlinks)"
        got = _state(model)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    finally:
        del model
        calibrate.forget_offload(folder)

    assert [repr(m) for m in get_checkpoint_conversion_mapping("glm4_moe")] == registered
    plain = AutoModelForCausalLM.from_pretrained(demo_assets.model, dtype=torch.bfloat16)
    assert not isinstance(plain.model.layers[1].mlp.experts, LinearExperts2D)
    assert hasattr(plain.model.layers[1].mlp.experts, "gate_up_proj")


def test_a_fused_checkpoint_is_loaded_then_linearized_to_the_same_model(write_config, demo_assets, tmp_path):
    """A checkpoint whose experts are stored fused (transformers' in-memory layout) takes the
    other path and ends as the same per-expert model."""
    import torch

    from release.build import calibrate
    from release.config import load_config

    def fuse(tensors: dict) -> dict:
        out, layers = dict(tensors), sorted({k.split(".mlp.experts.")[0] for k in tensors if ".mlp.experts.0." in k})
        for layer in layers:
            n = sum(1 for k in tensors if k.startswith(f"{layer}.mlp.experts.") and k.endswith(".gate_proj.weight"))

            def take(proj: str, layer: str = layer, n: int = n) -> torch.Tensor:
                return torch.stack([out.pop(f"{layer}.mlp.experts.{e}.{proj}.weight") for e in range(n)])

            gate, up, down = take("gate_proj"), take("up_proj"), take("down_proj")
            out[f"{layer}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
            out[f"{layer}.mlp.experts.down_proj"] = down.contiguous()
        return out

    fused_dir = _copy_checkpoint(demo_assets.model, tmp_path / "fused", fuse)
    from release.layout import read_weight_map

    assert not experts_per_expert(read_weight_map(fused_dir))
    cfg = load_config(write_config({"dtype": "bfloat16"}))
    straight = _state(calibrate.load_base_model(cfg, demo_assets.model, "t", echo=lambda s: None))
    fused = calibrate.load_base_model(cfg, fused_dir, "t", echo=lambda s: None)
    got = _state(fused)
    assert got.keys() == straight.keys() and all(torch.equal(got[k], straight[k]) for k in got)


def test_a_checkpoint_missing_an_expert_weight_is_refused(write_config, demo_assets, tmp_path):
    """One expert's tensor deleted from the checkpoint: the load names it and stops, rather
    than calibrating a model with that expert's weight left at its random initialization."""
    from release.build import calibrate
    from release.config import load_config

    gone = "model.layers.1.mlp.experts.3.up_proj.weight"
    broken = _copy_checkpoint(
        demo_assets.model, tmp_path / "broken", lambda t: {k: v for k, v in t.items() if k != gone}
    )
    cfg = load_config(write_config({"dtype": "bfloat16"}))
    with pytest.raises(ReleaseError) as err:
        calibrate.load_base_model(cfg, broken, "t", echo=lambda s: None)
    assert gone in str(err.value) and "random" in str(err.value)
    assert err.value.hint and "complete" in err.value.hint


def test_the_load_report_counts_folded_rows_and_names_what_is_not_the_mtp_layer():
    """transformers folds the experts' names into one row of its load report
    (`experts.{0, 1}.up_proj.weight`); such rows are counted per tensor, and one that is not
    the MTP layer's (here: a missing expert weight of layer 1) is named in a warning."""
    import logging

    from release.console import load_report

    report = (
        "\x1b[1mGlm4MoeForCausalLM LOAD REPORT\x1b[0m from: base\n"
        "Key                                   | Status     |  | \n"
        "--------------------------------------+------------+--+-\n"
        "model.layers.4.mlp.experts.{0, 1, 2}.up_proj.weight | UNEXPECTED |  | \n"
        "model.layers.4.eh_proj.weight         | UNEXPECTED |  | \n"
        "model.layers.1.mlp.experts.{5, 6}.down_proj.weight | MISSING |  | \n"
    )
    said: list[str] = []
    with load_report([4], said.append):
        logging.getLogger("transformers").warning(report)
    assert any("MTP layer (4 tensors under model.layers.4.*)" in s for s in said), said
    assert any(
        s.startswith("warning:") and "model.layers.1.mlp.experts.{5, 6}.down_proj.weight (MISSING)" in s for s in said
    ), said
