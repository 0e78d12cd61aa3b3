"""P x K batch sampler for pair-wise losses: each batch holds P classes with K images each.

Every epoch walks the data once: each class's images are shuffled and cut into groups of K (the last group
topped up from the same class), the groups are dealt round-robin over len(data) // (P*K) batches, so one
class never appears twice in a batch, and batches still short of P classes get a random group from an
unused class. Classes with a single image are dropped (no positive pair); classes with fewer than K images
are sampled with replacement. The batch list depends only on (seed, epoch); under torch.distributed every
rank builds the same list and takes a disjoint stride of it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


class PKSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler yielding lists of P*K dataset indices; call set_epoch(e) before each epoch."""

    def __init__(self, labels: Sequence[int], p: int, k: int, *, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None):
        if p < 1 or k < 1:
            raise ValueError(f"P and K must be at least 1, got P={p}, K={k}")
        _, inverse, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
        by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1]) if len(labels) else []
        self._classes = [members for members in by_class if len(members) >= 2]
        if len(self._classes) < len(by_class):
            log.info("PKSampler: dropped %d classes with a single image", len(by_class) - len(self._classes))
        if p > len(self._classes):
            raise ValueError(f"P={p} classes per batch, but only {len(self._classes)} classes have at least 2 images")
        self.p, self.k, self.seed, self.epoch = p, k, seed, 0
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        n_images = sum(len(members) for members in self._classes)
        self._n_global = max(n_images // (p * k), self.world_size)  # batches in the list all ranks share
        self._n_local = self._n_global // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches __iter__ yields (same epoch and seed -> same batches)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._n_local

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._global_batches()
        yield from batches[self.rank : self._n_local * self.world_size : self.world_size]

    def _global_batches(self) -> list[list[int]]:
        """All ranks' batches for this epoch, identical on every rank."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n, groups = self._n_global, []
        for c in rng.permutation(len(self._classes)):
            members = rng.permutation(self._classes[c])
            for start in range(0, min(len(members), n * self.k), self.k):  # at most n groups: one per batch
                groups.append((int(c), self._fill(rng, c, members[start : start + self.k])))
        batches: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(n)]
        for j, group in enumerate(groups[: self.p * n]):  # a class's groups are consecutive -> distinct batches
            batches[j % n].append(group)
        for batch in batches:
            used = {c for c, _ in batch}
            while len(batch) < self.p:
                c = int(rng.integers(len(self._classes)))
                if c not in used:
                    used.add(c)
                    batch.append((c, self._fill(rng, c, self._classes[c][:0])))
        return [np.concatenate([idx for _, idx in batches[b]]).tolist() for b in rng.permutation(n)]

    def _fill(self, rng: np.random.Generator, c: int, group: np.ndarray) -> np.ndarray:
        """`group` topped up to K images of class c: unused ones first, then with replacement."""
        need = self.k - len(group)
        if need == 0:
            return group
        unused = np.setdiff1d(self._classes[c], group)
        extra = rng.choice(unused, min(need, len(unused)), replace=False)
        repeats = rng.choice(self._classes[c], need - len(extra), replace=True)
        return np.concatenate([group, extra, repeats])


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed's when initialised, else rank 0 of 1."""
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    world_size = world_size if world_size is not None else dist.get_world_size() if initialised else 1
    rank = rank if rank is not None else dist.get_rank() if initialised else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    return rank, world_size
