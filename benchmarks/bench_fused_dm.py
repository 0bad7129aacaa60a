"""Benchmark: the fused distribution-matching step (SDXL-style: eps predictions, CFG scale 8).

Minimal traffic: forward reads x, x_t, cond, uncond, fake and writes g (6 n); backward reads g... as the upstream
scalar times g: reads g, writes grad_x (2 n); full: 8 n.
"""
import torch

from harness import Op, tensor_passes


def setup(shape, dtype, device):
    b = shape[0]
    t = {k: torch.randn(shape, device=device).to(dtype) for k in ("x_t", "cond", "uncond", "fake")}
    t["x"] = torch.randn(shape, device=device).to(dtype).requires_grad_()
    t["alpha"] = 0.5 + 0.5 * torch.rand(b, device=device)
    t["sigma"] = 0.1 + 0.9 * torch.rand(b, device=device)
    return t


def call(fn, t):
    out = fn(t["x"], t["x_t"], t["cond"], t["uncond"], t["fake"], t["alpha"], t["sigma"], 8.0, "eps", 1e-6, False)
    return out.loss


OP = Op("fused_dm", setup, call, tensor_passes(6, 2))

if __name__ == "__main__":
    from run import main

    main(["--ops", "fused_dm"])
