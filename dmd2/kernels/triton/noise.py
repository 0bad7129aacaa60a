"""Counter-based noise and fused noising: ``philox_normal`` and ``noise_add`` (math: ``reference.noise_add``).

``eps`` never lives in memory: every kernel that needs it calls ``tl.randn(seed, offset + i)`` for flat index ``i``
(Philox4x32-10 on a 64-bit counter + Box-Muller), so the forward pass draws it and the backward pass redraws it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._common import alloc, block_size, per_sample, rows, store


@triton.jit
def _philox_normal_kernel(out_ptr, n, seed, offset, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.randn(seed, offset + i), mask=i < n)


def philox_normal(seed: int, offset: int, shape, device=None) -> torch.Tensor:
    """Triton version of :func:`dmd2.kernels.reference.philox_normal` (same stream, element by element)."""
    shape = torch.Size([shape] if isinstance(shape, int) else shape)
    n = shape.numel()
    reference._check_seed_offset(seed, offset, n)
    out = alloc(shape, torch.float32, device if device is not None else "cpu")
    if n:
        block = block_size(n)
        _philox_normal_kernel[(triton.cdiv(n, block),)](out, n, seed, offset, BLOCK=block)
    return out


@triton.jit
def _noise_add_fwd_kernel(x0_ptr, alpha_ptr, sigma_ptr, out_ptr, n, seed, offset, BLOCK: tl.constexpr):
    # grid: (blocks per sample, B); sample b owns flat indices [b*n, (b+1)*n)
    b = tl.program_id(1)
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    idx = b.to(tl.int64) * n + cols
    a = tl.load(alpha_ptr + b)
    s = tl.load(sigma_ptr + b)
    x0 = tl.load(x0_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    eps = tl.randn(seed, offset + idx)
    store(out_ptr + idx, a * x0 + s * eps, mask)


@triton.jit
def _noise_add_bwd_kernel(
    grad_ptr, x0_ptr, alpha_ptr, grad_x0_ptr, part_alpha_ptr, part_sigma_ptr, n, n_blocks, seed, offset,
    NEED_X0: tl.constexpr, NEED_ALPHA: tl.constexpr, NEED_SIGMA: tl.constexpr, BLOCK: tl.constexpr,
):
    # d x_t/d x0 = alpha_b;  dL/d alpha_b = sum_j g_bj x0_bj;  dL/d sigma_b = sum_j g_bj eps_bj (eps redrawn here)
    pid = tl.program_id(0)
    b = tl.program_id(1)
    cols = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    idx = b.to(tl.int64) * n + cols
    g = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if NEED_X0:
        a = tl.load(alpha_ptr + b)
        store(grad_x0_ptr + idx, a * g, mask)
    if NEED_ALPHA:
        x0 = tl.load(x0_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        tl.store(part_alpha_ptr + b * n_blocks + pid, tl.sum(g * x0, axis=0))
    if NEED_SIGMA:
        eps = tl.randn(seed, offset + idx)
        tl.store(part_sigma_ptr + b * n_blocks + pid, tl.sum(tl.where(mask, g * eps, 0.0), axis=0))


class _NoiseAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0, alpha, sigma, seed, offset):
        batch = x0.shape[0]
        x0r = rows(x0, batch)
        n = x0r.shape[1]
        a, s = per_sample(alpha), per_sample(sigma)
        out = alloc(x0.shape, x0.dtype, x0.device)
        block = block_size(n)
        _noise_add_fwd_kernel[(triton.cdiv(n, block), batch)](x0r, a, s, out, n, seed, offset, BLOCK=block)
        # Saved: the (B,) alpha; x0 only when alpha needs a gradient. Never eps.
        ctx.save_for_backward(a, x0r if ctx.needs_input_grad[1] else None)
        ctx.seed, ctx.offset, ctx.shape, ctx.dtypes = seed, offset, x0.shape, (x0.dtype, alpha.dtype, sigma.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        a, x0r = ctx.saved_tensors
        need_x0, need_alpha, need_sigma = ctx.needs_input_grad[:3]
        batch = ctx.shape[0]
        g = rows(grad, batch)
        n = g.shape[1]
        block = block_size(n)
        n_blocks = triton.cdiv(n, block)
        grad_x0 = alloc(ctx.shape, ctx.dtypes[0], grad.device) if need_x0 else None
        part_alpha = alloc((batch, n_blocks), torch.float32, grad.device) if need_alpha else None
        part_sigma = alloc((batch, n_blocks), torch.float32, grad.device) if need_sigma else None
        _noise_add_bwd_kernel[(n_blocks, batch)](
            g, x0r, a, grad_x0, part_alpha, part_sigma, n, n_blocks, ctx.seed, ctx.offset,
            NEED_X0=need_x0, NEED_ALPHA=need_alpha, NEED_SIGMA=need_sigma, BLOCK=block,
        )
        grad_alpha = part_alpha.sum(dim=1).to(ctx.dtypes[1]) if need_alpha else None
        grad_sigma = part_sigma.sum(dim=1).to(ctx.dtypes[2]) if need_sigma else None
        return grad_x0, grad_alpha, grad_sigma, None, None


def noise_add(x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """Triton version of :func:`dmd2.kernels.reference.noise_add`: one read of ``x0``, one write of ``x_t``."""
    reference.check_noise_add_inputs(x0, alpha, sigma, seed, offset)
    return _NoiseAdd.apply(x0, alpha, sigma, seed, offset)
