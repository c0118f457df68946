"""The demo's reproducible CPU numerics (release/numerics.py): the threads a process gets."""

from __future__ import annotations

import os

import pytest
import torch

from release.numerics import THREADS, pin_reproducible_cpu, threads_per_process


@pytest.mark.parametrize(
    "local_ranks, threads", [(None, THREADS), ("1", THREADS), ("2", THREADS // 2), ("8", 1), ("x", THREADS)]
)
def test_torchrun_ranks_share_the_threads_of_their_host(monkeypatch, local_ranks, threads):
    """One process gets THREADS; each of torchrun's ranks on a host (LOCAL_WORLD_SIZE) its
    share, never less than one: two ranks of two threads on two cores made a CPU rank's
    matmuls 5-10x slower (a two-rank pass of the demo: 44.6 s, 16.9 s with one thread each)."""
    if local_ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
    assert threads_per_process() == threads


def test_a_rank_whose_torch_is_loaded_still_gets_its_share(monkeypatch):
    """torch is loaded here (with the pinned kernels, tests/conftest.py): the thread count is
    still set, for this process and (through OMP_NUM_THREADS) its children."""
    before = torch.get_num_threads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", str(THREADS))
    try:
        pin_reproducible_cpu()
        assert torch.get_num_threads() == THREADS // 2 and os.environ["OMP_NUM_THREADS"] == str(THREADS // 2)
    finally:
        torch.set_num_threads(before)
