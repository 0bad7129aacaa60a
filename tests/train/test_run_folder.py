"""Run-folder integrity under faults: one run per folder (lock), checkpoints trusted only when their manifest verifies,
pruning through ``.trash``, stale folders removed at start, non-finite tensors refused, an append-only log whose
resume rewrite is atomic, SIGTERM / SIGINT (checkpoint, then exit 128 + signal, no evaluation), one-line errors for
user mistakes, config changes at resume, normal file modes, and random kill -9 recovery."""
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dmd2.recipes import tiny
from dmd2.train import checkpoint as ckpt
from dmd2.train import main
from dmd2.train.monitor import RunMonitor

from train_helpers import BASE, ROOT, assert_tree_equal, log_records, losses, run_inprocess, weights

N = 8
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """N iterations in one go (checkpoints at 4 and 8)."""
    return run_inprocess(tmp_path_factory.mktemp("straight") / "run", f"train.max_steps={N}")


def _cli(capsys, out, *args, recipe=tiny.RECIPE):
    rc = main(recipe, BASE + ["--out", str(out), *args])
    return rc, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if not l.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------------ the lock


def test_second_run_on_a_folder_exits_at_once_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom dmd2.train.checkpoint import hold_run_folder\n"
                               f"with hold_run_folder({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(600)"],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, err = _cli(capsys, out, "train.max_steps=2")
        assert rc == 2
        assert _one_error_line(err) == (f"error: run folder {out} is in use by another run (pid {holder.pid}); "
                                        f"wait for it to end or choose another --out")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()  # kill -9: the OS releases the lock
        holder.wait()
    run_inprocess(out, "train.max_steps=2")
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]


