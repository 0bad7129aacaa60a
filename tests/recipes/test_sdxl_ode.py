"""The 1-step SDXL warm start (tiny, CPU, no download): the teacher's ODE sampler against diffusers' Euler pipeline,
ode-pairs (layout, keyed pairs, sharding over ranks, resume), ode-pretrain (the LPIPS regression falls, exact resume),
model.generator_init, and LPIPS without downloads."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dmd2.recipes.sdxl import RECIPE, build
from dmd2.recipes.sdxl_ode import ODEPairs, build_lpips, shard_path, write_pairs
from dmd2.train import main, resolve_config
from dmd2.train.distributed import DistInfo


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ode") / "pairs"
    assert main(RECIPE, ["ode-pairs", str(out), "--preset", "ode-tiny"]) == 0
    return out


@pytest.fixture(scope="module")
def warm(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ode") / "warm"
    assert main(RECIPE, ["ode-pretrain", str(pairs), "--preset", "ode-tiny", "--out", str(out)]) == 0
    return out


def _teacher(base):
    from dmd2.core import CFGDenoiser
    from dmd2.models.sdxl import PromptEncoder, SDXLDenoiser, load_sdxl

    parts = load_sdxl(base, local_files_only=True)
    enc = PromptEncoder(parts.tokenizer, parts.text_encoder, parts.tokenizer_2, parts.text_encoder_2)
    teacher = CFGDenoiser(SDXLDenoiser(parts.unet, parts.schedule, gan_layer=None), 8.0, enc.uncond(32, 32, "zeros"))
    return parts, enc, teacher


# ------------------------------------------------------------------------------------------------ the sampler
def test_trailing_timesteps_are_diffusers_trailing_grid():
    from diffusers import EulerDiscreteScheduler

    from dmd2.eval.samplers import trailing_timesteps

    s = EulerDiscreteScheduler(timestep_spacing="trailing")
    for n in (50, 7, 4, 3, 1):
        s.set_timesteps(n)
        assert [int(v) for v in s.timesteps] == trailing_timesteps(n)
    assert trailing_timesteps(50)[:3] == [999, 979, 959] and trailing_timesteps(50)[-1] == 19
    with pytest.raises(ValueError, match="num_steps"):
        trailing_timesteps(0)


def test_ddim_is_the_official_pairs_sampler(sdxl_tiny_base):
    """ddim from sigma(999) z == StableDiffusionXLPipeline + EulerDiscreteScheduler(trailing), CFG 8, zero negatives,
    latents=z, output_type="latent" (how the official pairs were made), to float32 rounding."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from dmd2.eval.samplers import ddim, euler_trailing_start, trailing_timesteps

    parts, enc, teacher = _teacher(sdxl_tiny_base)
    sched = EulerDiscreteScheduler.from_pretrained(sdxl_tiny_base, subfolder="scheduler", timestep_spacing="trailing")
    pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
                                     tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet,
                                     scheduler=sched, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    cond = enc.cond(["a red cube", "the cat"], 32, 32)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    theirs = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["text_embeds"],
                  negative_prompt_embeds=torch.zeros_like(cond["encoder_hidden_states"]),
                  negative_pooled_prompt_embeds=torch.zeros_like(cond["text_embeds"]), latents=z.clone(),
                  num_inference_steps=5, guidance_scale=8.0, height=32, width=32, output_type="latent").images
    steps = trailing_timesteps(5)
    ours = ddim(teacher, euler_trailing_start(z, parts.schedule, steps[0]), cond, parts.schedule, steps)
    scale = float(theirs.abs().max())  # ~60 on the random tiny UNet (x0 = ... / alpha(999), alpha ~ 0.068)
    assert (ours - theirs).abs().max() <= 1e-5 * scale
    # the pipeline's start (init_noise_sigma = sigma_max, not sqrt(sigma_max^2 + 1)) matters at this precision
    assert (ddim(teacher, z, cond, parts.schedule, steps) - theirs).abs().max() > 1e-3 * scale


