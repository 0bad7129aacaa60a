"""The values a run logs, kept on every rank: each loss term and gradient norm is accumulated on device (no host
sync per update) with the first update at which it went NaN/inf; at a log interval the window's means are reduced
over the ranks into one record, which :class:`~dmd2.train.monitor.RunMonitor` (rank 0) writes.

Non-finite values are read at each log interval and before every checkpoint (one host sync); the run then stops with
:class:`NonFiniteError` naming the first iteration and term, leaving the last good checkpoint untouched. The sums
travel in ``state.pt`` (:meth:`Metrics.state_dict`), so a resumed run logs the window it was in the middle of.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .distributed import DistInfo, all_reduce_mean

__all__ = ["Metrics", "NonFiniteError"]


class NonFiniteError(RuntimeError):
    """A loss term or gradient norm became NaN or inf; the message names the iteration and the term."""


def _order(name: str) -> int:
    """Within one update, the loss terms before their sums, logits and gradient norms (which a NaN term makes NaN in
    the same update)."""
    if name.startswith("grad_norm"):
        return 3
    if name in ("loss_g", "loss_critic"):
        return 1
    return 0 if name.startswith("loss") else 2


class Metrics:
    """Tracked values of one rank: sums and counts over the current log window, and per name the first ``tick``
    (``2 * step + 0`` for the generator update, ``+ 1`` for the critic update) at which the value was non-finite.

    Args:
        info: this process's place in the job (the reductions run over its ranks).
        out: the run folder (named in :class:`NonFiniteError`).
    """

    def __init__(self, info: DistInfo, out: Path):
        self.info, self.device, self.out = info, info.device, out
        self.acc: dict[str, torch.Tensor] = {}
        self.cnt: dict[str, int] = {}
        self.bad: dict[str, torch.Tensor] = {}
        self.window_steps = 0
        self.window_start = time.perf_counter()

    def track(self, name: str, value: torch.Tensor, tick: int) -> None:
        """Accumulate a logged value and remember the first ``tick`` it was non-finite."""
        v = value.detach().float().reshape(())
        if v.device != self.device:
            v = v.to(self.device)
        bad = self.bad.get(name)
        if bad is None:
            bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self.bad[name] = torch.where((bad < 0) & ~torch.isfinite(v), torch.full_like(bad, tick), bad)
        self.acc[name] = self.acc.get(name, torch.zeros((), device=self.device)) + v
        self.cnt[name] = self.cnt.get(name, 0) + 1

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteError` if any tracked value went non-finite on any rank (one host sync)."""
        if not self.bad:
            return
        names = sorted(self.bad)
        bad = torch.stack([self.bad[n] for n in names])
        if self.info.distributed:
            bad = bad.clone()
            big = torch.iinfo(torch.long).max
            bad = torch.where(bad < 0, torch.full_like(bad, big), bad)  # earliest tick over ranks
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            bad = torch.where(bad == big, torch.full_like(bad, -1), bad)
        hits = sorted((tick, _order(n), n) for tick, n in zip(bad.tolist(), names) if tick >= 0)  # first in time
        if hits:
            tick, _, n = hits[0]
            phase = "generator" if tick % 2 == 0 else "critic"
            raise NonFiniteError(f"non-finite {n} at iteration {tick // 2} ({phase} update; 0-based; all: "
                                 f"{', '.join(f'{m}@{t // 2}' for t, _, m in hits)}); "
                                 f"the last good checkpoint in {self.out / 'checkpoints'} is untouched")

    def record(self, extra: dict[str, float], samples_per_step: int) -> dict[str, float]:
        """The window's record, after a finiteness check (collective): each value's mean over its updates and the
        ranks, then ``extra`` (e.g. learning rates), ``samples_per_s`` (``samples_per_step`` samples per
        iteration, all ranks), ``it_per_s``, ``peak_memory_mb``; then a new window starts."""
        names = sorted(n for n in self.acc if self.cnt.get(n, 0) > 0)
        if names:
            means = torch.stack([self.acc[n] / self.cnt[n] for n in names])
            means = all_reduce_mean(means, self.info).tolist()
        else:
            means = []
        self.check_finite()
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        rec = {**dict(zip(names, means)), **extra}
        rec["samples_per_s"] = self.window_steps * samples_per_step / elapsed
        rec["it_per_s"] = self.window_steps / elapsed
        if self.device.type == "cuda":
            rec["peak_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            rec["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for n in self.acc:
            self.acc[n] = torch.zeros((), device=self.device)
            self.cnt[n] = 0
        self.window_start, self.window_steps = time.perf_counter(), 0
        return rec

    def state_dict(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """The window's sums for ``state.pt``: ``gather`` turns this rank's ``(n,)`` sums into every rank's
        ``(world, n)`` (a collective)."""
        names = sorted(self.acc)
        acc = torch.stack([self.acc[n] for n in names]) if names else torch.zeros(0, device=self.device)
        return {"names": names, "acc": gather(acc), "cnt": [self.cnt[n] for n in names],
                "window_steps": self.window_steps}

    def load_state_dict(self, log: dict, same_world: bool) -> None:
        """Restore :meth:`state_dict`'s sums: this rank's row when the world size is unchanged, else the ranks' mean."""
        acc = log["acc"][self.info.rank] if same_world else log["acc"].mean(0)
        self.acc = {n: acc[i].to(self.device) for i, n in enumerate(log["names"])}
        self.cnt = dict(zip(log["names"], log["cnt"]))
        self.window_steps = int(log["window_steps"])
