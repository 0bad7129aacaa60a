"""Triton backend of :mod:`dmd2.kernels`: registers ``impl="triton"`` for every fused op.

Runs on CUDA tensors, or on CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1`` was set before this module
was imported (Triton decides at ``@triton.jit`` time). Kernels load every input with ``.to(tl.float32)`` (fp32 math,
bf16 / fp16 inputs upcast on load) and store in the output's dtype, rounded once to nearest even (``_common.store``,
which also does so in the interpreter, whose own bf16 cast truncates). One module per op family: ``noise`` (Philox
noise, fused noising), ``dm`` (distribution matching), ``denoise`` (the critic's loss).
"""
from __future__ import annotations

import torch

from .. import register
from . import denoise, dm, noise
from ._common import INTERPRETED


def availability(*tensors) -> str | None:
    """``None`` if the Triton kernels can run on ``tensors`` (tensors or devices), else the reason they cannot."""
    if INTERPRETED:
        return None
    devices = {t.device.type if isinstance(t, torch.Tensor) else torch.device(t).type for t in tensors if t is not None}
    if not devices:
        return "no tensor or device given to decide on"
    if devices != {"cuda"}:
        return (
            f"Triton kernels need CUDA tensors, got {sorted(devices)} (to run them on CPU, set TRITON_INTERPRET=1 "
            "before dmd2.kernels.triton is imported)"
        )
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


for _op, _fn in (
    ("philox_normal", noise.philox_normal),
    ("noise_add", noise.noise_add),
    ("fused_dm", dm.fused_dm),
    ("dm_grad", dm.dm_grad),
    ("dm_loss", dm.dm_loss),
    ("denoise_loss", denoise.denoise_loss),
):
    register(_op, "triton", _fn, availability)

__all__ = ["availability", "INTERPRETED", "noise", "dm", "denoise"]
