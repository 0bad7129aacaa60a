r"""Exponential moving average of a module's weights: :math:`\bar\theta \leftarrow \beta\bar\theta + (1-\beta)\theta`.

The shadow copy is fp32 (whatever the model's dtype) and keyed by parameter name, so it saves to safetensors
and survives a change of wrapper. Buffers are copied, not averaged.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """EMA of ``model``'s floating-point parameters with decay ``decay`` in [0, 1)."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not (0.0 <= decay < 1.0):
            raise ValueError(f"EMA: decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] = {
            n: p.detach().float().clone() for n, p in model.named_parameters() if p.is_floating_point()
        }
        self.buffers: dict[str, torch.Tensor] = {n: b.detach().clone() for n, b in model.named_buffers()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        missing = set(self.shadow) - set(params)
        if missing:
            raise ValueError(f"EMA.update: model lacks parameters {sorted(missing)[:5]}")
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names], 1.0 - self.decay)
        for n, b in model.named_buffers():
            if n in self.buffers:
                self.buffers[n].copy_(b)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (cast to its dtypes)."""
        params = dict(model.named_parameters())
        for n, s in self.shadow.items():
            params[n].copy_(s)
        bufs = dict(model.named_buffers())
        for n, b in self.buffers.items():
            bufs[n].copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, **{f"buffer::{n}": b for n, b in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        shadow = {k: v for k, v in state.items() if not k.startswith("buffer::")}
        if set(shadow) != set(self.shadow):
            raise ValueError(f"EMA.load_state_dict: parameter names differ: {sorted(set(shadow) ^ set(self.shadow))[:5]}")
        for n, v in shadow.items():
            self.shadow[n].copy_(v)
        for k, v in state.items():
            if k.startswith("buffer::"):
                self.buffers[k[len("buffer::"):]].copy_(v)
