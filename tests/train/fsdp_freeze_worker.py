"""torchrun worker for the FSDP2 freeze test (tests/train/test_train_distributed.py).

A module with a frozen bf16 base and a trainable fp32 adapter (the LoRA layout), wrapped by ``wrap_trained`` under
bf16 mixed precision. Its first forward happens while the adapter is frozen (as the fake score's does, inside the
generator phase); then it is unfrozen and trained. Prints the adapter's gradient (dtype, norm) per rank.
Env ``DMD2_SKIP_LAZY_INIT=1`` disables the trainer's guard, to show the trap it avoids.
"""
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import dmd2.train.distributed as D

if os.environ.get("DMD2_SKIP_LAZY_INIT") == "1":
    D._fsdp_lazy_init = lambda m: None


class LoRALike(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = nn.Linear(8, 8).to(torch.bfloat16)
        self.base.requires_grad_(False)
        self.adapter = nn.Linear(8, 8)

    def forward(self, x):
        return self.base(x.to(torch.bfloat16)).float() + self.adapter(x).float()


def main():
    info = D.init_distributed("fsdp2", "cpu")
    torch.manual_seed(0)
    m = LoRALike()
    trainable = D.Trainable([m])
    m = D.wrap_trained(m, info, "bf16")
    trainable.set(False)
    x = torch.randn(4, 8, requires_grad=True)
    m(x).sum().backward()  # frozen first forward; only the input gets a gradient
    frozen_grad = m.adapter.weight.grad
    trainable.set(True)
    y = torch.randn(4, 8)
    m(y).pow(2).sum().backward()
    g = m.adapter.weight.grad.full_tensor()
    base_grad = m.base.weight.grad
    # one write per line: the two ranks share the pipe
    sys.stdout.write(f"RESULT rank={dist.get_rank()} frozen_grad={frozen_grad is None} base_grad={base_grad is None} "
                     f"dtype={g.dtype} norm={g.double().norm().item()!r}\n")
    sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    D.exit_process(main())
