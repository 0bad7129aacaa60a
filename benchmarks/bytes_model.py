"""Bytes-moved model: what the eager PyTorch reference moves (measured op by op) vs what the fused kernels move.

Eager bytes are counted with a ``TorchDispatchMode`` that adds, for every ATen op the reference runs, the bytes of its
tensor inputs and outputs (views and metadata ops excluded): the traffic an eager run does, one kernel per op, when no
operand stays in cache. Fused bytes follow the kernels' loads and stores (``dmd2/kernels/triton``). Run:
``python benchmarks/bytes_model.py`` (CPU is fine; meta-free, small shapes, result per element).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dmd2.kernels import reference as R  # noqa: E402

_FREE = {"view", "_unsafe_view", "reshape", "expand", "detach", "alias", "t", "transpose", "permute", "squeeze",
         "unsqueeze", "as_strided", "slice", "select", "empty", "empty_like", "lift_fresh", "_to_copy_noop"}


class CountBytes(TorchDispatchMode):
    def __init__(self, min_numel: int):
        super().__init__()
        self.bytes, self.passes, self.min_numel = 0, 0, min_numel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in _FREE:
            return out
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.min_numel:  # tensor-sized traffic only
                self.bytes += t.numel() * t.element_size()
                self.passes += 1
        return out


def eager(fn, n_elem: int, backward_of=None):
    m = CountBytes(n_elem)
    with m:
        out = fn()
        if backward_of is not None:
            backward_of(out)
    return m.bytes / n_elem, m.passes


def table(dtype=torch.bfloat16, shape=(2, 4, 64, 64)):
    n = torch.Size(shape).numel()
    e = torch.empty((), dtype=dtype).element_size()
    b = shape[0]
    x = torch.randn(shape).to(dtype)
    al, sg = torch.rand(b) + 0.5, torch.rand(b) + 0.1
    rows = []
    # noise_add: eager = randn + core's add_noise formula; reference also shown
    def eager_noise():
        eps = torch.randn(shape, dtype=dtype)
        return (al.view(-1, 1, 1, 1) * x.float() + sg.view(-1, 1, 1, 1) * eps.float()).to(dtype)
    rows.append(("noise_add fwd (randn + add_noise)", *eager(eager_noise, n), 2 * e, "read x0, write x_t"))
    # fused_dm, eps predictions + CFG
    t = {k: torch.randn(shape).to(dtype) for k in ("x_t", "c", "u", "f")}
    xg = x.clone().requires_grad_()
    f = lambda: R.fused_dm(xg, t["x_t"], t["c"], t["u"], t["f"], al, sg, 8.0, "eps").loss  # noqa: E731
    rows.append(("fused_dm fwd (eps, CFG)", *eager(f, n), 9 * e, "pass 1: x,x_t,c,u; pass 2: x_t,c,u,f + write g"))
    rows.append(("fused_dm fwd+bwd", *eager(f, n, lambda L: L.backward()), 11 * e, "forward + read g, write grad"))
    # denoise_loss, eps target: eager = randn + mse per sample (+ backward)
    pred = torch.randn(shape).to(dtype).requires_grad_()
    def eager_dl():
        eps = torch.randn(shape, dtype=dtype)
        return ((pred.float() - eps.float()) ** 2).flatten(1).mean(1).mul(al).sum()
    rows.append(("denoise_loss fwd+bwd (eps)", *eager(eager_dl, n, lambda L: L.backward()), 3 * e,
                 "fwd: read pred; bwd: read pred, write grad (eps redrawn)"))
    return rows


if __name__ == "__main__":
    for dt in (torch.bfloat16, torch.float32):
        print(f"\n{dt}: bytes per element (eager = measured ATen traffic; fused = kernel loads + stores)")
        print(f"{'op':38s} {'eager B/el':>10s} {'eager passes':>12s} {'fused B/el':>10s}  ratio  fused traffic")
        for name, eb, ep, fb, what in table(dt):
            # the eager fwd+bwd rows above include the forward's traffic; the fused column is the same scope
            print(f"{name:38s} {eb:10.1f} {ep:12d} {fb:10d}  {eb / fb:5.1f}x  {what}")
