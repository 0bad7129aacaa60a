r"""Adapters that turn networks into the one denoiser contract ``D(x_t, t, cond) -> x0_hat``.

* :class:`EDMPrecond` - EDM preconditioning (Karras et al. 2022, Table 1 / Eq. 7):
  :math:`D(x;\sigma) = c_{skip} x + c_{out} F(c_{in} x; c_{noise})` with
  :math:`c_{skip} = \sigma_d^2/(\sigma^2+\sigma_d^2)`, :math:`c_{out} = \sigma\sigma_d/\sqrt{\sigma^2+\sigma_d^2}`,
  :math:`c_{in} = 1/\sqrt{\sigma^2+\sigma_d^2}`, :math:`c_{noise} = \ln(\sigma)/4`.
* :class:`DiffusersDenoiser` - a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` predicting epsilon, v or x0
  on a :class:`~dmd2.core.schedules.VPSchedule`; SDXL's added conditions travel in ``cond``.
* :class:`CFGDenoiser` - classifier-free guidance in the standard form ``uncond + s (cond - uncond)``, with
  cond and uncond in ONE batched forward of ``2B``.

``cond`` is whatever the wrapped network needs: ``None``, a tensor with a leading batch dim, or a dict of such
tensors (``None`` values allowed). :func:`cat_cond` concatenates two conds along the batch.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import cfg as _cfg
from .schedules import NoiseSchedule, VPSchedule, expand_like

__all__ = ["EDMPrecond", "DiffusersDenoiser", "CFGDenoiser", "cat_cond", "cond_batch_size"]


def cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conds (None / tensor / dict of tensors / list of tensors) along the batch dimension."""
    if a is None and b is None:
        return None
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.cat([a, b], dim=0)
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            raise ValueError(f"cond dicts must have the same keys, got {sorted(a)} and {sorted(b)}")
        return {k: cat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return type(a)(cat_cond(x, y) for x, y in zip(a, b))
    raise ValueError(f"cannot batch conds of types {type(a).__name__} and {type(b).__name__}")


def cond_batch_size(c: Any) -> int | None:
    """Leading batch size of a cond, or None when it carries no tensor."""
    if isinstance(c, torch.Tensor):
        return c.shape[0]
    if isinstance(c, dict):
        c = list(c.values())
    if isinstance(c, (list, tuple)):
        for v in c:
            n = cond_batch_size(v)
            if n is not None:
                return n
    return None


def _expand_cond(c: Any, batch: int) -> Any:
    """Broadcast a cond with batch 1 to ``batch`` (other sizes must already match)."""
    if c is None:
        return None
    if isinstance(c, torch.Tensor):
        if c.shape[0] == batch:
            return c
        if c.shape[0] == 1:
            return c.expand(batch, *c.shape[1:])
        raise ValueError(f"cond has batch {c.shape[0]}; expected 1 or {batch}")
    if isinstance(c, dict):
        return {k: _expand_cond(v, batch) for k, v in c.items()}
    if isinstance(c, (list, tuple)):
        return type(c)(_expand_cond(v, batch) for v in c)
    raise ValueError(f"unsupported cond type {type(c).__name__}")


class EDMPrecond(nn.Module):
    r"""EDM preconditioning around a raw network ``model(x_in, c_noise, class_labels) -> F``.

    Args:
        model: the raw network; it is stored as attribute ``model`` so parameter names carry EDM's ``model.`` prefix.
        sigma_data: data standard deviation (EDM: 0.5).
        label_dim: number of classes; when > 0, an integer ``cond`` of shape ``(B,)`` is one-hot encoded and a
            float ``(B, label_dim)`` cond is passed as is; 0 means unconditional (``cond`` must be None).

    ``forward(x_t (B, C, H, W), sigma (B,), cond, **model_kwargs) -> x0_hat`` (extra keywords, e.g. a step index,
    go to ``model``) in the dtype of ``x_t``; the skip connection is fp32.
    """

    def __init__(self, model: nn.Module, sigma_data: float = 0.5, label_dim: int = 0):
        super().__init__()
        self.model = model
        self.sigma_data = float(sigma_data)
        self.label_dim = int(label_dim)

    def class_labels(self, cond: Any, batch: int, device) -> torch.Tensor | None:
        if self.label_dim == 0:
            if cond is not None:
                raise ValueError("EDMPrecond: label_dim=0 (unconditional) but a cond was given")
            return None
        if cond is None:
            raise ValueError(f"EDMPrecond: class-conditional (label_dim={self.label_dim}); expected class labels (B,) or one-hot (B, {self.label_dim})")
        if not cond.dtype.is_floating_point:
            if cond.shape != (batch,):
                raise ValueError(f"EDMPrecond: integer class labels must have shape ({batch},), got {tuple(cond.shape)}")
            return nn.functional.one_hot(cond.long(), self.label_dim).float()
        if cond.shape != (batch, self.label_dim):
            raise ValueError(f"EDMPrecond: one-hot labels must have shape ({batch}, {self.label_dim}), got {tuple(cond.shape)}")
        return cond.float()

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Any = None, **model_kwargs) -> torch.Tensor:
        if sigma.dim() != 1 or sigma.shape[0] != x_t.shape[0]:
            raise ValueError(f"EDMPrecond: sigma must have shape ({x_t.shape[0]},), got {tuple(sigma.shape)}")
        s = sigma.float()
        sd = self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1.0 / (s**2 + sd**2).sqrt()
        c_noise = s.log() / 4
        labels = self.class_labels(cond, x_t.shape[0], x_t.device)
        xf = x_t.float()
        param = next(self.model.parameters(), None)
        dtype = xf.dtype if param is None else param.dtype  # under autocast the op casts further
        f = self.model((expand_like(c_in, xf) * xf).to(dtype), c_noise, labels if labels is None else labels.to(dtype),
                       **model_kwargs)
        return (expand_like(c_skip, xf) * xf + expand_like(c_out, xf) * f.float()).to(x_t.dtype)


