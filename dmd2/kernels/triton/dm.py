"""Fused distribution matching (math: ``reference.fused_dm``, ``reference.dm_grad``, ``reference.dm_loss``).

Two passes over memory, grid ``(blocks per sample, B)``:

1. ``_dm_norm_kernel`` reads ``x``, the teacher predictions (and ``x_t``) and writes one partial sum of
   ``|x - real_x0|`` per program;
2. ``_dm_grad_kernel`` sums its sample's partials (a few dozen floats) into the normaliser, re-reads the inputs plus
   ``fake``, writes ``g`` (optionally both x0 estimates) and one partial sum of ``g^2`` per program for the loss value.

Autograd: the surrogate loss's backward is ``grad_out * g / x.numel()`` (``0.5 * mse(x, (x - g).detach())``), scaled
in float32 from the float32 ``g`` and rounded once to ``x``'s dtype, as the reference's autograd does (for bf16 / fp16
``x`` that needs grad, the second pass also writes ``g`` in float32 for the backward); ``dm_grad`` is differentiable in
all three inputs through :func:`dmd2.kernels.reference.dm_grad_vjp` (as the extension's).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._common import alloc, block_size, per_sample, rows, store


@triton.jit
def _block(pid, b, n, alpha_ptr, sigma_ptr, PRED_EPS: tl.constexpr, BLOCK: tl.constexpr):
    """Flat indices and mask of block ``pid`` of sample ``b``, and the sample's (alpha, sigma) (1, 0 for x0 inputs)."""
    cols = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    idx = b.to(tl.int64) * n + cols
    a = 1.0
    s = 0.0
    if PRED_EPS:
        a = tl.load(alpha_ptr + b)
        s = tl.load(sigma_ptr + b)
    return idx, mask, a, s


