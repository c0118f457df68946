import pytest

from release.config import load_config
from release.errors import ReleaseError
from release.verify import load_heldout, vllm_check


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
