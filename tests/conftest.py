"""Shared fixtures: the bundled digits data (loaded once) and tiny generated tensors."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def digits():
    from ddkit.data import load_dataset

    return load_dataset("digits")


@pytest.fixture
def tiny_real():
    """A 3-class, 1x8x8 RealData made of random tensors (for shape/plumbing tests only)."""
    from ddkit.api import real_from_tensors

    g = torch.Generator().manual_seed(0)
    xtr = torch.rand(60, 1, 8, 8, generator=g)
    ytr = torch.arange(3).repeat(20)
    xte = torch.rand(30, 1, 8, 8, generator=g)
    yte = torch.arange(3).repeat(10)
    return real_from_tensors(xtr, ytr, xte, yte, name="tiny")


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP barrier costs (large on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """The parity tests' device: CPU always, CUDA where one is present (skipped elsewhere)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)
