"""The SDXL recipe: presets, the tiny preset for every memory mode, the diffusers export round trip, the memory plan."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dmd2.core import BackwardSimulationSampler
from dmd2.models.sdxl import PromptEncoder, SDXLDenoiser, load_sdxl
from dmd2.recipes.sdxl import RECIPE, grid
from dmd2.train import main, resolve_config

MODES = ["full", "lora", "shared-base"]


def test_paper_preset_values():
    cfg = resolve_config(RECIPE, "paper")
    assert (cfg.train.lr_generator, cfg.train.lr_critic, cfg.train.batch_size) == (5e-7, 5e-7, 2)
    assert cfg.critic.ratio == 5 and cfg.model.guidance_scale == 8.0 and cfg.model.resolution == 1024
    assert (cfg.objective.gan_generator_weight, cfg.objective.gan_discriminator_weight) == (5e-3, 1e-2)
    assert cfg.train.mixed_precision == "bf16" and cfg.train.grad_checkpointing
    assert cfg.sampler.grid(grid) == [999, 749, 499, 249]
    assert resolve_config(RECIPE, "paper", steps=1).sampler.grid(grid) == [399]
    assert resolve_config(RECIPE, "paper-lora").train.lr_generator == 5e-5
    assert resolve_config(RECIPE, "single-gpu").model.memory_mode == "shared-base"
    assert RECIPE.config.sampler.grid(grid) == [999, 749, 499, 249]  # `python -m dmd2.recipes.sdxl --steps 4`


def test_grid_matches_lcm_scheduler_default_spacing():
    from diffusers import LCMScheduler

    for n in (2, 3, 4, 8):
        s = LCMScheduler(original_inference_steps=n)
        s.set_timesteps(n)
        assert s.timesteps.tolist() == grid(n)
    assert grid(1) == [399]


def test_dry_run_and_bad_mode(capsys):
    assert main(RECIPE, ["--preset", "tiny", "--dry-run", "model.memory_mode=lora"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"]["memory_mode"] == "lora" and cfg["model"]["tiny"] is True
    assert main(RECIPE, ["--dry-run", "model.memory_mode=half"]) == 2
    assert "memory_mode" in capsys.readouterr().err


@pytest.mark.parametrize("mode", MODES)
def test_tiny_preset_trains_each_memory_mode(sdxl_tiny_runs, mode):
    out = sdxl_tiny_runs(mode)
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [2, 4]
    for r in logs:
        for k in ("loss_dm", "loss_fake", "loss_gan_d", "loss_gan_g", "grad_norm_generator", "grad_norm_critic"):
            assert math.isfinite(r[k]), (k, r)
        assert r["grad_norm_generator"] > 0 and r["grad_norm_critic"] > 0
    assert (out / "samples" / "step-00000004.png").is_file()
    ck = out / "checkpoints" / "checkpoint-00000004"
    gen = load_file(str(ck / "generator.safetensors"))
    fake = load_file(str(ck / "fake_score.safetensors"))
    if mode == "full":
        assert all(k.startswith("unet_module.") for k in gen) and all(k.startswith("unet_module.") for k in fake)
    elif mode == "lora":  # LoRA generator (adapter only), full fake score
        assert all(k.startswith("adapter_params.") and ".generator." in k.replace("~", ".") for k in gen)
        assert all(k.startswith("unet_module.") for k in fake)
    else:
        assert all(".generator." in k.replace("~", ".") for k in gen)
        assert all(".fake_score." in k.replace("~", ".") for k in fake)
    # the generator moved away from its initialisation (the teacher)
    moved = [v for k, v in gen.items() if ".lora_B." in k.replace("~", ".")] if mode != "full" else []
    assert mode == "full" or any(v.abs().max() > 0 for v in moved)


def _ours_and_pipeline(pipe, G, schedule, timesteps, encoder, seed=7, lora_dir=None):
    cond = encoder.cond(["a red cube", "the cat"], 32, 32)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    sampler = BackwardSimulationSampler(schedule, timesteps)
    with torch.no_grad():
        ours = sampler.sample(G, z, cond, generator=torch.Generator().manual_seed(seed))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["text_embeds"], latents=z.clone(),
                  timesteps=timesteps, guidance_scale=0.0, height=32, width=32,
                  generator=torch.Generator().manual_seed(seed), output_type="latent").images
    return ours, theirs


@pytest.mark.parametrize("timesteps", [[399], [999, 749, 499, 249]])
def test_student_scheduler_reproduces_the_sampler_exactly(sdxl_tiny_base, timesteps):
    """Scheduler + per-step noise: diffusers' pipeline with our LCMScheduler settings runs our sampler's steps."""
    from diffusers import StableDiffusionXLPipeline

    from dmd2.recipes.sdxl_export import student_scheduler

    parts = load_sdxl(sdxl_tiny_base, local_files_only=True)
    pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
                                     tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet,
                                     scheduler=student_scheduler(parts.schedule, timesteps), add_watermarker=False)
    enc = PromptEncoder(parts.tokenizer, parts.text_encoder, parts.tokenizer_2, parts.text_encoder_2)
    G = SDXLDenoiser(parts.unet, parts.schedule, gan_layer=None)
    ours, theirs = _ours_and_pipeline(pipe, G, parts.schedule, timesteps, enc)
    assert (ours - theirs).abs().max() <= 1e-5
    if len(timesteps) > 1:  # a different noise seed changes the result: the noise really is shared
        other, _ = _ours_and_pipeline(pipe, G, parts.schedule, timesteps, enc, seed=8)
        assert (other - theirs).abs().max() > 1e-2


@pytest.mark.parametrize("mode,fmt", [("full", "fused"), ("lora", "lora"), ("shared-base", "fused"), ("shared-base", "lora")])
def test_export_round_trip(sdxl_tiny_runs, tmp_path, mode, fmt):
    from diffusers import StableDiffusionXLPipeline

    from dmd2.recipes.sdxl import load_student_unet

    run = sdxl_tiny_runs(mode)
    out = tmp_path / "pipe"
    assert main(RECIPE, ["export", str(run), str(out), f"export.lora_format={fmt}"]) == 0
    info = json.loads((out / "dmd2.json").read_text())
    assert info["timesteps"] == [999, 499] and info["weights"] == "ema"
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert pipe.scheduler.config.original_inference_steps == 2
    if fmt == "lora" and mode != "full":
        assert (out / "pytorch_lora_weights.safetensors").is_file()
        pipe.load_lora_weights(out)
    unet, cfg, parts, which = load_student_unet(run, "ema", fuse=False)
    assert which == "ema"
    G = SDXLDenoiser(unet, parts.schedule, adapter=None if mode == "full" else "generator", gan_layer=None)
    enc = PromptEncoder(parts.tokenizer, parts.text_encoder, parts.tokenizer_2, parts.text_encoder_2)
    ours, theirs = _ours_and_pipeline(pipe, G, parts.schedule, info["timesteps"], enc)
    # our sampler on the exported UNet == diffusers: scheduler and noise reproduce the steps exactly
    G_exported = SDXLDenoiser(pipe.unet, parts.schedule, gan_layer=None)  # a loaded LoRA is active in pipe.unet
    exported, _ = _ours_and_pipeline(pipe, G_exported, parts.schedule, info["timesteps"], enc)
    assert (exported - theirs).abs().max() <= 1e-5
    # vs the trained structure: bit-exact for full weights; for LoRA, float32 rounding (differently laid-out matmuls,
    # fused weights) amplified by 1/alpha(999) ~ 15 on the random tiny UNet's |x0| ~ 60
    scale = max(1.0, float(ours.abs().max()))
    assert (ours - theirs).abs().max() <= (1e-5 if mode == "full" else 1e-6 * scale)
    # and the export used the EMA weights, not the raw generator's
    raw, _, _, _ = load_student_unet(run, "generator", fuse=False)
    assert any(not torch.equal(a, b) for a, b in zip(raw.parameters(), unet.parameters()))


def test_export_errors(tmp_path):
    assert main(RECIPE, ["export", str(tmp_path), str(tmp_path / "o")]) == 2
    assert main(RECIPE, ["export", str(tmp_path)]) == 2


def test_memory_plan_sdxl():
    from dmd2.recipes.sdxl_memory import memory_plan, memory_table

    plan = memory_plan(resolve_config(RECIPE, "paper").gan, batch=2, resolution=1024, lora_rank=64)
    assert plan["unet_params"] == 2_567_463_684 and plan["gan_head_params"] == 104_874_241  # the official head
    m = plan["modes"]
    n, lora = plan["unet_params"], plan["lora_params"]
    assert m["full"]["weights"] == 2 * n + 4 * (2 * n + plan["gan_head_params"])
    assert m["full"]["adam"] == 8 * (2 * n + plan["gan_head_params"])
    assert m["shared-base"]["weights"] == 2 * n + 4 * (2 * lora + plan["gan_head_params"])
    assert m["shared-base"]["total_checkpointed"] < m["lora"]["total_checkpointed"] < m["full"]["total_checkpointed"]
    a = plan["activations_per_forward"]
    # at least the UNet's input/output-resolution feature maps: 2 x 320 x 128 x 128 bf16 per saved map, many of them
    assert a["full"] > 50 * 2 * 320 * 128 * 128 * 2
    assert 0 < a["checkpointed"] < a["full"] / 4
    assert "| `shared-base` |" in memory_table(plan)
    # host RAM per rank, `full` under FSDP2 at 64 ranks: rank 0 reads three fp32 UNets + fp32 text encoders and VAE,
    # the others only the text encoders and VAE; a sharded checkpoint costs each rank 1/64 of fp32 weights + AdamW
    h, extras, trained = m["full"]["host"], 4 * (plan["text_encoder_params"] + plan["vae_params"]), 2 * n + plan["gan_head_params"]
    assert h["world"] == 64 and h["load_rank0"] == 12 * n + extras and h["load_other_ranks"] == extras
    assert h["checkpoint_sharded"] == h["resume_sharded"] == 12 * trained // 64
    assert h["checkpoint_full_rank0"] == 12 * trained + 4 * (n + plan["gan_head_params"]) and h["resume_full"] == 12 * trained
    assert 62e9 < h["resume_full"] < 64e9 and 0.9e9 < h["checkpoint_sharded"] < 1e9  # the issue's ~62 GB per save
    assert m["shared-base"]["host"]["load_other_ranks"] == m["shared-base"]["host"]["load_rank0"]  # one process
    assert "host/rank at load" in memory_table(plan)


def test_lora_param_count_matches_peft(sdxl_tiny_base):
    import copy

    from dmd2.models.sdxl import add_lora
    from dmd2.recipes.sdxl_memory import lora_param_count

    unet = load_sdxl(sdxl_tiny_base, local_files_only=True, components=("unet",)).unet
    expected = lora_param_count(unet, 4)
    u = copy.deepcopy(unet)
    names = add_lora(u, "x", rank=4)
    params = dict(u.named_parameters())
    assert sum(params[k].numel() for k in names) == expected


def test_memory_command_takes_json_as_a_switch(capsys):
    """``sdxl memory --json`` prints the plan as JSON (the shared parser passes the command's own switches on); any
    other option is refused with one line naming it."""
    import json

    from dmd2.recipes.sdxl import RECIPE
    from dmd2.train import main

    assert main(RECIPE, ["memory", "--json", "train.batch_size=1"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan and isinstance(plan, (dict, list))
    assert main(RECIPE, ["memory", "--jsn"]) == 2
    assert "unknown option(s) ['--jsn']" in capsys.readouterr().err
    assert main(RECIPE, ["export", "--json"]) == 2  # a switch of memory only
    assert "unknown option(s) ['--json']" in capsys.readouterr().err
