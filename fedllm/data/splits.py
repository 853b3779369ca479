"""A site's examples -> train / val / test (the seed's 80/10/10 by default)."""

from __future__ import annotations

import math

from fedllm.config import SplitConfig
from fedllm.data.records import Example
from fedllm.data.seeding import rng_for
from fedllm.errors import FedllmError

SPLITS = ("train", "val", "test")


def split_examples(examples: list[Example], split: SplitConfig, seed: int, key: str) -> dict[str, list[Example]]:
    """``{"train": [...], "val": [...], "test": [...]}`` from a seeded shuffle.

    ``key`` (the site name) picks the random stream, so sites are shuffled
    independently. Every split with a fraction > 0 gets at least one record;
    a split with fraction 0 is empty. Raises FedllmError naming the site when it
    has too few records for that.
    """
    fractions = {"train": split.train, "val": split.val, "test": split.test}
    if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6 or split.train <= 0:
        raise FedllmError(
            f"config field 'data.split': fractions must be ≥ 0 and sum to 1 with train > 0, "
            f"got {split.train}/{split.val}/{split.test}"
        )
    n = len(examples)
    # round half up (Python's round() is half-to-even), and never round a wanted split to zero
    sizes = {s: max(1, math.floor(n * fractions[s] + 0.5)) if fractions[s] > 0 else 0 for s in ("val", "test")}
    sizes["train"] = n - sizes["val"] - sizes["test"]
    if sizes["train"] < 1:
        wanted = sum(1 for f in fractions.values() if f > 0)
        raise FedllmError(
            f"site {key!r}: {n} records cannot fill train/val/test "
            f"{split.train}/{split.val}/{split.test} with at least one record each; it needs ≥ {wanted}"
        )
    order = rng_for(seed, "split", key).permutation(n)
    shuffled = [examples[i] for i in order]
    return {
        "train": shuffled[: sizes["train"]],
        "val": shuffled[sizes["train"] : sizes["train"] + sizes["val"]],
        "test": shuffled[sizes["train"] + sizes["val"] :],
    }
