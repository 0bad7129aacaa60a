"""Helpers (not tests) for the training-engine tests: run the tiny recipe in-process or under torchrun (gloo, CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

# a small, fast configuration of the tiny recipe: generator updates on iterations 0, 2, 4, ...
BASE = ["--preset", "tiny", "train.progress=false", "train.sample_every=0", "train.log_every=2",
        "train.checkpoint_every=4", "train.keep_last=0", "critic.ratio=2", "train.batch_size=2"]


def run_inprocess(out, *overrides, command=None):
    from dmd2.recipes.tiny import RECIPE
    from dmd2.train import main

    argv = ([command] if command else []) + BASE + ["--out", str(out), *overrides]
    rc = main(RECIPE, argv)
    assert rc == 0
    return Path(out)


def torchrun(out, *overrides, nproc=2, script=None, check=True, env=None, timeout=600):
    """Run the tiny recipe (or ``script``) under ``torchrun --standalone --nproc_per_node nproc``."""
    # gloo on the loopback interface (the ranks share this host; the hostname's address may not be reachable in a
    # sandbox); PYTHONFAULTHANDLER prints each rank's Python stack if it aborts, so a crash names where it happened
    net = {"GLOO_SOCKET_IFNAME": "lo"} if Path("/sys/class/net/lo").exists() else {}
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1", **net,
                **(env or {})}
    target = [str(script)] if script else ["-m", "dmd2.recipes.tiny", *BASE, "--out", str(out), *overrides]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *target]
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def weights(out, step):
    from dmd2.train.checkpoint import checkpoint_path, read_checkpoint

    w, state, _ = read_checkpoint(checkpoint_path(out, step))
    return w, state


def log_records(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines() if line.strip()]


LOSS_KEYS = ("loss_critic", "loss_fake", "loss_gan_d", "loss_dm", "loss_gan_g", "loss_g", "grad_norm_generator",
             "grad_norm_critic", "logits_fake", "logits_real")


def losses(records):
    return [{k: r[k] for k in LOSS_KEYS if k in r} | {"step": r["step"]} for r in records]


def assert_tree_equal(a, b, path="", atol=None):
    """Recursive equality of nested dict/list/tensor trees; bitwise unless ``atol`` is given."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys differ {set(a) ^ set(b) if isinstance(b, dict) else type(b)}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}/{k}", atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]", atol)
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{path}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        if atol is None:
            assert torch.equal(a, b), f"{path}: differs (max {(a.double() - b.double()).abs().max().item()})"
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=lambda m: f"{path}: {m}")
    elif isinstance(a, float) and atol is not None:
        assert abs(a - b) <= atol * (1 + abs(b)), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"
