"""Partitioners: the examples of every source -> the examples of every site.

One registry, ``PARTITIONERS``; ``data.partition.strategy`` picks one:

* ``by_source`` — one site per source, named by the source's ``site`` (or its
  name); sources naming the same site are merged into it, in config order.
* ``iid`` — every source pooled, shuffled, dealt evenly to ``site-1..N``.
* ``dirichlet`` — label skew: for each label, the site shares of its records are
  drawn from Dir(alpha); small alpha gives each site a few dominant labels,
  large alpha approaches IID. Redrawn until every site holds at least
  ``min_site_records`` records.

Every random draw comes from the experiment seed, so the same config always
gives the same sites with the same records.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional

import numpy as np

from fedllm.config import PartitionConfig
from fedllm.data.records import Example
from fedllm.data.seeding import rng_for
from fedllm.errors import FedllmError

# Draws of Dirichlet shares before giving up on min_site_records: enough that a
# feasible setting virtually never fails, bounded so an infeasible one fails fast.
MAX_DIRICHLET_DRAWS = 1000

Partitioner = Callable[[dict[str, list[Example]], PartitionConfig, int, Mapping[str, str]], dict[str, list[Example]]]

_EXAMPLE_FIELDS = {f.name for f in dataclasses.fields(Example)}


def partition_examples(
    by_source: dict[str, list[Example]],
    part: PartitionConfig,
    seed: int,
    site_of: Optional[Mapping[str, str]] = None,
) -> dict[str, list[Example]]:
    """Site name -> its examples, sites in a stable order (config order for
    ``by_source``, ``site-1..N`` otherwise); every site holds at least one record.

    ``by_source`` maps source name -> examples, in config order. ``site_of`` maps
    a source name to its site for ``by_source`` (default: the source name).
    """
    sites = get_partitioner(part.strategy)(by_source, part, seed, site_of or {})
    for site, examples in sites.items():
        if not examples:
            raise FedllmError(f"site {site!r}: the {part.strategy} partition left it without records")
    return sites


def _pool(by_source: dict[str, list[Example]]) -> list[Example]:
    return [ex for examples in by_source.values() for ex in examples]


def _num_sites(part: PartitionConfig, records: int) -> int:
    n = part.num_sites
    if n is None or n < 1:
        raise FedllmError(
            f"config field 'data.partition.num_sites': a positive integer is required for {part.strategy}, got {n}"
        )
    if n > records:
        raise FedllmError(f"config field 'data.partition.num_sites': {n} sites but only {records} records to share")
    return n


def _by_source(
    by_source: dict[str, list[Example]], part: PartitionConfig, seed: int, site_of: Mapping[str, str]
) -> dict[str, list[Example]]:
    sites: dict[str, list[Example]] = {}
    for name, examples in by_source.items():
        sites.setdefault(site_of.get(name) or name, []).extend(examples)
    if part.num_sites is not None and part.num_sites != len(sites):
        raise FedllmError(
            f"config field 'data.partition.num_sites': by_source makes one site per source site name "
            f"({len(sites)}: {', '.join(sites)}), got {part.num_sites}; leave it null"
        )
    return sites


def _iid(
    by_source: dict[str, list[Example]], part: PartitionConfig, seed: int, site_of: Mapping[str, str]
) -> dict[str, list[Example]]:
    pool = _pool(by_source)
    n = _num_sites(part, len(pool))
    order = rng_for(seed, "partition", "iid").permutation(len(pool))
    # array_split: site sizes differ by at most one; each site keeps the pool's order
    return {f"site-{k + 1}": [pool[i] for i in sorted(chunk)] for k, chunk in enumerate(np.array_split(order, n))}


def label_of(example: Example, label_field: str) -> Optional[str]:
    """The label a Dirichlet partition splits over: an Example field
    (``label``, ``source``) or else a key of ``example.meta``."""
    value = getattr(example, label_field) if label_field in _EXAMPLE_FIELDS else example.meta.get(label_field)
    return None if value is None or value == "" else str(value)


def _dirichlet(
    by_source: dict[str, list[Example]], part: PartitionConfig, seed: int, site_of: Mapping[str, str]
) -> dict[str, list[Example]]:
    if part.alpha <= 0:
        raise FedllmError(f"config field 'data.partition.alpha': must be > 0 for dirichlet, got {part.alpha}")
    pool = _pool(by_source)
    n = _num_sites(part, len(pool))
    labels = [label_of(ex, part.label_field) for ex in pool]
    for ex, label in zip(pool, labels):
        if label is None:
            raise FedllmError(
                f"data source {ex.source!r}: record {ex.origin} has no {part.label_field!r}; a dirichlet "
                f"partition needs one on every record (data.partition.label_field), or use strategy iid"
            )
    need = max(1, part.min_site_records)
    if need * n > len(pool):
        raise FedllmError(
            f"config field 'data.partition.min_site_records': {n} sites × {need} records needs "
            f"{need * n}, but there are only {len(pool)} records"
        )

    by_label = {lab: np.array([i for i, l in enumerate(labels) if l == lab]) for lab in sorted(set(labels))}
    rng = rng_for(seed, "partition", "dirichlet")
    smallest = 0
    for _ in range(MAX_DIRICHLET_DRAWS):
        assigned: list[list[int]] = [[] for _ in range(n)]
        for indices in by_label.values():
            indices = rng.permutation(indices)
            shares = rng.dirichlet(np.full(n, part.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
            for site, chunk in enumerate(np.split(indices, cuts)):
                assigned[site].extend(chunk.tolist())
        smallest = min(len(a) for a in assigned)
        if smallest >= need:
            return {f"site-{k + 1}": [pool[i] for i in sorted(a)] for k, a in enumerate(assigned)}
    raise FedllmError(
        f"config field 'data.partition.min_site_records': no Dirichlet draw in {MAX_DIRICHLET_DRAWS} tries gave "
        f"each of {n} sites ≥ {need} records (alpha={part.alpha}, {len(pool)} records, {len(by_label)} labels; "
        f"smallest site in the last draw: {smallest}); raise alpha, lower num_sites or min_site_records"
    )


PARTITIONERS: dict[str, Partitioner] = {
    "by_source": _by_source,
    "iid": _iid,
    "dirichlet": _dirichlet,
}


def get_partitioner(strategy: str) -> Partitioner:
    """The registered partitioner ``strategy``; an error naming the config field and the
    allowed values otherwise."""
    if strategy not in PARTITIONERS:
        raise FedllmError(
            f"config field 'data.partition.strategy': unknown strategy {strategy!r}; "
            f"allowed values: {', '.join(PARTITIONERS)}"
        )
    return PARTITIONERS[strategy]
