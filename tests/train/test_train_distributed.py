"""Multi-process properties on CPU (gloo, 2 ranks via torchrun, OMP_NUM_THREADS=1):

* 2-rank DDP and 2-rank FSDP2 match one process on the combined batch (one process with ``grad_accum=2`` sees
  both ranks' shards of every iteration) over iterations with generator and critic updates;
* exact resume under 2-rank DDP (bitwise), with its negative control;
* a 2-rank FSDP2 checkpoint resumes on 1 process and continues the same run;
* requires_grad toggling is safe under FSDP2 mixed precision when a module's first forward is frozen.
"""
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from dmd2.train import checkpoint as ckpt

from train_helpers import ROOT, assert_tree_equal, log_records, losses, torchrun, weights

pytestmark = pytest.mark.slow
N = 8
ATOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    r = {}
    # the reference runs under the same process setup as the ranks (OMP_NUM_THREADS=1): parameters whose true
    # gradient is ~0 (a conv bias before a per-channel GroupNorm) follow Adam-normalised round-off, which a
    # different thread count would change
    r["one"] = root / "one"
    torchrun(r["one"], f"train.max_steps={N}", "train.grad_accum=2", nproc=1)
    for mode in ("ddp", "fsdp2"):
        r[mode] = root / mode
        torchrun(r[mode], f"train.max_steps={N}", f"train.distributed={mode}")
        r[mode + "_half"] = root / f"{mode}_half"
        torchrun(r[mode + "_half"], f"train.max_steps={N // 2}", f"train.distributed={mode}")
    return r