def test_lock_is_reentrant_and_leaves_no_trace_when_nothing_was_written(tmp_path):
    out = tmp_path / "new"
    with ckpt.hold_run_folder(out):
        with ckpt.hold_run_folder(out):
            assert (out / ".lock").read_text() == f"{os.getpid()}\n"
        assert (out / ".lock").exists()
    assert not out.exists()  # created here, and the run wrote nothing
    with ckpt.hold_run_folder(out):
        (out / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json"]


# ------------------------------------------------------------------------------------------ verification and pruning


def test_manifest_lists_every_file_and_verifies(straight):
    d = ckpt.checkpoint_path(straight, N)
    man = json.loads((d / ckpt.MANIFEST).read_text())
    assert man["step"] == N and man["world_size"] == 1
    assert sorted(man["files"]) == sorted(p.name for p in d.iterdir() if p.name != ckpt.MANIFEST)
    for name, e in man["files"].items():
        assert (d / name).stat().st_size == e["size"] and len(e["sha256"]) == 64
    ckpt.verify_checkpoint(d)


@pytest.mark.parametrize("damage,reason", [
    ("truncate:generator.safetensors", r"generator.safetensors: \d+ bytes, the manifest says \d+ \(truncated or rewritten\)"),
    ("flip:fake_score.safetensors", r"fake_score.safetensors: SHA-256 differs from the manifest"),
    ("flip:state.pt", r"state.pt: SHA-256 differs from the manifest"),
    ("delete:gan_head.safetensors", r"gan_head.safetensors: listed in manifest.json but missing"),
    ("delete:manifest.json", r"no manifest.json \(an interrupted write"),
    ("add:stray.bin", r"stray.bin not listed in manifest.json"),
])
def test_damaged_newest_checkpoint_is_skipped_and_resume_is_exact(straight, tmp_path, capsys, damage, reason):
    out = run_inprocess(tmp_path / "run", f"train.max_steps={N}", "train.checkpoint_every=2")
    newest = ckpt.checkpoint_path(out, N)
    kind, name = damage.split(":")
    f = newest / name
    if kind == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif kind == "flip":
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    elif kind == "delete":
        f.unlink()
    else:
        f.write_bytes(b"x")
    with pytest.raises(ValueError, match=reason):
        ckpt.verify_checkpoint(newest)
    capsys.readouterr()
    rc, err = _cli(capsys, out, f"train.max_steps={N}", "train.checkpoint_every=2", "--resume", "auto")
    assert rc == 0, err
    import re
    assert re.search(rf"warning: skipping {re.escape(str(newest))}: .*{reason}", err), err
    assert ckpt.latest_checkpoint(out) == newest  # rewritten from checkpoint 6
    assert_tree_equal(weights(out, N)[0], weights(straight, N)[0])
    assert losses(log_records(out)) == losses(log_records(straight))


def test_resume_auto_with_no_checkpoint_that_verifies_is_an_error(tmp_path, capsys):
    out = run_inprocess(tmp_path / "run", "train.max_steps=4")
    (ckpt.checkpoint_path(out, 4) / "state.pt").write_bytes(b"")
    rc, err = _cli(capsys, out, "train.max_steps=8", "--resume", "auto")
    assert rc == 2
    assert "no checkpoint in" in _one_error_line(err) and "verifies (1 skipped" in err


def test_resume_path_names_the_reason(tmp_path):
    out = run_inprocess(tmp_path / "run", "train.max_steps=4")
    d = ckpt.checkpoint_path(out, 4)
    (d / "ema.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match=r"--resume .*: expected a complete checkpoint folder .*ema.safetensors: 8 bytes"):
        ckpt.resolve_resume(out, str(d))


def test_kill_during_pruning_leaves_trash_that_the_next_start_removes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = ckpt.shutil.rmtree

    def killed(path, *a, **k):
        if str(path).endswith(".trash"):
            # a kill -9 while deleting: some files gone, the folder still there
            for f in sorted(Path(path).iterdir())[:3]:
                f.unlink()
            raise KeyboardInterrupt("simulated kill during pruning")
        return real(path, *a, **k)

    run_inprocess(out, "train.max_steps=4", "train.checkpoint_every=2", "train.keep_last=1")
    monkeypatch.setattr(ckpt.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(out, "train.max_steps=6", "train.checkpoint_every=2", "train.keep_last=1", "--resume", "auto")
    monkeypatch.setattr(ckpt.shutil, "rmtree", real)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-00000004.trash", "checkpoint-00000006"]  # the half-deleted one is not a checkpoint
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [6]
    run_inprocess(out, "train.max_steps=8", "train.checkpoint_every=2", "train.keep_last=1", "--resume", "auto")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-00000008"]


def test_stale_tmp_and_trash_removed_at_start(tmp_path):
    out = tmp_path / "run"
    for name in ("checkpoint-00000002.tmp", "checkpoint-00000004.trash"):
        (out / "checkpoints" / name).mkdir(parents=True)
        (out / "checkpoints" / name / "state.pt").write_bytes(b"partial")
    run_inprocess(out, "train.max_steps=2")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-00000002"]


# ------------------------------------------------------------------------------------------------ non-finite tensors


def _reseal(d: Path) -> None:
    ckpt.write_manifest(d, int(d.name.split("-")[1]), 1)


@pytest.mark.parametrize("file,tensor", [("ema.safetensors", None), ("generator.safetensors", None),
                                         ("state.pt", "optimizers/generator/state")])
def test_non_finite_tensor_refused_at_load_naming_file_and_tensor(tmp_path, capsys, file, tensor):
    out = run_inprocess(tmp_path / "run", "train.max_steps=4")
    d = ckpt.checkpoint_path(out, 4)
    if file.endswith(".safetensors"):
        sd = load_file(d / file)
        tensor = sorted(sd)[0]
        sd[tensor] = sd[tensor].clone()
        sd[tensor].view(-1)[0] = float("nan")
        save_file(sd, d / file)
    else:
        state = torch.load(d / file, weights_only=True)
        key = sorted(state["optimizers"]["generator"]["state"])[0]
        state["optimizers"]["generator"]["state"][key]["exp_avg"].view(-1)[0] = float("inf")
        tensor = f"{tensor}/{key}/exp_avg"
        torch.save(state, d / file)
    _reseal(d)  # a checkpoint written with the bad value (its manifest verifies)
    msg = f"{d / file}: tensor {tensor} holds 1 non-finite value(s) (NaN/inf); refusing to resume from it"
    with pytest.raises(ValueError) as e:
        ckpt.read_checkpoint(d)
    assert str(e.value) == msg
    rc, err = _cli(capsys, out, "train.max_steps=6", "--resume", "auto")
    assert rc == 2 and _one_error_line(err) == f"error: {msg}"


# --------------------------------------------------------------------------------------------------------- the log


def _monitor(out, start):
    RunMonitor(out, True, start, 100, progress=False).close()


def test_log_resume_drops_later_entries_through_a_rename(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (2, 4, 6, 8)))
    calls = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append((Path(a).name, Path(b).name)) or real(a, b))
    _monitor(tmp_path, 4)
    assert calls == [("log.jsonl.tmp", "log.jsonl")]
    assert [r["step"] for r in log_records(tmp_path)] == [2, 4]
    # a kill before the rename leaves the old log whole
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (2, 4, 6)))
    before = log.read_bytes()

    def killed(a, b):
        raise KeyboardInterrupt("simulated kill before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _monitor(tmp_path, 2)
    assert log.read_bytes() == before


def test_torn_last_line_dropped_with_a_warning(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"step": 2}) + "\n" + json.dumps({"step": 4}) + "\n" + '{"step": 6, "loss_g": 0.1')
    _monitor(tmp_path, 4)
    assert f"warning: {log}: dropping a torn last line (25 bytes)" in capsys.readouterr().err
    assert log.read_text() == '{"step": 2}\n{"step": 4}\n'
    log.write_text('{"step": 2}\n{"ste\n{"step": 4}\n')  # damage in the middle is not a torn append
    with pytest.raises(ValueError, match=rf"{log}:2: not a JSON record"):
        _monitor(tmp_path, 4)


