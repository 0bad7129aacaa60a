"""Benchmark: counter-based normal noise (``philox_normal``); minimal traffic: one float32 write per element."""
import torch

from harness import Op, tensor_passes


def setup(shape, dtype, device):
    return {"shape": shape, "device": device}


def call(fn, inp):
    return fn(1234, 0, inp["shape"], device=inp["device"])


OP = Op("philox_normal", setup, call, tensor_passes(1, 0, dtype=torch.float32), has_backward=False)

if __name__ == "__main__":
    from run import main

    main(["--ops", "philox_normal"])
