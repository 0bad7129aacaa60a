"""Sharded checkpoints (train.checkpoint_format=sharded, torch.distributed.checkpoint):

* one process: a sharded run resumes bit-exactly, and its consolidated checkpoint equals a ``full`` run's files;
* torchrun (gloo, CPU; slow): a checkpoint written by 2 FSDP2 ranks resumes on 1 process and on 3 ranks and
  continues the straight run (the tolerance of the DDP/FSDP2 equality tests), for the tiny ImageNet-64 and the tiny
  SDXL presets; the SDXL export of a sharded checkpoint equals the export of the same run's ``full`` checkpoint.

A run's global batch is ``ranks x grad_accum`` shards of ``batch_size`` keyed by the global shard index (see
:mod:`dmd2.train.randomness`), so 2 ranks x 3, 3 ranks x 2 and 1 process x 6 are the same run.
"""
import shutil

import pytest
import torch

from dmd2.train import checkpoint as ckpt
from dmd2.train.sharded import SHARDED_DIR, is_sharded

from train_helpers import ROOT, assert_tree_equal, log_records, losses, run_inprocess, torchrun, weights

ATOL = 1e-5  # as tests/train/test_train_distributed.py


def test_sharded_format_single_process_resumes_exactly_and_reads_like_full(tmp_path):
    full = run_inprocess(tmp_path / "full", "train.max_steps=4", "train.checkpoint_every=2", "train.checkpoint_format=full")
    half = run_inprocess(tmp_path / "sharded", "train.max_steps=2", "train.checkpoint_every=2",
                         "train.checkpoint_format=sharded")
    ck = ckpt.checkpoint_path(half, 2)
    assert is_sharded(ck) and not list(ck.glob("*.safetensors"))
    assert ckpt.resolve_resume(half, "auto") == ck
    # consolidated on one process: the same weights, optimizer moments and run state as the full format's files
    w_f, s_f = weights(full, 2)
    w_s, s_s = weights(half, 2)
    assert_tree_equal(w_f, w_s)
    assert_tree_equal(s_f, s_s)
    run_inprocess(half, "train.max_steps=4", "train.checkpoint_every=2", "train.checkpoint_format=sharded",
                  "--resume", "auto")
    assert_tree_equal(weights(full, 4), weights(half, 4))
    assert losses(log_records(half)) == losses(log_records(full))


def test_manifest_covers_the_shard_files(tmp_path):
    import json

    out = run_inprocess(tmp_path / "run", "train.max_steps=2", "train.checkpoint_every=2", "train.checkpoint_format=sharded")
    ck = ckpt.checkpoint_path(out, 2)
    listed = json.loads((ck / ckpt.MANIFEST).read_text())["files"]
    assert {"state.pt", "config.json", f"{SHARDED_DIR}/.metadata", f"{SHARDED_DIR}/__0_0.distcp"} == set(listed)
    ckpt.verify_checkpoint(ck)
    shard = ck / SHARDED_DIR / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        ckpt.verify_checkpoint(ck)
    assert ckpt.latest_checkpoint(out, report=lambda m: None) is None
    shard.unlink()
    with pytest.raises(ValueError, match="missing"):
        ckpt.verify_checkpoint(ck, checksums=False)
    (ck / SHARDED_DIR / "__1_0.distcp").write_bytes(b"x")
    with pytest.raises(ValueError, match="not listed"):
        ckpt.verify_checkpoint(ck, checksums=False)


def test_sharded_load_names_what_the_checkpoint_lacks(tmp_path, capsys):
    from dmd2.recipes.tiny import RECIPE
    from dmd2.train import main

    from train_helpers import BASE

    no_gan = ["objective.gan_generator_weight=0", "objective.gan_discriminator_weight=0"]
    out = run_inprocess(tmp_path / "run", "train.max_steps=2", "train.checkpoint_every=2",
                        "train.checkpoint_format=sharded", *no_gan)
    # a run with a GAN head resumed from a checkpoint without one
    rc = main(RECIPE, [*BASE, "--out", str(tmp_path / "run2"), "train.max_steps=4", "train.checkpoint_format=sharded",
                       "--resume", str(ckpt.checkpoint_path(out, 2)), "--allow-config-change"])
    err = capsys.readouterr().err
    assert rc == 2 and "sharded checkpoint lacks" in err and "model/gan_head/" in err, err


def test_checkpoint_format_is_validated():
    from dmd2.train import TrainConfig

    with pytest.raises(ValueError, match="checkpoint_format must be one of"):
        TrainConfig(checkpoint_format="dcp")


