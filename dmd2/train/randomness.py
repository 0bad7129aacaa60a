r"""Keyed randomness of the training loop (docs/design.md "Keyed randomness"): no random state is carried from one
iteration to the next; every draw comes from a stream keyed by integers.

* :func:`derive_seed` - a 63-bit seed from a tuple of ints (SplitMix64 chained): distinct tuples give unrelated
  streams. Recipes key their own streams with it (real-data shards, noise of ODE pairs).
* :class:`KeyedStreams` - the trainer's streams: micro-batch ``m`` of rank ``r`` at iteration ``s`` draws its noise,
  times and re-noises from a ``torch.Generator`` seeded by ``(seed, s, phase, shard)`` with the global shard index
  ``shard = r * grad_accum + m``; the backward-simulation step ``k`` from ``(seed, s, phase)`` alone, so every rank
  agrees on it without communicating; with ``objective.fused_ops``, the Philox noise offset of the micro-batch is
  keyed like its generator.

So a run is a function of (config, step): it resumes bit-exactly, and ``W`` ranks with ``grad_accum = A`` draw what
one process with ``grad_accum = W * A`` draws.
"""
from __future__ import annotations

import torch

from ..core import BackwardSimulationSampler

__all__ = ["derive_seed", "KeyedStreams", "GENERATOR", "CRITIC"]

#: the ``phase`` keys of the two updates (and the tags that set the ``k`` and noise-offset streams apart)
GENERATOR, CRITIC, _K = 1, 2, 3
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*values: int) -> int:
    """A 63-bit seed from a tuple of ints (SplitMix64 chained): distinct tuples give unrelated streams."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h & ((1 << 63) - 1)


class KeyedStreams:
    """The streams of one run (``seed`` = ``train.seed``) on ``device`` (see the module docstring)."""

    def __init__(self, seed: int, device: torch.device):
        self.seed, self.device = seed, device

    def generator(self, step: int, phase: int, shard: int) -> torch.Generator:
        """The generator of micro-batch ``shard`` (global index) of ``(step, phase)``, on ``device``."""
        g = torch.Generator(device=self.device)
        g.manual_seed(derive_seed(self.seed, step, phase, shard))
        return g

    def draw_k(self, sampler: BackwardSimulationSampler, step: int, phase: int) -> int:
        """The backward-simulation step of ``(step, phase)``: identical on every rank by construction."""
        return sampler.draw_k(torch.Generator().manual_seed(derive_seed(self.seed, step, phase, _K)))

    def noise_offset(self, step: int, phase: int, shard: int) -> int:
        """The Philox counter at which the ``fused_ops`` noise of micro-batch ``shard`` starts: a random block start
        in ``[0, 2**61)``, far from every other block with overwhelming probability."""
        return derive_seed(self.seed, step, phase, shard, _K + 1) >> 2
