"""Cards from recorded build data: golden text, metadata round-trip, determinism, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard

from release.cli import cli
from release.config import load_config
from release.errors import ReleaseError
from release.manifest import write_manifest
from release.render import render_release

REPO = Path(__file__).resolve().parent.parent
RECORDS = Path(__file__).resolve().parent / "data" / "demo-records"
GOLDEN = Path(__file__).resolve().parent / "golden"
BRANCHES = ("W4A16_GS32", "W4A16_GS64", "W4A16_GS128")


@pytest.fixture()
def recorded_release(tmp_path):
    """The demo release's recorded files (no weights: shards are sparse files of the recorded size)."""
    out = tmp_path / "out"
    for b in BRANCHES:
        shutil.copytree(RECORDS / b, out / b)
        for name, size in json.loads((out / b / "shard_sizes.json").read_text()).items():
            with (out / b / name).open("wb") as f:
                f.truncate(size)
        (out / b / "shard_sizes.json").unlink()
        write_manifest(out / b, b)  # sealed, as a build leaves it
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["base_model"]["path"] = str(tmp_path)
    raw["output_dir"] = str(out)
    raw["recipe"] = str(REPO / "recipes" / "glm4moe_awq_w4a16.yaml.j2")
    raw["changelog"] = str(REPO / "releases" / "demo-changelog.yaml")
    raw["calibration"]["path"] = str(tmp_path / "calibration.jsonl")
    raw["verify"]["heldout"] = str(tmp_path / "heldout.json")
    raw.pop("publish_remote", None)
    path = tmp_path / "release.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_cards_match_golden_files(recorded_release):
    cfg = load_config(recorded_release)
    result = render_release(cfg, "v1")
    for name in (*BRANCHES, "main"):
        text = result.cards[name].read_text()
        golden = GOLDEN / f"{name}.md"
        if os.environ.get("GLMREL_UPDATE_GOLDEN"):
            golden.write_text(text)
        assert text == golden.read_text(), f"{name} card drifted from {golden} (GLMREL_UPDATE_GOLDEN=1 to accept)"


def test_metadata_round_trips_through_model_card(recorded_release):
    cfg = load_config(recorded_release)
    result = render_release(cfg)
    for path in result.cards.values():
        data = ModelCard.load(path).data
        assert data.base_model == "glmrel-demo/tiny-glm4moe"
        assert data.base_model_relation == "quantized"
        assert data.license == "mit"
        assert data.pipeline_tag == "text-generation"
        assert {"compressed-tensors", "awq", "w4a16", "int4", "moe", "vllm"} <= set(data.tags)


def test_rendering_is_deterministic(recorded_release):
    cfg = load_config(recorded_release)
    first = {n: p.read_bytes() for n, p in render_release(cfg).cards.items()}
    plot = (cfg.output_dir / "W4A16_GS32" / "expert_coverage.png").read_bytes()
    second = {n: p.read_bytes() for n, p in render_release(cfg).cards.items()}
    assert first == second
    assert plot == (cfg.output_dir / "W4A16_GS32" / "expert_coverage.png").read_bytes()
    assert plot.startswith(b"\x89PNG")


def test_every_figure_is_traceable_to_a_branch_file(recorded_release):
    cfg = load_config(recorded_release)
    render_release(cfg)
    for b in BRANCHES:
        folder = cfg.output_dir / b
        card = (folder / "README.md").read_text()
        q = json.loads((folder / "verify.json").read_text())
        cov = json.loads((folder / "expert_coverage.json").read_text())
        prov = json.loads((folder / "provenance.json").read_text())
        assert f"{q['mean_kl']:.6f}" in card and f"{100 * q['top1_agreement']:.2f}%" in card
        assert f"{q['branch_perplexity']:.3f} / {q['base_perplexity']:.3f}" in card
        s = cov["summary"]
        assert f"{s['routed_min']} – {s['routed_max']}" in card
        assert f"| experts with no token at all | {s['routed_below']['0']} | 0 |" in card
        c = prov["calibration"]
        assert f"{c['num_samples']} of {c['rows_available']} conversations chosen with seed {c['seed']}" in card
        assert "INT4" in card and "INT8" not in card
        assert "![Calibration tokens per expert" in card and (folder / "expert_coverage.png").is_file()
    landing = (cfg.output_dir / "main" / "README.md").read_text()
    assert not list((cfg.output_dir / "main").glob("*.safetensors"))
    for b in BRANCHES:
        assert f"[`{b}`](https://huggingface.co/glmrel-demo/tiny-glm4moe-W4A16/tree/{b})" in landing


def test_unknown_changelog_version(recorded_release):
    res = CliRunner().invoke(cli, ["render", "--config", str(recorded_release), "--changelog", "v9"])
    assert res.exit_code == 1
    assert "Error: changelog" in res.output and "has no version 'v9' (it has: v1)" in res.output


def test_missing_value_names_template_line_and_key(recorded_release, tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    text = (templates / "branch.md.j2").read_text().replace("{{ b.description }}", "{{ b.no_such_field }}")
    (templates / "branch.md.j2").write_text(text)
    raw = yaml.safe_load(recorded_release.read_text())
    raw["templates"] = str(templates)
    recorded_release.write_text(yaml.safe_dump(raw))
    with pytest.raises(ReleaseError) as e:
        render_release(load_config(recorded_release))
    assert e.value.message.startswith("template branch.md.j2 line 4:")
    assert "no_such_field" in e.value.message


def test_license_the_hub_would_reject(recorded_release):
    raw = yaml.safe_load(recorded_release.read_text())
    raw["base_model"]["license"] = "MIT License"
    recorded_release.write_text(yaml.safe_dump(raw))
    with pytest.raises(ReleaseError, match="license 'MIT License' is not a license id the Hub accepts"):
        render_release(load_config(recorded_release))


def test_card_names_the_awq_engine_the_branch_was_built_with():
    """Read from the branch's provenance; branches recorded before it was written say nothing."""
    from release.render import awq_engine_text

    gram = {"timings_s": {"awq_engine": {"engine": "glmrel", "expert_search": "gram", "max_expert_tokens": None}}}
    assert "Gram matrix of every calibration token" in awq_engine_text(gram)
    sampled = {"timings_s": {"awq_engine": {"engine": "glmrel", "expert_search": "sampled", "max_expert_tokens": 256}}}
    assert "at most 256 of its calibration tokens" in awq_engine_text(sampled)
    assert awq_engine_text({"timings_s": {"awq_engine": {"engine": "stock"}}}) == "llm-compressor's AWQ as released"
    assert awq_engine_text({"timings_s": {}}) is None


def test_glm47_cards_carry_its_serving_flags_and_the_vllm_release():
    """GLM-4.7's parsers (vLLM 0.33.0's registry names), MTP speculative decoding, languages, and
    the vLLM release whose rules decided the verdicts, in the card metadata."""
    from huggingface_hub import ModelCard

    from release.config import load_config
    from release.render import card_data, compose_card, mtp_flag, serve_flags
    from release.serving.rules import VLLM_VERSION

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "glm-4.7.yaml")
    assert serve_flags(cfg) == "--enable-auto-tool-choice --tool-call-parser glm47 --reasoning-parser glm47"
    assert mtp_flag(cfg) == """--speculative-config '{"method": "mtp", "num_speculative_tokens": 1}'"""
    meta = ModelCard(compose_card(card_data(cfg), "body\n")).data.to_dict()
    assert meta["language"] == ["en", "zh"] and meta["vllm_version"] == VLLM_VERSION
    assert meta["datasets"] == ["neuralmagic/LLM_compression_calibration"]