# ------------------------------------------------------------------------------------------------ ode-pairs
def test_ode_pairs_layout_and_each_latent_is_the_teachers_ode_solution(pairs):
    from dmd2.eval.samplers import ddim, euler_trailing_start

    info = json.loads((pairs / "pairs.json").read_text())
    assert info["timesteps"] == [999, 749, 499, 249] and info["guidance_scale"] == 8.0 and info["shard_size"] == 3
    s0, s1 = load_file(str(shard_path(pairs, 0))), load_file(str(shard_path(pairs, 1)))
    assert s0["noise"].shape == (3, 4, 16, 16) and s1["latent"].shape == (1, 4, 16, 16)
    assert s0["prompt_index"].dtype == torch.int64 and not (pairs / "shard-00002.safetensors").exists()
    data = ODEPairs(pairs, 4)
    words = (pairs / "tiny-data" / "prompts.txt").read_text().splitlines()
    assert len(data) == 4 and data.prompts == [words[i] for i in torch.cat([s0["prompt_index"], s1["prompt_index"]])]
    assert len(set(data.prompts)) == 4  # a permutation of the prompt file: no repeats below its length
    noise = torch.stack([data[i][0] for i in range(4)])
    latent = torch.stack([data[i][1] for i in range(4)])
    assert abs(float(noise.std()) - 1.0) < 0.1
    # recomputed in ONE batch of 4 (the command used batches of 2 + 1, 1): the pairs do not depend on batching
    parts, enc, teacher = _teacher(pairs / "tiny-base")
    steps = info["timesteps"]
    want = ddim(teacher, euler_trailing_start(noise, parts.schedule, steps[0]), enc.cond(data.prompts, 32, 32),
                parts.schedule, steps)
    torch.testing.assert_close(latent, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert (latent - noise).abs().max() > 1.0


def test_ode_pairs_shard_over_ranks_and_do_not_depend_on_them(pairs, tmp_path):
    out = tmp_path / "pairs"
    cfg = resolve_config(RECIPE, "ode-tiny", ["ode.batch=1"], out=str(out))
    write_pairs(cfg, out, DistInfo(rank=0, world_size=2))  # rank 0 of 2: shard 0 only
    assert shard_path(out, 0).is_file() and not shard_path(out, 1).exists()
    write_pairs(cfg, out, DistInfo(rank=1, world_size=2))
    for s in (0, 1):
        a, b = load_file(str(shard_path(out, s))), load_file(str(shard_path(pairs, s)))
        assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["prompt_index"], b["prompt_index"])
        torch.testing.assert_close(a["latent"], b["latent"], rtol=1e-5, atol=1e-3)