@triton.jit
def _real_x0(cond_ptr, uncond_ptr, xt_ptr, idx, mask, a, s, scale, HAS_UNCOND: tl.constexpr, PRED_EPS: tl.constexpr):
    real = tl.load(cond_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(uncond_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        real = u + scale * (real - u)
    if PRED_EPS:
        xt = tl.load(xt_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        real = (xt - s * real) / a
    return real


@triton.jit
def _dm_norm_kernel(
    x_ptr, xt_ptr, cond_ptr, uncond_ptr, alpha_ptr, sigma_ptr, part_ptr, n, n_blocks, scale,
    HAS_UNCOND: tl.constexpr, PRED_EPS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    idx, mask, a, s = _block(pid, b, n, alpha_ptr, sigma_ptr, PRED_EPS, BLOCK)
    real = _real_x0(cond_ptr, uncond_ptr, xt_ptr, idx, mask, a, s, scale, HAS_UNCOND, PRED_EPS)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(part_ptr + b * n_blocks + pid, tl.sum(tl.where(mask, tl.abs(x - real), 0.0), axis=0))


@triton.jit
def _dm_grad_kernel(
    xt_ptr, cond_ptr, uncond_ptr, fake_ptr, alpha_ptr, sigma_ptr, part_ptr, grad_ptr, norm_ptr, sq_ptr,
    real_out_ptr, fake_out_ptr, g32_ptr, n, n_blocks, scale, eps,
    HAS_UNCOND: tl.constexpr, PRED_EPS: tl.constexpr, RETURN_X0: tl.constexpr, STORE_G32: tl.constexpr,
    BLOCK: tl.constexpr, BLOCKS_POW2: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    j = tl.arange(0, BLOCKS_POW2)
    total = tl.sum(tl.load(part_ptr + b * n_blocks + j, mask=j < n_blocks, other=0.0), axis=0)
    norm = total / n + eps
    idx, mask, a, s = _block(pid, b, n, alpha_ptr, sigma_ptr, PRED_EPS, BLOCK)
    real = _real_x0(cond_ptr, uncond_ptr, xt_ptr, idx, mask, a, s, scale, HAS_UNCOND, PRED_EPS)
    fake = tl.load(fake_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if PRED_EPS:
        xt = tl.load(xt_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        fake = (xt - s * fake) / a
    g = (fake - real) / norm
    store(grad_ptr + idx, g, mask)
    if STORE_G32:
        tl.store(g32_ptr + idx, g, mask=mask)
    if RETURN_X0:
        store(real_out_ptr + idx, real, mask)
        store(fake_out_ptr + idx, fake, mask)
    tl.store(sq_ptr + b * n_blocks + pid, tl.sum(tl.where(mask, g * g, 0.0), axis=0))
    tl.store(norm_ptr + b, norm, mask=pid == 0)


def _launch(x, x_t, real_cond, real_uncond, fake, alpha, sigma, guidance_scale, prediction, eps, return_x0):
    """Run both passes; returns ``(g, norm, sum of g^2 as a 0-d float32 tensor, real_x0, fake_x0, g32)`` with ``g32``
    the float32 ``g`` that the surrogate's backward scales (``g`` itself for float32 ``x`` or when no gradient of ``x``
    is wanted)."""
    batch, dev = x.shape[0], x.device
    pred_eps = prediction == "eps"
    xr, cr, fr = rows(x, batch), rows(real_cond, batch), rows(fake, batch)
    ur = rows(real_uncond, batch) if real_uncond is not None else None
    xtr = rows(x_t, batch) if pred_eps else None
    a = per_sample(alpha) if pred_eps else None
    s = per_sample(sigma) if pred_eps else None
    n = xr.shape[1]
    block = block_size(n)
    n_blocks = triton.cdiv(n, block)
    part = alloc((batch, n_blocks), torch.float32, dev)
    sq = alloc((batch, n_blocks), torch.float32, dev)
    grad = alloc(x.shape, x.dtype, dev)
    norm = alloc((batch,), torch.float32, dev)
    real_out = alloc(x.shape, x.dtype, dev) if return_x0 else None
    fake_out = alloc(x.shape, x.dtype, dev) if return_x0 else None
    store_g32 = x.dtype != torch.float32 and x.requires_grad and torch.is_grad_enabled()
    g32 = alloc(x.shape, torch.float32, dev) if store_g32 else grad
    scale = float(guidance_scale)
    flags = dict(HAS_UNCOND=ur is not None, PRED_EPS=pred_eps)
    _dm_norm_kernel[(n_blocks, batch)](xr, xtr, cr, ur, a, s, part, n, n_blocks, scale, BLOCK=block, **flags)
    _dm_grad_kernel[(n_blocks, batch)](
        xtr, cr, ur, fr, a, s, part, grad, norm, sq, real_out, fake_out, g32 if store_g32 else None, n, n_blocks,
        scale, float(eps), RETURN_X0=return_x0, STORE_G32=store_g32, BLOCK=block,
        BLOCKS_POW2=triton.next_power_of_2(n_blocks), **flags,
    )
    return grad, norm, sq.sum(), real_out, fake_out, g32


class _DMSurrogate(torch.autograd.Function):
    """``loss = 0.5 * sum(g^2) / N`` (the value of ``0.5 * mse(x, x - g)``); ``d loss / d x = grad_out * g / N``,
    computed in float32 from the saved ``g`` and rounded once to ``x``'s dtype."""

    @staticmethod
    def forward(ctx, x, g, sq_sum):
        ctx.save_for_backward(g)
        ctx.numel, ctx.dtype = x.numel(), x.dtype
        return 0.5 * sq_sum / x.numel()

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return (g.float() * (grad_out.float() / ctx.numel)).to(ctx.dtype), None, None


def fused_dm(
    x, x_t, real_cond, real_uncond, fake, alpha=None, sigma=None, guidance_scale=1.0, prediction="x0", eps=1e-6,
    return_x0=False,
) -> reference.FusedDMOutput:
    """Triton version of :func:`dmd2.kernels.reference.fused_dm` (two passes over memory)."""
    reference.check_fused_dm_inputs(x, x_t, real_cond, real_uncond, fake, alpha, sigma, guidance_scale, prediction)
    g, norm, sq_sum, real_x0, fake_x0, g32 = _launch(
        x, x_t, real_cond, real_uncond, fake, alpha, sigma, guidance_scale, prediction, eps, return_x0
    )
    loss = _DMSurrogate.apply(x, g32, sq_sum)
    return reference.FusedDMOutput(loss, g, norm, real_x0, fake_x0)


def _dm(x, real_x0, fake_x0, eps):
    """``(g shaped like x, sum of g^2)``: ``fused_dm`` without guidance or conversion; ``(B,)`` inputs as ``(B, 1)``."""
    xx, rr, ff = (t[:, None] if x.dim() == 1 else t for t in (x, real_x0, fake_x0))
    g, _, sq_sum, _, _, _ = _launch(xx.detach(), None, rr, None, ff, None, None, 1.0, "x0", eps, False)
    return g.view(x.shape), sq_sum


class _DMGrad(torch.autograd.Function):
    """``g`` of :func:`dmd2.kernels.reference.dm_grad`; backward :func:`dmd2.kernels.reference.dm_grad_vjp`."""

    @staticmethod
    def forward(ctx, x, real_x0, fake_x0, eps):
        ctx.save_for_backward(x, real_x0, fake_x0)
        ctx.eps = eps
        return _dm(x, real_x0, fake_x0, eps)[0]

    @staticmethod
    def backward(ctx, grad_g):
        return (*reference.dm_grad_vjp(*ctx.saved_tensors, grad_g, ctx.eps), None)


def dm_grad(x, real_x0, fake_x0, eps: float = 1e-6) -> torch.Tensor:
    """Triton version of :func:`dmd2.kernels.reference.dm_grad`; differentiable in ``x``, ``real_x0``, ``fake_x0``."""
    reference.check_dm_inputs(x, real_x0, fake_x0)
    return _DMGrad.apply(x, real_x0, fake_x0, eps)


def dm_loss(x, real_x0, fake_x0, eps: float = 1e-6) -> torch.Tensor:
    """Triton version of :func:`dmd2.kernels.reference.dm_loss`."""
    reference.check_dm_inputs(x, real_x0, fake_x0)
    g, sq_sum = _dm(x, real_x0, fake_x0, eps)
    return _DMSurrogate.apply(x, g, sq_sum)