class DiffusersDenoiser(nn.Module):
    r"""A diffusers UNet on a VP schedule as ``D(x_t, t, cond) -> x0_hat``.

    Args:
        unet: ``UNet2DModel`` or ``UNet2DConditionModel`` (stored as ``unet``).
        schedule: the :class:`VPSchedule` the UNet was trained with.
        prediction_type: ``"epsilon"`` (x0 = (x_t - sigma eps)/alpha), ``"v_prediction"``
            (x0 = alpha x_t - sigma v) or ``"sample"``.

    ``cond``: ``None``; a tensor of ``encoder_hidden_states`` ``(B, L, D)``; or a dict with keys among
    ``encoder_hidden_states``, ``class_labels``, and SDXL's added conditions ``text_embeds`` ``(B, 1280)`` and
    ``time_ids`` ``(B, 6)`` (passed as ``added_cond_kwargs``). ``t``: integer timesteps ``(B,)``.
    """

    PREDICTIONS = ("epsilon", "v_prediction", "sample")

    def __init__(self, unet: nn.Module, schedule: VPSchedule, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in self.PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {self.PREDICTIONS}, got {prediction_type!r}")
        if not isinstance(schedule, VPSchedule):
            raise ValueError(f"DiffusersDenoiser expects a VPSchedule, got {type(schedule).__name__}")
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type

    def unet_kwargs(self, cond: Any) -> dict:
        if cond is None:
            return {}
        if isinstance(cond, torch.Tensor):
            return {"encoder_hidden_states": cond}
        if not isinstance(cond, dict):
            raise ValueError(f"cond must be None, a tensor or a dict, got {type(cond).__name__}")
        allowed = {"encoder_hidden_states", "class_labels", "text_embeds", "time_ids"}
        unknown = set(cond) - allowed
        if unknown:
            raise ValueError(f"unknown cond keys {sorted(unknown)}; expected keys among {sorted(allowed)}")
        kw = {k: cond[k] for k in ("encoder_hidden_states", "class_labels") if cond.get(k) is not None}
        added = {k: cond[k] for k in ("text_embeds", "time_ids") if cond.get(k) is not None}
        if added:
            if len(added) != 2:
                raise ValueError("SDXL added conditions need both 'text_embeds' and 'time_ids'")
            kw["added_cond_kwargs"] = added
        return kw

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The UNet's own output (epsilon, v or x0, per ``prediction_type``)."""
        self.schedule.check_t(t)
        kw = self.unet_kwargs(cond)
        return self.unet(x_t, t, return_dict=False, **kw)[0]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        out = self.raw(x_t, t, cond)
        if self.prediction_type == "epsilon":
            return self.schedule.x0_from_eps(x_t, out, t)
        if self.prediction_type == "v_prediction":
            return self.schedule.x0_from_v(x_t, out, t)
        return out.to(x_t.dtype)


class CFGDenoiser(nn.Module):
    r"""Classifier-free guidance: :math:`D_s = D(\cdot, u) + s\,(D(\cdot, c) - D(\cdot, u))` (Ho & Salimans 2022).

    Applied to x0 predictions; for an epsilon/v network this equals guiding the raw outputs (the conversion to x0 is
    affine with the same coefficients for both branches). The wrapped denoiser is called ONCE on a batch of ``2B``:
    ``[cond; uncond]``.

    Args:
        denoiser: any ``D(x_t, t, cond)``.
        scale: guidance scale ``s`` (1 = no guidance; SDXL DMD2: 8).
        uncond: the unconditional cond with batch 1 (broadcast) or B, e.g. zero text embeddings or a null label;
            may also be given per call (``uncond=`` keyword).
    """

    def __init__(self, denoiser: nn.Module, scale: float, uncond: Any = None):
        super().__init__()
        self.denoiser = denoiser
        self.scale = float(scale)
        self.uncond = uncond

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None, uncond: Any = None) -> torch.Tensor:
        uncond = self.uncond if uncond is None else uncond
        if uncond is None:
            raise ValueError("CFGDenoiser: no unconditional cond given (constructor or uncond= keyword)")
        b = x_t.shape[0]
        both = cat_cond(_expand_cond(cond, b), _expand_cond(uncond, b))
        x0 = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        c, u = x0[:b], x0[b:]
        return _cfg(u, c, self.scale)
