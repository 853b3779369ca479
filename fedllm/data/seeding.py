"""Named random streams: every random choice in the data layer draws from one.

A stream is fixed by the experiment seed and a few names (``"split"``, a site
name, a source name), so changing one source's ``max_records`` does not reshuffle
another source, and the same config always gives the same rows in the same order.
"""

from __future__ import annotations

import hashlib

import numpy as np


def rng_for(seed: int, *names: str) -> np.random.Generator:
    """A numpy Generator determined only by ``seed`` and ``names``.

    Python's ``hash()`` is salted per process, so the names are hashed with
    sha256 to keep the stream identical across runs and machines.
    """
    key = "\x1f".join([str(seed), *names]).encode()
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:16], "big"))


def sample_indices(n: int, k: int, rng: np.random.Generator) -> list[int]:
    """``k`` distinct indices out of ``range(n)``, chosen at random, in ascending
    order (so a subset keeps the order the records had in their file)."""
    if k >= n:
        return list(range(n))
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False))
