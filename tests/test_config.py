from pathlib import Path

import pytest

from release.config import load_config
from release.errors import ReleaseError

REPO = Path(__file__).resolve().parent.parent


def test_reference_release_config_is_the_published_recipe():
    cfg = load_config(REPO / "configs" / "glm-4.7.yaml")
    assert cfg.base_model.hub_id == "zai-org/GLM-4.7"
    assert [(b.name, b.group_size) for b in cfg.branches] == [
        ("W4A16_GS32", 32),
        ("W4A16_GS64", 64),
        ("W4A16_GS128", 128),
    ]
    c = cfg.calibration
    assert (c.dataset, c.split, c.num_samples, c.max_seq_length) == (
        "neuralmagic/LLM_compression_calibration",
        "train",
        512,
        2048,
    )
    assert c.moe_calibrate_all_experts is True
    assert cfg.dtype == "bfloat16"


def test_demo_config_loads_and_resolves_paths_against_its_folder():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.output_dir == (REPO / "out" / "demo").resolve()
    assert cfg.recipe.is_file()
    assert [b.group_size for b in cfg.branches] == [32, 64, 128]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"calibraton": {}}, "calibraton: unknown field (typo?)"),
        ({"calibration.num_sampels": 3}, "calibration.num_sampels: unknown field (typo?)"),
        ({"branches": [{"name": "A", "group_size": 48}]}, "group_size 48 is not one of"),
        ({"branches": [{"name": "A", "group_size": 32}, {"name": "A", "group_size": 64}]}, "repeated: A"),
        ({"branches": [{"name": "main", "group_size": 32}]}, "is reserved"),
        ({"hub_repo": "no-slash"}, "hub_repo 'no-slash' is not of the form owner/name"),
        ({"base_model": {"hub_id": "zai-org/GLM-4.7"}}, "base_model.revision is required"),
        ({"calibration.num_samples": 0}, "calibration.num_samples: Input should be greater than or equal to 1"),
        ({"offload.cpu_gib": 0}, "offload.cpu_gib: Input should be greater than 0"),
        ({"offload.folder_": "x"}, "offload.folder_: unknown field (typo?)"),
    ],
)
def test_bad_config_names_the_field(write_config, overrides, expected):
    with pytest.raises(ReleaseError) as e:
        load_config(write_config(overrides))
    assert expected in e.value.message


def test_missing_and_non_mapping_configs(tmp_path):
    with pytest.raises(ReleaseError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ReleaseError, match="YAML mapping at the top level, not list") as e:
        load_config(p)
    assert "configs/glm-4.7.yaml" in e.value.hint
    p.write_text("")
    with pytest.raises(ReleaseError, match="YAML mapping at the top level, not empty") as e:
        load_config(p)
    assert e.value.hint
    p.write_text("name: [unclosed\n")
    with pytest.raises(ReleaseError, match="not valid YAML"):
        load_config(p)


def test_unknown_branch_lists_the_known_ones():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    with pytest.raises(ReleaseError) as e:
        cfg.branch("W4A16_GS16")
    assert "W4A16_GS32, W4A16_GS64, W4A16_GS128" in e.value.hint


def test_loading_a_config_loads_neither_the_engine_nor_torch():
    """The config owns its options: the light path (check, render, publish) never loads the AWQ engine."""
    import subprocess
    import sys

    code = (
        "import sys; from release.config import load_config; load_config('configs/glm-4.7.yaml'); "
        "print(sorted(m for m in ('release.awq', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_offload_folder_resolves_against_the_config(write_config, tmp_path):
    cfg = load_config(write_config({"offload": {"cpu_gib": 48, "folder": "scratch/offload"}}))
    assert cfg.offload.cpu_gib == 48 and cfg.offload.folder == (tmp_path / "scratch" / "offload").resolve()
    assert load_config(write_config()).offload.cpu_gib is None, "in RAM unless asked"


def test_the_config_reference_page_is_the_configs_own_definition():
    """docs/config.md is made from ReleaseConfig (`make docs`): every key the loader accepts is on
    it with its default and a description, and nothing else."""
    from release.reference import reference_markdown

    page = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    assert page == reference_markdown(), "docs/config.md is stale: run `make docs`"
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert len(rows) > 40 and all(not line.endswith("|  |") for line in rows), "a key without a description"
    for key in ("awq.fused_gpu_experts", "offload.cpu_gib", "branches[].group_size", "calibration.num_samples"):
        assert f"| `{key}` |" in page


def test_activations_on_gpu_is_how_not_what(write_config):
    """`calibration.activations_on_gpu` says where llm-compressor keeps the cached layer inputs
    (the GPU, else host RAM; host RAM without a GPU): it changes no value, so it is not part of
    a branch's fingerprint (a branch built any way is up to date for the others). `auto` (the
    default) keeps them on the GPU where they take at most 10 % of its memory: GLM-4.7's
    512 x 2048 on one H200 (141 GB) but not on an 80 GB card, and on 80 GB cards with 2 ranks."""
    import torch

    from release.build.branch_folder import prepare_branch
    from release.build.calibrate import AUTO_ACTIVATIONS_SHARE, activations_device, cached_activation_bytes

    auto = load_config(write_config())
    assert auto.calibration.activations_on_gpu == "auto"
    off = load_config(write_config({"calibration.activations_on_gpu": False}, name="off.yaml"))
    on = load_config(write_config({"calibration.activations_on_gpu": True}, name="on.yaml"))
    fingerprints = {prepare_branch(c, c.branches[0]).fingerprint for c in (auto, off, on)}
    assert len(fingerprints) == 1
    assert activations_device(off, 5120) == "cpu"
    if not torch.cuda.is_available():
        assert activations_device(on, 5120) == activations_device(auto, 5120) == "cpu"
    glm = load_config(
        write_config(
            {"calibration.num_samples": 512, "calibration.max_seq_length": 2048, "dtype": "bfloat16"}, name="glm.yaml"
        )
    )
    need = cached_activation_bytes(glm, 5120)
    assert need == 512 * 2048 * 5120 * 2
    assert need <= AUTO_ACTIVATIONS_SHARE * 141e9 and need > AUTO_ACTIVATIONS_SHARE * 85e9
    assert cached_activation_bytes(glm, 5120, ranks=2) <= AUTO_ACTIVATIONS_SHARE * 85e9
    with pytest.raises(ReleaseError, match="activations_on_gpu"):
        load_config(write_config({"calibration.activations_on_gpu": "sometimes"}, name="bad.yaml"))
