"""Fused critic denoising loss (math: ``reference.denoise_loss``), forward and backward.

For ``target="eps"`` the target noise is redrawn from ``(seed, offset)`` with ``tl.randn`` in both passes, so neither
the forward nor the backward reads (or the autograd graph keeps) a noise tensor. Forward: one read of ``pred`` and one
partial sum of squares per program; backward: one read of ``pred``, one write of the gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._common import alloc, block_size, per_sample, rows, store


@triton.jit
def _target(x0_ptr, idx, mask, seed, offset, TARGET_EPS: tl.constexpr):
    if TARGET_EPS:
        y = tl.randn(seed, offset + idx)
    else:
        y = tl.load(x0_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _denoise_fwd_kernel(pred_ptr, x0_ptr, part_ptr, n, n_blocks, seed, offset, TARGET_EPS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    cols = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    idx = b.to(tl.int64) * n + cols
    d = tl.load(pred_ptr + idx, mask=mask, other=0.0).to(tl.float32) - _target(x0_ptr, idx, mask, seed, offset, TARGET_EPS)
    tl.store(part_ptr + b * n_blocks + pid, tl.sum(tl.where(mask, d * d, 0.0), axis=0))


@triton.jit
def _denoise_bwd_kernel(pred_ptr, x0_ptr, coef_ptr, grad_ptr, n, seed, offset, TARGET_EPS: tl.constexpr, BLOCK: tl.constexpr):
    # dL/dpred_bj = coef_b * (pred_bj - y_bj), coef_b = 2 * grad_out_b * w_b / n
    b = tl.program_id(1)
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    idx = b.to(tl.int64) * n + cols
    d = tl.load(pred_ptr + idx, mask=mask, other=0.0).to(tl.float32) - _target(x0_ptr, idx, mask, seed, offset, TARGET_EPS)
    store(grad_ptr + idx, tl.load(coef_ptr + b) * d, mask)


class _DenoiseLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, weight, x0, seed, offset, target_eps):
        batch = pred.shape[0]
        pr = rows(pred, batch)
        xr = None if target_eps else rows(x0, batch)
        n = pr.shape[1]
        block = block_size(n)
        n_blocks = triton.cdiv(n, block)
        part = alloc((batch, n_blocks), torch.float32, pred.device)
        seed, offset = (seed, offset) if target_eps else (0, 0)
        _denoise_fwd_kernel[(n_blocks, batch)](pr, xr, part, n, n_blocks, seed, offset, TARGET_EPS=target_eps, BLOCK=block)
        w = per_sample(weight)
        # Saved: pred (an input, needed for the gradient), x0 for target x0, the (B,) weights. Never eps.
        ctx.save_for_backward(pr, xr, w)
        ctx.seed, ctx.offset, ctx.target_eps, ctx.shape, ctx.dtype = seed, offset, target_eps, pred.shape, pred.dtype
        return w * (part.sum(dim=1) / n)

    @staticmethod
    def backward(ctx, grad_out):
        pr, xr, w = ctx.saved_tensors
        batch, n = pr.shape
        coef = (grad_out.float() * w * (2.0 / n)).contiguous()
        grad = alloc(ctx.shape, ctx.dtype, pr.device)
        block = block_size(n)
        _denoise_bwd_kernel[(triton.cdiv(n, block), batch)](
            pr, xr, coef, grad, n, ctx.seed, ctx.offset, TARGET_EPS=ctx.target_eps, BLOCK=block
        )
        return grad, None, None, None, None, None


def denoise_loss(pred, weight, target="eps", x0=None, seed=None, offset=None) -> torch.Tensor:
    """Triton version of :func:`dmd2.kernels.reference.denoise_loss`; float32 ``(B,)`` per-sample losses."""
    reference.check_denoise_loss_inputs(pred, weight, target, x0, seed, offset)
    return _DenoiseLoss.apply(pred, weight, x0, seed, offset, target == "eps")
