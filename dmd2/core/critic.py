"""Two time-scale update rule (TTUR, DMD2 Sec. 4.1): the critic (fake score + GAN head) updates ``ratio`` times per
generator update (paper: 5).

Iteration semantics (the official code's counting, used by ``train.max_steps``): one iteration = one critic update,
plus a generator update on every ``ratio``-th iteration, namely on iterations ``0, ratio, 2*ratio, ...``.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CriticScheduler", "Phase"]


@dataclass(frozen=True)
class Phase:
    """What iteration ``step`` does: always a critic update, plus a generator update when ``generator`` is True."""

    step: int
    generator: bool


class CriticScheduler:
    """Decides which updates each iteration performs.

    >>> sched = CriticScheduler(ratio=5)
    >>> [sched.next().generator for _ in range(6)]
    [True, False, False, False, False, True]

    ``state_dict()`` / ``load_state_dict()`` carry the iteration counter, so a resumed run continues the pattern.
    """

    def __init__(self, ratio: int = 5, step: int = 0):
        if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
            raise ValueError(f"CriticScheduler: ratio must be an int >= 1, got {ratio!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"CriticScheduler: step must be an int >= 0, got {step!r}")
        self.ratio = ratio
        self.step = step

    def generator_update(self, step: int | None = None) -> bool:
        """Whether iteration ``step`` (default: the next one) includes a generator update."""
        s = self.step if step is None else step
        return s % self.ratio == 0

    def next(self) -> Phase:
        """The plan for the next iteration; advances the counter."""
        phase = Phase(step=self.step, generator=self.generator_update())
        self.step += 1
        return phase

    def state_dict(self) -> dict:
        return {"ratio": self.ratio, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        ratio, step = int(state["ratio"]), int(state["step"])
        if ratio != self.ratio:
            raise ValueError(f"CriticScheduler: checkpoint has ratio {ratio} but this scheduler has ratio {self.ratio}")
        if step < 0:
            raise ValueError(f"CriticScheduler: step must be >= 0, got {step}")
        self.step = step

    def __repr__(self) -> str:
        return f"CriticScheduler(ratio={self.ratio}, step={self.step})"
