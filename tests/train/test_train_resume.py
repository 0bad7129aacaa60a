"""Single-process engine properties: exact resume (and its negative control), write-then-rename, keep-last-K,
SIGTERM, NaN stop, bf16 autocast, gradient checkpointing."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dmd2.recipes import tiny
from dmd2.train import NonFiniteError, main
from dmd2.train import checkpoint as ckpt

from train_helpers import BASE, ROOT, assert_tree_equal, log_records, losses, run_inprocess, weights

N = 8


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """N iterations in one go (checkpoints at 4 and 8)."""
    return run_inprocess(tmp_path_factory.mktemp("straight") / "run", f"train.max_steps={N}")


def test_exact_resume_single_process(straight, tmp_path):
    out = run_inprocess(tmp_path / "run", f"train.max_steps={N // 2}")
    first = log_records(out)
    assert [r["step"] for r in first] == [2, 4]
    w_half, _ = weights(out, N // 2)
    w_ref_half, _ = weights(straight, N // 2)
    assert_tree_equal(w_half, w_ref_half)

    run_inprocess(out, f"train.max_steps={N}", "--resume", "auto")
    full = log_records(out)
    new = full[len(first):]
    assert [r["step"] for r in new] == [6, 8], "the resumed process logs only the iterations after the checkpoint"

    w_a, s_a = weights(straight, N)
    w_b, s_b = weights(out, N)
    assert_tree_equal(w_a, w_b)                                   # generator, fake score, GAN head, EMA: bitwise
    assert_tree_equal(s_a["optimizers"], s_b["optimizers"])       # AdamW moments and step counts: bitwise
    assert s_a["critic_scheduler"] == s_b["critic_scheduler"] == {"ratio": 2, "step": N}
    assert losses(full) == losses(log_records(straight))          # logged losses: identical floats


def _drop_optimizer_state(ck_dir):
    state = torch.load(ck_dir / "state.pt", weights_only=True)
    for name in state["optimizers"]:
        state["optimizers"][name]["state"] = {}
    torch.save(state, ck_dir / "state.pt")
    ckpt.write_manifest(ck_dir, state["step"], 1)  # a checkpoint written that way, not a damaged one


def test_exact_resume_with_fused_ops(tmp_path):
    """The objective's Philox noise stream (objective.fused_ops) is keyed per micro-batch, so it resumes exactly."""
    ref = run_inprocess(tmp_path / "ref", "train.max_steps=4", "objective.fused_ops=true", "objective.impl=torch")
    out = run_inprocess(tmp_path / "run", "train.max_steps=2", "train.checkpoint_every=2", "objective.fused_ops=true",
                        "objective.impl=torch")
    run_inprocess(out, "train.max_steps=4", "train.checkpoint_every=2", "objective.fused_ops=true", "objective.impl=torch",
                  "--resume", "auto")
    assert_tree_equal(weights(ref, 4)[0], weights(out, 4)[0])
    assert losses(log_records(out)) == losses(log_records(ref))
    # and it is a different stream from the torch-generator path (the option is live)
    plain = run_inprocess(tmp_path / "plain", "train.max_steps=4", "objective.impl=torch")
    assert losses(log_records(plain)) != losses(log_records(ref))