def _assert_close_runs(a, b):
    assert_tree_equal(weights(a, N)[0], weights(b, N)[0], atol=ATOL)
    la, lb = losses(log_records(a)), losses(log_records(b))
    assert [x["step"] for x in la] == [x["step"] for x in lb] == [2, 4, 6, 8]
    for x, y in zip(la, lb):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=ATOL, abs=ATOL), (x["step"], k)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_match_one_process(runs, mode):
    # the runs contain generator updates (iterations 0, 2, 4, 6) and critic updates (all)
    assert "loss_dm" in log_records(runs[mode])[0] and "loss_fake" in log_records(runs[mode])[0]
    _assert_close_runs(runs[mode], runs["one"])
    # the networks actually moved (the comparison is not between two untouched initialisations)
    w0, w8 = weights(runs[mode], N // 2)[0]["generator"], weights(runs[mode], N)[0]["generator"]
    assert max((w0[k] - w8[k]).abs().max().item() for k in w0) > 1e-3


def test_ddp_exact_resume_and_negative_control(runs, tmp_path):
    half = runs["ddp_half"]
    neg = tmp_path / "neg"
    shutil.copytree(half, neg)
    before = len(log_records(half))
    proc = torchrun(half, f"train.max_steps={N}", "train.distributed=ddp", "--resume", "auto")
    new = log_records(half)[before:]
    assert [r["step"] for r in new] == [6, 8]
    assert re.search(r"resumed from .*checkpoint-00000004 at iteration 4", proc.stdout + proc.stderr)
    w_a, s_a = weights(runs["ddp"], N)
    w_b, s_b = weights(half, N)
    assert_tree_equal(w_a, w_b)
    assert_tree_equal(s_a["optimizers"], s_b["optimizers"])
    assert losses(log_records(half)) == losses(log_records(runs["ddp"]))

    state_file = ckpt.checkpoint_path(neg, N // 2) / "state.pt"
    state = torch.load(state_file, weights_only=True)
    for name in state["optimizers"]:
        state["optimizers"][name]["state"] = {}
    torch.save(state, state_file)
    ckpt.write_manifest(state_file.parent, N // 2, 2)  # a checkpoint written that way, not a damaged one
    torchrun(neg, f"train.max_steps={N}", "train.distributed=ddp", "--resume", "auto")
    g_a, g_n = w_a["generator"], weights(neg, N)[0]["generator"]
    assert max((g_a[k] - g_n[k]).abs().max().item() for k in g_a) > 1e-4


def test_a_refused_resume_stops_every_rank(runs, tmp_path):
    """Rank 0 alone verifies the checkpoint; its refusal reaches rank 1, so both exit with the reason (no rank waits
    for a collective the other never joins)."""
    bad = tmp_path / "bad"
    shutil.copytree(runs["ddp_half"], bad)
    for _, folder in ckpt.list_checkpoints(bad):  # (an earlier test may have resumed the run to N)
        f = folder / "generator.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF  # same size, another checksum
        f.write_bytes(bytes(data))
    before = len(log_records(bad))
    proc = torchrun(bad, f"train.max_steps={2 * N}", "train.distributed=ddp", "--resume", "auto", check=False,
                    timeout=300)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "SHA-256 differs from the manifest" in err, err[-3000:]
    assert "no checkpoint in" in err and "(rank 0)" in err, err[-3000:]  # rank 1's line names its source
    assert len(log_records(bad)) == before  # nothing trained


def test_fsdp2_checkpoint_resumes_on_one_rank(runs):
    half = runs["fsdp2_half"]
    _, state = weights(half, N // 2)
    assert state["world_size"] == 2
    # one process, twice the accumulation: the same global batch, so the same run continues
    torchrun(half, f"train.max_steps={N}", "train.grad_accum=2", "train.distributed=none", "--resume", "auto", nproc=1)
    _assert_close_runs(half, runs["one"])


def test_fsdp2_freeze_toggle_with_mixed_precision():
    """A LoRA-like module (frozen bf16 base, fp32 adapter) whose first forward is frozen, then trained under
    bf16 mixed precision: gradients reach the adapter in fp32, equal on both ranks and equal to a reference.
    (Without the trainer's lazy-init guard this crashes: 'attempting to assign a gradient with dtype BFloat16 to a
    tensor with grad_dtype Float'.)"""
    proc = torchrun(None, script=ROOT / "tests" / "train" / "fsdp_freeze_worker.py")
    results = re.findall(r"RESULT rank=(\d) frozen_grad=(\w+) base_grad=(\w+) dtype=(\S+) norm=([0-9.eE+-]+)", proc.stdout)
    assert len(results) == 2, proc.stdout + proc.stderr[-3000:]
    for _, frozen_none, base_none, dtype, _ in results:
        assert frozen_none == "True" and base_none == "True" and dtype == "torch.float32"
    norms = {float(n) for *_, n in results}
    assert len(norms) == 1

    import sys

    sys.path.insert(0, str(ROOT / "tests" / "train"))
    from fsdp_freeze_worker import LoRALike

    torch.manual_seed(0)
    m = LoRALike()
    torch.randn(4, 8)  # the worker's frozen-phase input
    y = torch.randn(4, 8).bfloat16()
    wa = m.adapter.weight.detach().bfloat16().requires_grad_()
    out = F.linear(y, m.base.weight, m.base.bias).float() + F.linear(y, wa, m.adapter.bias.detach().bfloat16()).float()
    out.pow(2).sum().backward()
    assert norms.pop() == pytest.approx(wa.grad.double().norm().item(), rel=1e-6)


def test_exit_process_outside_a_job_is_sys_exit():
    from dmd2.train.distributed import exit_process

    with pytest.raises(SystemExit) as e:
        exit_process(3)
    assert e.value.code == 3


@pytest.mark.parametrize("code", [0, 3])
def test_exit_process_ends_a_rank_with_its_code(code):
    """A rank leaves through os._exit after destroy_process_group: its output is flushed and its exit code kept."""
    proc = torchrun(None, script=ROOT / "tests" / "train" / "exit_worker.py", check=False,
                    env={"DMD2_TEST_EXIT_CODE": str(code)})
    assert proc.stdout.count("sum=6.0") == 2, proc.stdout + proc.stderr[-3000:]
    assert (proc.returncode == 0) == (code == 0), (proc.returncode, proc.stderr[-3000:])
