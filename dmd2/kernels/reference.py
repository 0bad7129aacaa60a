"""Pure-PyTorch reference implementations: the specification of every fused op.

Every other implementation (Triton in ``dmd2/kernels/triton``, the C++/CUDA extension in ``csrc``) must
agree with the functions here; tests and benchmarks import them from this module.

All math runs in float32 whatever the input dtype (bf16 / fp16 inputs are upcast on entry) and results are
returned in the dtype of ``x``.
"""
from __future__ import annotations

import torch

__all__ = ["dm_grad", "dm_loss", "cfg", "check_dm_inputs"]


def check_dm_inputs(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``x``, ``real_x0`` and ``fake_x0`` agree in shape, dtype and device.

    Only metadata is read: no host synchronisation.
    """
    for name, t in (("x", x), ("real_x0", real_x0), ("fake_x0", fake_x0)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have a leading batch dimension (B, ...), got a 0-d tensor")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor (fp32, bf16 or fp16), got {t.dtype}")
    for name, t in (("real_x0", real_x0), ("fake_x0", fake_x0)):
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"batch size mismatch: x has B={x.shape[0]} but {name} has B={t.shape[0]}")
        if t.shape != x.shape:
            raise ValueError(f"shape mismatch: expected {name} of shape {tuple(x.shape)} (like x), got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"dtype mismatch: expected {name} of dtype {x.dtype} (like x), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"device mismatch: expected {name} on {x.device} (like x), got {t.device}")


def dm_grad(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    r"""Distribution-matching gradient of DMD / DMD2 (Yin et al. 2024, Eq. 2 and Sec. 4 of DMD, arXiv 2311.18828).

    .. math::
        g_i = \frac{\hat x_{0,\mathrm{fake}}^{(i)} - \hat x_{0,\mathrm{real}}^{(i)}}
                   {\operatorname{mean}_j |x^{(i)}_j - \hat x_{0,\mathrm{real}}^{(i)}{}_j| + \epsilon}

    The denominator is the per-sample mean absolute distance between the generator sample and the teacher's
    denoised estimate (DMD's "normaliser" that makes the gradient scale-free across noise levels).

    Args:
        x: generator output ``(B, ...)``.
        real_x0: teacher (real score) x0 prediction at ``x_t``, same shape / dtype / device as ``x``.
        fake_x0: fake-score x0 prediction at ``x_t``, same shape / dtype / device as ``x``.
        eps: added to the normaliser; no other guard (a NaN input gives a NaN output).

    Returns:
        ``g`` with the shape and dtype of ``x``; computed in float32.
    """
    check_dm_inputs(x, real_x0, fake_x0)
    xf, rf, ff = x.float(), real_x0.float(), fake_x0.float()
    dims = tuple(range(1, x.dim()))
    if dims:
        norm = (xf - rf).abs().mean(dim=dims, keepdim=True)
    else:  # (B,) inputs: one element per sample
        norm = (xf - rf).abs()
    return ((ff - rf) / (norm + eps)).to(x.dtype)


def dm_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    r"""Scalar surrogate whose gradient with respect to ``x`` is ``dm_grad(x, real_x0, fake_x0) / x.numel()``.

    DMD2's form: ``0.5 * mse(x, (x - g).detach())`` with mean reduction, so
    :math:`\partial L / \partial x = (x - (x - g)) / N = g / N` with ``N = x.numel()``.
    ``real_x0`` and ``fake_x0`` carry no gradient (they are detached here). Returns a float32 scalar.
    """
    g = dm_grad(x.detach(), real_x0.detach(), fake_x0.detach(), eps).float()
    xf = x.float()
    target = (xf - g).detach()
    return 0.5 * torch.nn.functional.mse_loss(xf, target, reduction="mean")


def cfg(uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    r"""Classifier-free guidance in the standard form :math:`u + s\,(c - u)` (Ho & Salimans 2022).

    ``scale=1`` returns ``cond``; ``scale=0`` returns ``uncond``. Math in float32, result in ``cond``'s dtype.
    ``scale`` may be a float or a tensor broadcastable against ``(B, ...)`` (e.g. per-sample ``(B, 1, 1, 1)``).
    """
    if uncond.shape != cond.shape:
        raise ValueError(f"cfg: uncond and cond must have the same shape, got {tuple(uncond.shape)} and {tuple(cond.shape)}")
    if uncond.dtype != cond.dtype or uncond.device != cond.device:
        raise ValueError(
            f"cfg: uncond and cond must share dtype and device, got {uncond.dtype}/{uncond.device} and {cond.dtype}/{cond.device}"
        )
    u, c = uncond.float(), cond.float()
    return (u + scale * (c - u)).to(cond.dtype)
