"""The exported pipeline of a 1-step student cannot be misused: ``pipe(prompt, num_inference_steps=1)`` runs the
trained timestep 399 and reproduces our sampler; the folder carries a model card whose snippet runs as written."""
import json
import re

import pytest
import torch

from dmd2.core import BackwardSimulationSampler
from dmd2.models.sdxl import PromptEncoder, SDXLDenoiser
from dmd2.recipes.sdxl import RECIPE, load_student_unet
from dmd2.recipes.sdxl_export import model_card
from dmd2.train import main, resolve_config


@pytest.fixture(scope="module")
def one_step_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl1")
    run, out = root / "run", root / "exported"
    assert main(RECIPE, ["--preset", "tiny", "--steps", "1", "--out", str(run), "train.progress=false",
                         "train.sample_every=0"]) == 0
    assert main(RECIPE, ["export", str(run), str(out)]) == 0
    return run, out


def test_one_step_scheduler_runs_the_trained_timestep(one_step_export):
    from diffusers import StableDiffusionXLPipeline

    run, out = one_step_export
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [399]  # not LCM's 999
    # the obvious call == our sampler on the trained grid, same initial noise
    unet, cfg, parts, _ = load_student_unet(run, "ema")
    assert cfg.sampler.grid(lambda n: [399]) == [399]
    enc = PromptEncoder(parts.tokenizer, parts.text_encoder, parts.tokenizer_2, parts.text_encoder_2)
    cond = enc.cond(["a red cube", "the cat"], 32, 32)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = BackwardSimulationSampler(parts.schedule, [399]).sample(
            SDXLDenoiser(unet, parts.schedule, gan_layer=None), z, cond, generator=torch.Generator().manual_seed(3))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["text_embeds"], latents=z.clone(),
                  num_inference_steps=1, guidance_scale=0.0, height=32, width=32, output_type="latent").images
    assert (ours - theirs).abs().max() <= 1e-5
    # and timestep 999 (what an LCMScheduler would run) gives something else
    with torch.no_grad():
        at999 = BackwardSimulationSampler(parts.schedule, [999]).sample(
            SDXLDenoiser(unet, parts.schedule, gan_layer=None), z, cond, generator=torch.Generator().manual_seed(3))
    assert (at999 - theirs).abs().max() > 1e-2


def test_model_card_says_what_the_export_is(one_step_export):
    run, out = one_step_export
    card = (out / "README.md").read_text()
    info = json.loads((out / "dmd2.json").read_text())
    ckpt = run / "checkpoints" / "checkpoint-00000004"
    assert card.startswith("---\nlicense: other\nlibrary_name: diffusers\n")
    assert "| steps, timesteps | 1: [399] |" in card
    assert f"| source checkpoint | `{ckpt.resolve()}`, iteration 4, ema weights |" in card
    assert "`python -m dmd2.recipes.sdxl` (`model.memory_mode=full`, resolution 32 px)" in card
    assert "CFG scale 8.0 is distilled in: call with `guidance_scale=0.0`" in card
    assert f"| config | recipe sdxl, preset tiny, overrides train.out={run} sampler.steps=1 train.progress=false " \
           "train.sample_every=0 |" in card
    assert info["call"] == "pipe(prompt, num_inference_steps=1, guidance_scale=0.0, height=32, width=32)"
    assert info["source"]["iteration"] == 4 and info["scheduler"] == "EulerDiscreteScheduler"
    assert "inherit its license; check that model's license" in card


def test_model_card_snippet_runs_as_written(one_step_export):
    """The card's Python block, with PATH = the folder and the device = CPU, produces the 32 px image."""
    _, out = one_step_export
    card = (out / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert 'pipe("a photo of a cat", num_inference_steps=1, guidance_scale=0.0, height=32, width=32)' in code
    code = code.replace('"PATH"', repr(str(out))).replace('.to("cuda")', '.to("cpu")')
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["image"].size == (32, 32)
    assert scope["pipe"].scheduler.timesteps.tolist() == [399]


def test_model_card_names_the_sdxl_license_and_a_custom_grid():
    cfg = resolve_config(RECIPE, overrides=["sampler.timesteps=999,500,300,100"])
    info = {"timesteps": [999, 500, 300, 100], "num_inference_steps": 4, "weights": "ema", "lora_format": "lora",
            "scheduler": "LCMScheduler", "call": "pipe(prompt, timesteps=[999, 500, 300, 100], guidance_scale=0.0)",
            "source": {"checkpoint": "/r/checkpoints/checkpoint-00019000", "iteration": 19000,
                       "base_model": "stabilityai/stable-diffusion-xl-base-1.0", "origin": cfg.train.origin}}
    card = model_card(cfg, info, "fp16")
    assert "license: openrail++\n" in card and "base_model: stabilityai/stable-diffusion-xl-base-1.0\n" in card
    assert "CreativeML Open RAIL++-M (https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md)" in card
    assert 'pipe.load_lora_weights("PATH")' in card and "dtype=torch.float16" in card
    assert "this grid is not what num_inference_steps=4 gives, so pass timesteps=[999, 500, 300, 100]" in card
    assert 'image = pipe("a photo of a cat", timesteps=[999, 500, 300, 100], guidance_scale=0.0).images[0]' in card