def _recipe_torchrun(module, out, *overrides, nproc):
    """``torchrun`` of ``python -m dmd2.recipes.<module> --preset tiny`` (train_helpers.torchrun runs the tiny recipe)."""
    import os
    import subprocess
    import sys

    net = {"GLOO_SOCKET_IFNAME": "lo"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1", **net}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
           f"dmd2.recipes.{module}", "--preset", "tiny", "--out", str(out), "train.progress=false",
           "train.sample_every=0", "train.keep_last=0", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


# (recipe module, common overrides, iterations, checkpoint interval). fp32 (the SDXL preset's bf16 autocast and
# FSDP2's bf16 parameters round differently); SDXL at lr 1e-4: AdamW's first steps turn the reduction-order
# round-off of near-zero gradients into ~4% of one update
PRESETS = {
    "imagenet64": (["train.batch_size=2", "train.lr_generator=1e-3", "train.lr_critic=1e-3", "train.max_steps=4",
                    "train.checkpoint_every=2", "critic.ratio=2"], 4, 2),
    "sdxl": (["train.batch_size=1", "train.mixed_precision=no", "train.grad_checkpointing=false", "train.lr_generator=1e-4", "train.lr_critic=1e-4",
              "train.max_steps=2", "train.checkpoint_every=1", "critic.ratio=1"], 2, 1),
}


@pytest.fixture(scope="module", params=list(PRESETS))
def straight(request, tmp_path_factory):
    """A 2-rank FSDP2 run (3 micro-batches per rank) of the preset, checkpointing (sharded, the FSDP2 default)
    halfway and at the end."""
    name = request.param
    common, n, half = PRESETS[name]
    out = tmp_path_factory.mktemp(name) / "straight"
    _recipe_torchrun(name, out, *common, "train.distributed=fsdp2", "train.grad_accum=3", nproc=2)
    return name, out, n, half


def _resume(name, straight_out, tmp, *overrides, nproc):
    common, n, half = PRESETS[name]
    out = tmp / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt.checkpoint_path(straight_out, half), ckpt.checkpoint_path(out, half))
    if name == "sdxl":  # the tiny SDXL files the run was built from (written by the straight run)
        for d in ("tiny-base", "tiny-data"):
            shutil.copytree(straight_out / d, out / d)
    proc = _recipe_torchrun(name, out, *common, *overrides, "--resume", "auto", nproc=nproc)
    assert f"checkpoint-{half:08d} at iteration {half}" in proc.stdout + proc.stderr
    return out


def _assert_continues(straight_out, resumed, n, half):
    w_a, _ = weights(straight_out, n)
    w_b, _ = weights(resumed, n)
    assert_tree_equal(w_a, w_b, atol=ATOL)
    # the networks moved between the checkpoint and the end (the comparison is not of two copies of the checkpoint)
    g_h = weights(straight_out, half)[0]["generator"]
    assert max((w_a["generator"][k] - g_h[k]).abs().max().item() for k in g_h) > 10 * ATOL
    la, lb = losses(log_records(straight_out)), losses(log_records(resumed))
    assert [r["step"] for r in lb] == [r["step"] for r in la if r["step"] > half]
    for x, y in zip([r for r in la if r["step"] > half], lb):
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=ATOL, abs=ATOL), (x["step"], k)


@pytest.mark.slow
def test_two_rank_sharded_checkpoint_resumes_on_one_process(straight, tmp_path):
    name, out, n, half = straight
    ck = ckpt.checkpoint_path(out, half)
    # written by both ranks, nothing gathered: two shard files, no .safetensors
    assert sorted(p.name for p in (ck / SHARDED_DIR).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(ck.glob("*.safetensors")) and weights(out, half)[1]["world_size"] == 2
    resumed = _resume(name, out, tmp_path, "train.distributed=none", "train.grad_accum=6", nproc=1)
    assert not is_sharded(ckpt.checkpoint_path(resumed, n))  # one process: `auto` writes the full format
    _assert_continues(out, resumed, n, half)
    if name == "sdxl":
        _assert_same_export(out, resumed, n, tmp_path)


@pytest.mark.slow
def test_two_rank_sharded_checkpoint_resumes_on_three_ranks(straight, tmp_path):
    name, out, n, half = straight
    resumed = _resume(name, out, tmp_path, "train.distributed=fsdp2", "train.grad_accum=2", nproc=3)
    assert len(list((ckpt.checkpoint_path(resumed, n) / SHARDED_DIR).glob("*.distcp"))) == 3
    _assert_continues(out, resumed, n, half)


def _assert_same_export(sharded_run, full_run, n, tmp_path):
    """The exported pipeline's UNet (the generator's weights) from the straight run's sharded checkpoint == from the
    resumed run's full one."""
    from safetensors.torch import load_file

    from dmd2.recipes.sdxl import RECIPE
    from dmd2.train import main

    unets = []
    for run, tag in ((sharded_run, "sharded"), (full_run, "full")):
        dest = tmp_path / f"export-{tag}"
        assert main(RECIPE, ["export", str(ckpt.checkpoint_path(run, n)), str(dest), "export.weights=generator"]) == 0
        unets.append(load_file(str(dest / "unet" / "diffusion_pytorch_model.safetensors")))
    assert_tree_equal(unets[0], unets[1], atol=ATOL)
    # and the export carries the trained generator, not the teacher it started from
    base = load_file(str(sharded_run / "tiny-base" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max((unets[0][k].float() - base[k].float()).abs().max().item() for k in base) > 10 * ATOL
