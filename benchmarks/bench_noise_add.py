"""Benchmark: fused noising ``x_t = alpha_b x0 + sigma_b eps(seed, offset)``.

Minimal traffic: forward reads x0 and writes x_t (2 n); backward (to x0 and sigma, eps redrawn) reads the upstream
gradient and writes grad_x0 (2 n); full: 4 n (element size of the input dtype).
"""
import torch

from harness import Op, tensor_passes


def setup(shape, dtype, device):
    b = shape[0]
    return {
        "x0": torch.randn(shape, device=device).to(dtype).requires_grad_(),
        "alpha": torch.rand(b, device=device),
        "sigma": torch.rand(b, device=device).requires_grad_(),
    }


def call(fn, inp):
    return fn(inp["x0"], inp["alpha"], inp["sigma"], 7, 0)


OP = Op("noise_add", setup, call, tensor_passes(2, 2))

if __name__ == "__main__":
    from run import main

    main(["--ops", "noise_add"])
