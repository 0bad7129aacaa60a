"""torchrun worker for the exit-path test: joins the job, runs one collective, leaves it, then ends through
``dmd2.train.distributed.exit_process`` with the code given in ``DMD2_TEST_EXIT_CODE``."""
import os

import torch
import torch.distributed as dist

import dmd2.train.distributed as D

info = D.init_distributed("ddp", "cpu")
t = torch.ones(3)
dist.all_reduce(t)
print(f"RESULT rank={info.rank} sum={t.sum().item()}", flush=True)
dist.destroy_process_group()
D.exit_process(int(os.environ["DMD2_TEST_EXIT_CODE"]))
raise AssertionError("exit_process returned")
