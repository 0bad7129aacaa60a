"""Benchmark: counter-based normal noise (``philox_normal``); minimal traffic: one float32 write per element."""
import torch

from harness import Op, elsize


def setup(shape, dtype, device):
    return {"shape": shape, "device": device}


def call(fn, inp):
    return fn(1234, 0, inp["shape"], device=inp["device"])


def nbytes(mode, shape, dtype):
    return torch.Size(shape).numel() * elsize(torch.float32)


OP = Op("philox_normal", setup, call, nbytes, has_backward=False)

if __name__ == "__main__":
    from run import main

    main(["--ops", "philox_normal"])