def test_cut_log_does_not_block_resume(straight, tmp_path, capsys):
    out = run_inprocess(tmp_path / "run", f"train.max_steps={N // 2}")
    log = out / "log.jsonl"
    log.write_bytes(log.read_bytes()[:-7])  # a kill -9 mid-append
    rc, err = _cli(capsys, out, f"train.max_steps={N}", "--resume", "auto")
    assert rc == 0 and f"warning: {log}: dropping a torn last line" in err
    assert [r["step"] for r in log_records(out)] == [2, 6, 8]  # entry 4 was the torn one
    assert_tree_equal(weights(out, N)[0], weights(straight, N)[0])


# ------------------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_then_exits_without_evaluation(tmp_path, sig):
    """MNIST evaluates after training by default: an interrupted run must not."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dmd2.recipes.mnist", "--preset", "tiny", "--out", str(out), "eval.enabled=true",
           "train.max_steps=100000", "train.checkpoint_every=100000", "train.log_every=1", "train.progress=false",
           "train.batch_size=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 300  # a hang guard, not a speed check
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    (s, _), = ckpt.list_checkpoints(out)
    assert s >= 2
    assert f"{signal.Signals(sig).name}: checkpoint written at iteration {s}; stopping (exit code {128 + sig})" in stdout + stderr
    assert not (out / "metrics.json").exists() and not (out / "samples_side_by_side.png").exists()


def test_trainer_reports_interruption(tmp_path):
    from dmd2.train import Trainer, resolve_config

    cfg = resolve_config(tiny.RECIPE, "tiny", BASE[2:] + ["train.max_steps=50", "train.sample_every=1"], out=str(tmp_path))
    tr = Trainer(cfg, tiny.build(cfg))
    sampled = []
    tr.samples = lambda: sampled.append(tr.step)
    real_step = tr.train_step

    def step():
        real_step()
        if tr.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    tr.train_step = step
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    last = tr.train()
    assert tr.interrupted == signal.SIGTERM and last == ckpt.checkpoint_path(tmp_path, 3)
    assert sampled == [1, 2]  # no sample grid after the signal
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # restored
    cfg = resolve_config(tiny.RECIPE, "tiny", BASE[2:] + ["train.max_steps=2"], out=str(tmp_path / "complete"))
    tr = Trainer(cfg, tiny.build(cfg))
    tr.train()
    assert tr.interrupted is None


# ------------------------------------------------------------------------------------------- user mistakes (item 9)


def test_config_change_at_resume_refused_unless_allowed(tmp_path, capsys):
    out = run_inprocess(tmp_path / "run", "train.max_steps=4")
    for change, shown in (("train.seed=7", "train.seed: 0 -> 7"), ("sampler.steps=3", "sampler.steps: 2 -> 3"),
                          ("train.ema_decay=0.5", "train.ema_decay: 0.9 -> 0.5")):
        rc, err = _cli(capsys, out, "train.max_steps=6", "--resume", "auto", change)
        assert rc == 2, err
        line = _one_error_line(err)
        assert shown in line and "--allow-config-change" in line and str(ckpt.checkpoint_path(out, 4)) in line
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [4]
    # free keys (length, intervals, where it runs) need no flag
    run_inprocess(out, "train.max_steps=6", "train.log_every=1", "train.checkpoint_every=3", "--resume", "auto")
    rc, err = _cli(capsys, out, "train.max_steps=8", "--resume", "auto", "train.ema_decay=0.5", "--allow-config-change")
    assert rc == 0
    assert "warning: config changed at resume (--allow-config-change): train.ema_decay: 0.9 -> 0.5" in err


def test_resume_across_recipes_or_widths(tmp_path, capsys):
    from dmd2.recipes import mnist

    out = run_inprocess(tmp_path / "run", "train.max_steps=2")
    rc, err = _cli(capsys, out, "train.max_steps=4", "--resume", "auto", "model.hidden=8")
    assert rc == 2 and "model.hidden: 16 -> 8" in _one_error_line(err)
    rc, err = _cli(capsys, out, "train.max_steps=4", "--resume", "auto", "model.hidden=8", "--allow-config-change")
    assert rc == 2
    line = _one_error_line(err)
    assert f"{ckpt.checkpoint_path(out, 2) / 'generator.safetensors'} does not fit this run's TinyDenoiser" in line
    rc = main(mnist.RECIPE, ["--preset", "tiny", "--out", str(out), "--resume", "auto", "train.max_steps=4"])
    err = capsys.readouterr().err
    assert rc == 2 and "resuming from" in _one_error_line(err) and "model" in err


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    from dmd2.recipes import mnist

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"garbage" * 100)
    cases = [
        (["teacher.path=" + str(tmp_path / "nope.safetensors")], f"expected the MNIST teacher's safetensors at {tmp_path / 'nope.safetensors'}"),
        (["teacher.path=" + str(garbage)], f"{garbage}: not a readable safetensors file"),
        (["objective.impl=bogus"], "DMD2Config: impl must be one of"),
    ] + ([(["train.device=cuda"], "train.device=cuda but no CUDA device is available")] if not torch.cuda.is_available() else [])
    for args, expected in cases:
        out = tmp_path / f"run{len(args[0])}"
        assert main(mnist.RECIPE, ["--preset", "tiny", "--out", str(out), *args]) == 2
        assert expected in _one_error_line(capsys.readouterr().err)
        assert not out.exists()  # nothing created


def test_disk_full_is_one_line_error_and_keeps_earlier_checkpoints(tmp_path):
    """RLIMIT_FSIZE makes writes past the limit fail (EFBIG), as a full disk does (ENOSPC), inside the checkpoint."""
    out = run_inprocess(tmp_path / "run", "train.max_steps=2")
    limit = max(p.stat().st_size for p in ckpt.checkpoint_path(out, 2).iterdir()) - 1

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "dmd2.recipes.tiny", *BASE, "--out", str(out), "train.max_steps=4",
                           "--resume", "auto"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=small_files)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert line.startswith(f"error: {ckpt.checkpoint_path(out, 4)}.tmp: could not write checkpoint 4 (")
    assert "MiB free on that disk; earlier checkpoints are untouched" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-00000002"]
    ckpt.verify_checkpoint(ckpt.checkpoint_path(out, 2))


# ------------------------------------------------------------------------------------------------------ file modes


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoint_files_get_the_normal_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = run_inprocess(tmp_path / "run", "train.max_steps=2")
    finally:
        os.umask(old)
    d = ckpt.checkpoint_path(out, 2)
    modes = {p.name: p.stat().st_mode & 0o777 for p in d.iterdir()}
    assert modes == {n: 0o666 & ~umask for n in modes} and "generator.safetensors" in modes
    assert (out / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask


# -------------------------------------------------------------------------------------------------- kill -9, 10 times


@pytest.mark.slow
def test_random_kill9_then_resume_is_bit_identical(tmp_path):
    """A run checkpointing every iteration (and pruning to 2) is killed with SIGKILL at 10 random moments after it
    made progress; ``--resume auto`` each time, then to the end: weights and logged losses equal an uninterrupted run."""
    steps = 100  # room for 10 kills however fast the iterations run (each attempt makes at most ~0.05 s of progress)
    args = [*BASE, f"train.max_steps={steps}", "train.checkpoint_every=1", "train.keep_last=2", "train.log_every=1"]
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "dmd2.recipes.tiny", *args, "--out", str(ref)], cwd=ROOT, env=ENV,
                   check=True, capture_output=True, timeout=300)
    out = tmp_path / "run"
    rng = random.Random(0)
    kills = 0
    while kills < 10:
        before = ckpt.list_checkpoints(out)[-1][0] if ckpt.list_checkpoints(out) else 0
        if before == steps:
            break
        proc = subprocess.Popen([sys.executable, "-m", "dmd2.recipes.tiny", *args, "--out", str(out), "--resume", "auto"],
                                cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120  # a hang guard
        while time.time() < deadline and proc.poll() is None:
            found = ckpt.list_checkpoints(out)
            if found and found[-1][0] > before:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.05))  # inside the next iteration or its checkpoint write
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read()[-3000:]
    assert kills == 10
    subprocess.run([sys.executable, "-m", "dmd2.recipes.tiny", *args, "--out", str(out), "--resume", "auto"], cwd=ROOT,
                   env=ENV, check=True, capture_output=True, timeout=300)
    assert_tree_equal(weights(out, steps)[0], weights(ref, steps)[0])
    assert_tree_equal(weights(out, steps)[1]["optimizers"], weights(ref, steps)[1]["optimizers"])
    assert losses(log_records(out)) == losses(log_records(ref))
    assert [r["step"] for r in log_records(out)] == list(range(1, steps + 1))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"checkpoint-{steps - 1:08d}", f"checkpoint-{steps:08d}"]