def test_resume_without_optimizer_state_differs(straight, tmp_path):
    """Negative control: the comparison above can fail. Drop the AdamW moments at the checkpoint and resume."""
    out = run_inprocess(tmp_path / "run", f"train.max_steps={N // 2}")
    _drop_optimizer_state(ckpt.checkpoint_path(out, N // 2))
    run_inprocess(out, f"train.max_steps={N}", "--resume", "auto")
    w_a, _ = weights(straight, N)
    w_b, _ = weights(out, N)
    diff = max((w_a["generator"][k] - w_b["generator"][k]).abs().max().item() for k in w_a["generator"])
    assert diff > 1e-4
    assert losses(log_records(out))[-1] != losses(log_records(straight))[-1]


def test_state_pt_is_weights_only_and_layout(straight):
    d = ckpt.checkpoint_path(straight, N)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "ema.safetensors", "fake_score.safetensors",
                                                   "gan_head.safetensors", "generator.safetensors", "manifest.json", "state.pt"]
    state = torch.load(d / "state.pt", weights_only=True)
    assert state["step"] == N and set(state["optimizers"]) == {"generator", "critic"}
    # optimizer state is keyed by parameter name (world-size independent)
    assert "inp.weight" in state["optimizers"]["generator"]["state"]
    assert "fake_score.mid.2.weight" in state["optimizers"]["critic"]["state"]
    assert "gan_head.out.0.weight" in state["optimizers"]["critic"]["state"]


def test_crash_between_write_and_rename(straight, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = ckpt._finalize

    def crash(tmp, final):
        if final.name.endswith(f"{N:08d}"):
            raise KeyboardInterrupt("simulated crash before the rename")
        real(tmp, final)

    monkeypatch.setattr(ckpt, "_finalize", crash)
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(out, f"train.max_steps={N}")
    monkeypatch.setattr(ckpt, "_finalize", real)
    assert (out / "checkpoints" / f"checkpoint-{N:08d}.tmp" / "state.pt").is_file()   # fully written, not renamed
    assert ckpt.latest_checkpoint(out) == ckpt.checkpoint_path(out, N // 2)
    w, state, _ = ckpt.read_checkpoint(ckpt.latest_checkpoint(out))
    assert state["step"] == N // 2
    run_inprocess(out, f"train.max_steps={N}", "--resume", "auto")
    assert not (out / "checkpoints" / f"checkpoint-{N:08d}.tmp").exists()
    assert_tree_equal(weights(straight, N)[0], weights(out, N)[0])
    assert losses(log_records(out)) == losses(log_records(straight))


def test_resume_checksums_each_file_once(straight, tmp_path, monkeypatch):
    """``--resume auto`` reads every byte of the chosen checkpoint once: the CLI verifies its checksums, the load
    checks sizes only (reading it twice cost seconds for MNIST, tens of seconds for SDXL)."""
    import shutil

    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(straight / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / f"checkpoint-{N:08d}")
    hashed = []
    real = ckpt._sha256
    monkeypatch.setattr(ckpt, "_sha256", lambda f: hashed.append(Path(f).name) or real(f))
    run_inprocess(out, f"train.max_steps={N}", "--resume", "auto")
    def listed(step):
        return sorted(json.loads((ckpt.checkpoint_path(out, step) / ckpt.MANIFEST).read_text())["files"])

    # the resumed checkpoint's files once each, then the files of the one written at N (its manifest)
    assert sorted(hashed[:len(listed(N // 2))]) == listed(N // 2), hashed
    assert sorted(hashed[len(listed(N // 2)):]) == listed(N), hashed
    assert_tree_equal(weights(straight, N)[0], weights(out, N)[0])


def test_a_checkpoint_pruned_while_it_is_read_is_skipped(straight, tmp_path, monkeypatch):
    """A running job prunes (``keep_last``) by renaming then deleting; a reader listing the folder at that moment
    (a resume, ``load_generator``, a watcher) skips the vanished checkpoint instead of crashing."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    doomed = ckpt.checkpoint_path(out, N)
    real = ckpt._files

    def pruned_meanwhile(folder):
        if Path(folder) == doomed and doomed.exists():
            shutil.rmtree(doomed)  # what the pruning job does between our listing and our read
        return real(folder)

    monkeypatch.setattr(ckpt, "_files", pruned_meanwhile)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [N // 2]
    shutil.copytree(straight / "checkpoints" / doomed.name, doomed)
    with pytest.raises(ValueError, match="disappeared while it was read"):
        ckpt.verify_checkpoint(doomed)
    shutil.copytree(straight / "checkpoints" / doomed.name, doomed)
    assert ckpt.latest_checkpoint(out, report=lambda msg: None) == ckpt.checkpoint_path(out, N // 2)


def test_keep_last(tmp_path):
    out = run_inprocess(tmp_path / "run", "train.max_steps=8", "train.checkpoint_every=2", "train.keep_last=2")
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [6, 8]


def test_resume_path_must_be_complete(tmp_path):
    with pytest.raises(ValueError, match="expected a complete checkpoint folder"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "nope"))
    assert ckpt.resolve_resume(tmp_path, "auto") is None
    assert ckpt.resolve_resume(tmp_path, "") is None


def _nan_recipe(bad_call):
    calls = {"n": 0}

    def build(cfg, info=None):
        c = tiny.build(cfg, info)
        teacher = c.teacher

        def nan_teacher(x_t, t, cond=None):
            calls["n"] += 1
            out = teacher(x_t, t, cond)
            return out * float("nan") if calls["n"] >= bad_call else out

        c.teacher = nan_teacher
        return c

    return dataclasses.replace(tiny.RECIPE, build=build)


def test_nan_stops_run_and_keeps_last_good_checkpoint(straight, tmp_path):
    out = tmp_path / "run"
    # the teacher runs once per generator update (iterations 0, 2, 4): its 3rd call is in iteration 4
    with pytest.raises(NonFiniteError, match=r"non-finite loss_dm at iteration 4 \(generator update"):
        main(_nan_recipe(bad_call=3), BASE + ["--out", str(out), f"train.max_steps={N}"])
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [N // 2]
    assert not any(p.name.endswith(".tmp") for p in (out / "checkpoints").iterdir())
    assert_tree_equal(weights(out, N // 2)[0], weights(straight, N // 2)[0])
    assert [r["step"] for r in log_records(out)] == [2, 4]


def test_bf16_means_bf16(tmp_path):
    """Under train.mixed_precision=bf16 the networks compute in bfloat16, except the GAN head and the DM term's
    fake-score query (fp32, as the official code runs them); master weights and AdamW stay fp32."""
    from dmd2.train import Trainer, resolve_config

    cfg = resolve_config(tiny.RECIPE, "tiny", BASE[2:] + ["train.max_steps=2", "train.mixed_precision=bf16"], out=str(tmp_path))
    c = tiny.build(cfg)
    seen = []
    for name, m in (("generator", c.generator.inp), ("fake_score", c.fake_score.mid), ("gan_head", c.gan_head.out[0])):
        m.register_forward_hook(lambda mod, a, o, name=name: seen.append((name, o.dtype)))
    tr = Trainer(cfg, c, out=tmp_path)
    tr.train()
    assert {n for n, _ in seen} == {"generator", "fake_score", "gan_head"}
    assert all(dt == torch.bfloat16 for n, dt in seen if n == "generator"), seen
    assert all(dt == torch.float32 for n, dt in seen if n == "gan_head"), seen
    fake = [dt for n, dt in seen if n == "fake_score"]
    assert fake.count(torch.float32) == 1 and torch.bfloat16 in fake, seen  # one generator turn: one DM query
    assert all(p.dtype == torch.float32 for p in c.generator.parameters())
    assert all(v.dtype == torch.float32 for st in tr.opt_gen.state.values() for k, v in st.items() if k != "step")


def test_grad_checkpointing_recomputes_same_result(tmp_path):
    from dmd2.train import Trainer, resolve_config

    results = {}
    for flag in (False, True):
        cfg = resolve_config(tiny.RECIPE, "tiny", BASE[2:] + ["train.max_steps=3", f"train.grad_checkpointing={flag}"],
                             out=str(tmp_path / str(flag)))
        torch.manual_seed(0)
        c = tiny.build(cfg)
        count = {"n": 0}
        c.generator.mid[0].register_forward_pre_hook(lambda *a: count.__setitem__("n", count["n"] + 1))  # inside a unit
        Trainer(cfg, c).train()
        results[flag] = ({k: v.clone() for k, v in c.generator.state_dict().items()}, count["n"])
    assert results[True][1] > results[False][1]  # activations were recomputed in backward
    assert_tree_equal(results[False][0], results[True][0])


@pytest.mark.slow
def test_sigterm_leaves_resumable_checkpoint(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dmd2.recipes.tiny", *BASE, "--out", str(out), "train.max_steps=100000",
           "train.checkpoint_every=100000", "train.log_every=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    # wait (up to a generous 300 s, a hang guard, not a speed check) until 3 iterations are logged, then stop the run
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]  # the documented code of an interrupted run
    found = ckpt.list_checkpoints(out)
    assert len(found) == 1, found
    s = found[0][0]
    assert 3 <= s < 100000 and "SIGTERM: checkpoint written at iteration" in stderr + stdout
    # resume to s + 3 and compare with a straight run of s + 3 iterations (same process setup)
    for args, target in (([f"train.max_steps={s + 3}", "--resume", "auto"], out), ([f"train.max_steps={s + 3}"], tmp_path / "ref")):
        subprocess.run([sys.executable, "-m", "dmd2.recipes.tiny", *BASE, "--out", str(target), "train.log_every=1", *args],
                       cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    assert_tree_equal(weights(out, s + 3)[0], weights(tmp_path / "ref", s + 3)[0])
    assert losses(log_records(out)) == losses(log_records(tmp_path / "ref"))
