"""Stateless, per-shard real-data access for :attr:`Components.real_data <dmd2.train.trainer.Components>`.

The trainer asks for the real images of ``(step, shard)``, with ``shard`` the global micro-batch index in
``[0, world * grad_accum)``. :class:`IndexedBatches` answers from any indexable dataset by a seeded permutation per
epoch, so the answer depends only on ``(step, shard)``: shards of a step are disjoint, every sample is seen once
per epoch (up to the last partial global batch, which is dropped), and resuming needs no data-loader state.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

__all__ = ["IndexedBatches"]


class IndexedBatches:
    """Batches of an indexable dataset by ``(step, shard)``.

    Args:
        dataset: ``len(dataset)`` and ``dataset[i] -> (image tensor, cond)`` (cond: tensor, number or None).
        shards: shards per step (``world * grad_accum``); batch: samples per shard (``train.batch_size``).
        seed: permutation seed (epoch ``e`` uses ``seed + e``).
        collate: ``list of items -> (images (B, ...), cond)``; the default stacks images and conds.
    """

    def __init__(self, dataset: Sequence, shards: int, batch: int, seed: int = 0, collate: Callable | None = None):
        if shards < 1 or batch < 1:
            raise ValueError(f"IndexedBatches: shards and batch must be >= 1, got {shards}, {batch}")
        self.dataset, self.shards, self.batch, self.seed = dataset, shards, batch, seed
        self.per_step = shards * batch
        self.steps_per_epoch = len(dataset) // self.per_step
        if self.steps_per_epoch < 1:
            raise ValueError(f"IndexedBatches: dataset of {len(dataset)} samples is smaller than one global batch ({self.per_step})")
        self.collate = collate or self._stack
        self._perm: tuple[int, torch.Tensor] | None = None

    @staticmethod
    def _stack(items):
        imgs = torch.stack([torch.as_tensor(x) for x, _ in items])
        conds = [c for _, c in items]
        cond = None if all(c is None for c in conds) else torch.stack([torch.as_tensor(c) for c in conds])
        return imgs, cond

    def indices(self, step: int, shard: int) -> torch.Tensor:
        """Dataset indices of ``(step, shard)``: ``batch`` entries of the epoch's permutation."""
        if not (0 <= shard < self.shards):
            raise ValueError(f"IndexedBatches: shard must lie in [0, {self.shards}), got {shard}")
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(len(self.dataset), generator=g))
        start = within * self.per_step + shard * self.batch
        return self._perm[1][start: start + self.batch]

    def __call__(self, step: int, shard: int, batch: int, device) -> tuple[torch.Tensor, Any]:
        if batch != self.batch:
            raise ValueError(f"IndexedBatches was built for batch {self.batch}, asked for {batch}")
        imgs, cond = self.collate([self.dataset[int(i)] for i in self.indices(step, shard)])
        imgs = imgs.to(device, non_blocking=True)
        if isinstance(cond, torch.Tensor):
            cond = cond.to(device, non_blocking=True)
        return imgs, cond
