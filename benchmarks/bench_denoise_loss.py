"""Benchmark: the critic's per-sample denoising loss with eps regenerated from (seed, offset) (VP eps-MSE).

Minimal traffic: forward reads pred (n); backward reads pred and writes its gradient (2 n); full: 3 n.
"""
import torch

from harness import Op, tensor_passes


def setup(shape, dtype, device):
    return {
        "pred": torch.randn(shape, device=device).to(dtype).requires_grad_(),
        "weight": torch.rand(shape[0], device=device),
    }


def call(fn, t):
    return fn(t["pred"], t["weight"], "eps", None, 7, 0)


OP = Op("denoise_loss", setup, call, tensor_passes(1, 2))

if __name__ == "__main__":
    from run import main

    main(["--ops", "denoise_loss"])
