"""Named random streams.

All randomness flows from explicit ``torch.Generator`` objects derived from the user's seed and a stream name,
so that, e.g., periodic evaluation never perturbs the distillation stream (exact resume) and nothing ever
reseeds the global RNG behind the user's back (the official DSA code reseeds it from the wall clock).
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed determined by ``seed`` and a path of stream names."""
    text = "/".join([str(int(seed))] + [str(n) for n in names])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, *names: object) -> torch.Generator:
    """A CPU generator for the named stream (sampling happens on CPU; results are moved to the device)."""
    return torch.Generator().manual_seed(derive_seed(seed, *names))


def draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


@contextlib.contextmanager
def seeded_global(generator_or_seed: torch.Generator | int) -> Iterator[None]:
    """Run a block that uses the global RNG (e.g. ``nn.Module`` initialisers) deterministically, then restore it.

    The global CPU RNG state is forked, so the caller's global RNG is exactly as before afterwards.
    """
    seed = generator_or_seed if isinstance(generator_or_seed, int) else draw_seed(generator_or_seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
