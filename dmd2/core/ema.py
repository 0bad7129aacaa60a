r"""Exponential moving average of a module's weights: :math:`\bar\theta \leftarrow \beta\bar\theta + (1-\beta)\theta`.

The shadow copy is fp32 (whatever the model's dtype) and keyed by parameter name, so it saves to safetensors
and survives a change of wrapper. Buffers (the persistent ones, those in ``model.state_dict()``) are copied, not
averaged. :meth:`EMA.state_dict` is a plain state dict of the module - parameter and buffer names as
``model.state_dict()`` has them - so ``model.load_state_dict(ema.state_dict(), strict=True)`` loads the averaged
weights (for a module whose parameters are all floating point). Files written before this layout carry the
buffers under a ``buffer::`` prefix; :meth:`EMA.module_state_dict` (and :meth:`EMA.load_state_dict`) read both.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["EMA"]

_OLD_BUFFER_PREFIX = "buffer::"  # the buffers' key prefix of EMA files written before the plain layout


class EMA:
    """EMA of ``model``'s floating-point parameters with decay ``decay`` in [0, 1)."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not (0.0 <= decay < 1.0):
            raise ValueError(f"EMA: decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] = {
            n: p.detach().float().clone() for n, p in model.named_parameters() if p.is_floating_point()
        }
        persistent = set(model.state_dict())
        self.buffers: dict[str, torch.Tensor] = {n: b.detach().clone() for n, b in model.named_buffers()
                                                 if n in persistent}

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
        """``{name: tensor}`` in the module's own layout: fp32 averaged parameters and the copied buffers."""
        return {**self.shadow, **self.buffers}

    @staticmethod
    def module_state_dict(saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A saved EMA state dict as the module's state dict: the plain layout as is, an old file's ``buffer::``
        prefix removed."""
        return {k.removeprefix(_OLD_BUFFER_PREFIX): v for k, v in saved.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict` output (or an old ``buffer::`` file): the names must be this EMA's (an
        old file may also hold non-persistent buffers, which are ignored)."""
        if any(k.startswith(_OLD_BUFFER_PREFIX) for k in state):
            params = {k: v for k, v in state.items() if not k.startswith(_OLD_BUFFER_PREFIX)}
            buffers = {k[len(_OLD_BUFFER_PREFIX):]: v for k, v in state.items() if k.startswith(_OLD_BUFFER_PREFIX)}
            buffers = {k: v for k, v in buffers.items() if k in self.buffers}
        else:
            params = {k: v for k, v in state.items() if k not in self.buffers}
            buffers = {k: v for k, v in state.items() if k in self.buffers}
        if set(params) != set(self.shadow) or set(buffers) != set(self.buffers):
            differ = sorted((set(params) | set(buffers)) ^ (set(self.shadow) | set(self.buffers)))
            raise ValueError(f"EMA.load_state_dict: names differ from the model's: {differ[:5]}")
        for n, v in params.items():
            self.shadow[n].copy_(v)
        for n, v in buffers.items():
            self.buffers[n].copy_(v)
