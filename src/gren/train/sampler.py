"""A batch sampler that mixes annotated (box) and label-only images, deterministic and sharded.

Each batch holds ``n_a = round(annotated_fraction * batch_size)`` annotated images (at least 1
when the fraction is positive and both pools are non-empty, at most ``batch_size - 1`` when the
fraction is below 1) and ``batch_size - n_a`` label-only images. An epoch is one pass over the
label-only pool; the annotated pool (usually far smaller) is cycled through fresh permutations as
often as needed. With ``annotated_fraction=None``, or when one pool is empty, the two pools are
shuffled together (their natural proportions). Incomplete batches are filled by wrapping around
the pools, so every batch has exactly ``batch_size`` images (the inter-image graph and the DDP
all-gather rely on it).

Everything is a function of ``(seed, epoch)``: a run resumed at an epoch boundary draws the same
batches as one that never stopped. Under DDP, all ranks build the same global list of batches and
rank ``r`` takes batches ``r, r + W, r + 2W, ...`` (the list is padded to a multiple of ``W``),
the batch-level equivalent of ``DistributedSampler``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def _stream(pool: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` items from successive random permutations of ``pool``."""
    if count <= 0 or len(pool) == 0:
        return pool[:0]
    rounds = math.ceil(count / len(pool))
    return torch.cat([pool[torch.randperm(len(pool), generator=generator)] for _ in range(rounds)])[:count]


class MixedBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches (lists of dataset indices) for the epoch set by :meth:`set_epoch`.

    Args:
        annotated, unannotated: dataset indices of the two pools.
        batch_size: images per batch (per rank).
        annotated_fraction: share of each batch from the annotated pool, or ``None`` for a plain shuffle.
        seed: with the epoch, fixes the batches.
        rank, world_size: the shard (``0, 1`` without DDP).
        max_batches: cap on this rank's batches per epoch (``None``: no cap).
    """

    def __init__(self, annotated: Sequence[int], unannotated: Sequence[int], batch_size: int,
                 annotated_fraction: float | None = 0.25, seed: int = 0, rank: int = 0, world_size: int = 1,
                 max_batches: int | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if annotated_fraction is not None and not 0.0 <= annotated_fraction <= 1.0:
            raise ValueError(f"annotated_fraction must be in [0, 1] or null, got {annotated_fraction}")
        self.annotated = torch.as_tensor(list(annotated), dtype=torch.int64)
        self.unannotated = torch.as_tensor(list(unannotated), dtype=torch.int64)
        if len(self.annotated) + len(self.unannotated) == 0:
            raise ValueError("no training images: both the annotated and the label-only pools are empty")
        self.batch_size, self.annotated_fraction = int(batch_size), annotated_fraction
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.max_batches = max_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def annotated_per_batch(self) -> int | None:
        """Annotated images per batch, or ``None`` when the pools are shuffled together."""
        f = self.annotated_fraction
        if f is None or len(self.annotated) == 0 or len(self.unannotated) == 0:
            return None
        n = round(f * self.batch_size)
        if f > 0:
            n = max(n, 1)
        if f < 1:
            n = min(n, self.batch_size - 1)
        return n

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches for ``epoch``, in order (length a multiple of ``world_size``)."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        per_batch = self.annotated_per_batch()
        if per_batch is None:
            pool = torch.cat([self.annotated, self.unannotated])
            n_batches = max(1, math.ceil(len(pool) / self.batch_size))
            n_batches = math.ceil(n_batches / self.world_size) * self.world_size
            order = _stream(pool, n_batches * self.batch_size, generator).view(n_batches, self.batch_size)
            return order.tolist()
        n_unannotated = self.batch_size - per_batch
        if n_unannotated == 0:  # annotated_fraction == 1: an epoch is one pass over the annotated pool
            n_batches = max(1, math.ceil(len(self.annotated) / self.batch_size))
        else:
            n_batches = max(1, math.ceil(len(self.unannotated) / n_unannotated))
        n_batches = math.ceil(n_batches / self.world_size) * self.world_size
        annotated = _stream(self.annotated, n_batches * per_batch, generator).view(n_batches, per_batch)
        unannotated = _stream(self.unannotated, n_batches * n_unannotated, generator).view(n_batches, n_unannotated)
        return torch.cat([annotated, unannotated], dim=1).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches(self.epoch)[self.rank::self.world_size]
        yield from batches[: len(self)]

    def __len__(self) -> int:
        per_batch = self.annotated_per_batch()
        if per_batch is None:
            n = max(1, math.ceil((len(self.annotated) + len(self.unannotated)) / self.batch_size))
        elif per_batch == self.batch_size:
            n = max(1, math.ceil(len(self.annotated) / self.batch_size))
        else:
            n = max(1, math.ceil(len(self.unannotated) / (self.batch_size - per_batch)))
        n = math.ceil(n / self.world_size)
        return n if self.max_batches is None else min(n, int(self.max_batches))