@pytest.mark.slow
def test_ode_pairs_under_torchrun_split_the_shards(pairs, tmp_path):
    """Two gloo ranks: rank r writes shards r, r + 2, ...; the pairs equal the single-process ones."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "GLOO_SOCKET_IFNAME": "lo"}
    out = tmp_path / "pairs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "dmd2.recipes.sdxl", "ode-pairs", str(out), "--preset", "ode-tiny", "train.distributed=ddp"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 0: shard-00000" in proc.stderr and "rank 1: shard-00001" in proc.stderr
    for s in (0, 1):
        a, b = load_file(str(shard_path(out, s))), load_file(str(shard_path(pairs, s)))
        assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["prompt_index"], b["prompt_index"])
        torch.testing.assert_close(a["latent"], b["latent"], rtol=1e-5, atol=1e-3)


def test_ode_pairs_resume_skips_written_shards(pairs, tmp_path, capsys):
    out = tmp_path / "pairs"
    shutil.copytree(pairs, out)
    first = os.stat(shard_path(out, 0))
    shard_path(out, 1).unlink()
    with pytest.raises(ValueError, match="shard-00001"):
        ODEPairs(out, 4)
    assert main(RECIPE, ["ode-pairs", str(out), "--preset", "ode-tiny"]) == 0
    again = os.stat(shard_path(out, 0))
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not rewritten
    new, old = load_file(str(shard_path(out, 1))), load_file(str(shard_path(pairs, 1)))
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)  # the same pair, bit for bit
    # more pairs: the partial last shard is completed, its first pair unchanged
    assert main(RECIPE, ["ode-pairs", str(out), "--preset", "ode-tiny", "--num", "5"]) == 0
    s1, old = load_file(str(shard_path(out, 1))), load_file(str(shard_path(pairs, 1)))
    assert s1["noise"].shape[0] == 2 and torch.equal(s1["noise"][:1], old["noise"])
    assert os.stat(shard_path(out, 0)).st_mtime_ns == first.st_mtime_ns
    assert len(ODEPairs(out, 5)) == 5 and len(ODEPairs(out, 2)) == 2
    with pytest.raises(ValueError, match="ode.num=6"):
        ODEPairs(out, 6)
    capsys.readouterr()
    assert main(RECIPE, ["ode-pairs", str(out), "--preset", "ode-tiny", "model.guidance_scale=5"]) == 2
    assert "guidance_scale: 8.0 there, 5.0 now" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ ode-pretrain
def test_ode_pretrain_loss_falls_and_writes_a_generator_checkpoint(warm):
    logs = [json.loads(line) for line in (warm / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(1, 11))
    loss = [r["loss_lpips"] for r in logs]
    # 4 pairs = one global batch: step 1 logs the loss before any update, step 10 after 9 (measured 0.36x)
    assert loss[-1] < 0.8 * loss[0]
    ck = warm / "checkpoints" / "checkpoint-00000010"
    gen = load_file(str(ck / "generator.safetensors"))
    assert gen and all(k.startswith("unet_module.") for k in gen)
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["sampler"]["steps"] == 1 and cfg["train"]["lr_generator"] == 1e-3


def test_ode_pretrain_resumes_exactly(warm, pairs, tmp_path):
    out = tmp_path / "resumed"
    ck5 = warm / "checkpoints" / "checkpoint-00000005"
    assert main(RECIPE, ["ode-pretrain", str(pairs), "--preset", "ode-tiny", "--out", str(out), "--resume", str(ck5)]) == 0
    a = load_file(str(out / "checkpoints" / "checkpoint-00000010" / "generator.safetensors"))
    b = load_file(str(warm / "checkpoints" / "checkpoint-00000010" / "generator.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    full = {json.loads(line)["step"]: json.loads(line) for line in (warm / "log.jsonl").read_text().splitlines()}
    assert [r["step"] for r in logs] == list(range(6, 11))
    assert all(r["loss_lpips"] == full[r["step"]]["loss_lpips"] for r in logs)


def test_ode_pretrain_needs_the_one_step_grid(pairs, tmp_path, capsys):
    assert main(RECIPE, ["ode-pretrain", str(pairs), "--preset", "ode-tiny", "--steps", "4", "--out", str(tmp_path)]) == 2
    assert "--steps 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ generator_init
def test_generator_init_loads_the_warm_start(warm, tmp_path):
    c = build(resolve_config(RECIPE, "tiny", [f"model.generator_init={warm}"], out=str(tmp_path), steps=1))
    want = load_file(str(warm / "checkpoints" / "checkpoint-00000010" / "generator.safetensors"))
    got = c.generator.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    fake = c.fake_score.state_dict()  # still the teacher's weights: the warm start moved the generator away
    assert any(not torch.equal(got[k], fake[k]) for k in want)
    assert c.sampler.timesteps == [399]


def test_generator_init_errors(warm, tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert main(RECIPE, ["--preset", "tiny", "--out", str(tmp_path / "a"), f"model.generator_init={missing}"]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert str(missing) in err and "does not exist" in err
    assert not (tmp_path / "a" / "tiny-base").exists()  # refused before any model is written or loaded
    assert main(RECIPE, ["--preset", "tiny", "--out", str(tmp_path / "a"), f"model.generator_init={warm}",
                         "model.memory_mode=lora"]) == 2
    assert "model.memory_mode=full" in capsys.readouterr().err
    assert main(RECIPE, ["--preset", "tiny", "--out", str(tmp_path / "a"), f"model.generator_init={tmp_path}"]) == 2
    assert "neither a complete checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ LPIPS, presets
def test_lpips_never_downloads_and_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ValueError) as e:
        build_lpips("vgg", pretrained=True)
    msg = str(e.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth") in msg and "\n" not in msg
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in msg
    assert not (tmp_path / "torch").exists()


def test_lpips_loads_a_local_trunk(tmp_path):
    import lpips
    import torchvision

    trunk = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path / "alex.pth"
    torch.save(trunk, path)
    model = build_lpips("alex", pretrained=True, backbone=str(path))
    for name, v in model.net.state_dict().items():  # net.sliceK.<i>.w == torchvision features.<i>.w
        assert torch.equal(v, trunk["features." + name.split(".", 1)[1]])
    calibrated = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth"),
                            map_location="cpu", weights_only=True)
    assert torch.equal(model.lin0.model[1].weight, calibrated["lin0.model.1.weight"])
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(model(x, x).abs().max()) == 0.0 and bool((model(x, x.flip(0)) > 0).all())


def test_ode_presets(capsys):
    cfg = resolve_config(RECIPE, "ode-paper")
    t = cfg.train
    assert (t.lr_generator, t.max_steps, t.batch_size, t.warmup_steps, t.grad_clip) == (1e-5, 2000, 4, 500, 10.0)
    assert t.mixed_precision == "bf16" and t.distributed == "ddp" and t.ema_decay is None
    assert (cfg.ode.num, cfg.ode.teacher_steps, cfg.ode.vae, cfg.ode.lpips_net) == (10000, 50, "madebyollin/taesdxl", "vgg")
    assert cfg.model.guidance_scale == 8.0 and cfg.model.resolution == 1024 and cfg.model.uncond == "zeros"
    from dmd2.recipes.sdxl import grid

    assert cfg.sampler.grid(grid) == [399]
    assert main(RECIPE, ["ode-pairs", "--preset", "ode-tiny", "--num", "7", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["ode"]["num"] == 7
    assert main(RECIPE, ["--dry-run", "ode.num=0"]) == 2
    assert "ode.num" in capsys.readouterr().err
