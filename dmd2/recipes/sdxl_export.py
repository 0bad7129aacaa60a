r"""Export an SDXL DMD2 student to a diffusers ``StableDiffusionXLPipeline`` folder.

``python -m dmd2.recipes.sdxl export CKPT OUT [export.weights=ema|generator] [export.lora_format=fused|lora]``
(``CKPT``: a checkpoint folder, or a run folder - then its newest complete checkpoint; the recipe's
``export_command`` reads it through :mod:`dmd2.train.loading` and hands :func:`export_pipeline` the loaded UNet).

The scheduler. Our sampler (:class:`~dmd2.core.BackwardSimulationSampler`) runs, on the grid
:math:`t_1 > \dots > t_N`, :math:`\hat x_0 = G(x_{t_k}, t_k)` and :math:`x_{t_{k+1}} = \alpha(t_{k+1})\hat x_0 +
\sigma(t_{k+1})\epsilon_k`, returning the last :math:`\hat x_0`. diffusers' ``LCMScheduler.step`` computes
``denoised = c_out * x0_pred + c_skip * sample`` with the consistency-model boundary scalings
:math:`c_{skip} = \sigma_d^2 / ((s t)^2 + \sigma_d^2)`, :math:`c_{out} = s t / \sqrt{(s t)^2 + \sigma_d^2}`
(``s = timestep_scaling``), then ``prev = sqrt(abar_prev) * denoised + sqrt(1 - abar_prev) * noise`` with
``noise = randn(generator)`` except after the last step, where it returns ``denoised``. With
``timestep_scaling = 1e6`` the scalings are exactly ``c_out = 1`` (``sqrt(x^2) = x`` in IEEE arithmetic) and
``c_skip < 1e-17`` for every ``t >= 1``, so each step is ours; the noise is drawn with the same
``torch.randn(shape, generator=...)`` calls in the same order, so the same seeded generator (and the same initial
latents) gives our latents. ``original_inference_steps = N`` makes ``num_inference_steps = N`` run our grid for
``N >= 2`` (999, 749, 499, 249 for 4).

The 1-step student (timestep 399, input pure noise) cannot get 399 from ``LCMScheduler`` with
``num_inference_steps=1`` (it always starts at ``N k - 1`` with ``k = 1000 // N``, >= 500). It gets an
``EulerDiscreteScheduler`` with ``timestep_spacing="leading"`` and ``steps_offset=399``: ``num_inference_steps=1``
then runs ``[0 * 1000 + 399] = [399]``. Its one step is ours: the pipeline's latents are ``z / sqrt(abar)``
(``init_noise_sigma = sqrt(sigma^2 + 1)``, ``sigma = sqrt((1 - abar) / abar)``), the UNet sees
``z / sqrt(sigma^2 + 1) = z``, and the step to ``sigma = 0`` returns ``x0 = (z - sqrt(1 - abar) eps) / sqrt(abar)``.
A grid that neither rule produces (a custom ``sampler.timesteps``) is written to ``dmd2.json`` / ``README.md``
as the ``timesteps=[...]`` to pass. ``OUT/README.md`` is a model card with the exact call.

Use::

    pipe = StableDiffusionXLPipeline.from_pretrained(OUT, dtype=torch.float16).to("cuda")
    image = pipe(prompt, num_inference_steps=4, guidance_scale=0.0).images[0]        # 4-step student
    image = pipe(prompt, num_inference_steps=1, guidance_scale=0.0).images[0]        # 1-step student (t = 399)

(``guidance_scale=0``: the student is guidance-distilled; with ``export.lora_format=lora`` also call
``pipe.load_lora_weights(OUT)``.)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["export_pipeline", "student_scheduler", "model_card", "TIMESTEP_SCALING"]

TIMESTEP_SCALING = 1e6

#: base models whose license the model card can name: hub id -> (card license id, name, text)
BASE_LICENSES = {
    "stabilityai/stable-diffusion-xl-base-1.0": (
        "openrail++", "CreativeML Open RAIL++-M",
        "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md"),
}


def student_scheduler(schedule, timesteps: list[int], prediction_type: str = "epsilon"):
    """The scheduler that runs our sampler's steps exactly (module docstring): 1 step -> ``EulerDiscreteScheduler``
    whose ``num_inference_steps=1`` is ``timesteps[0]``; N steps -> ``LCMScheduler`` whose ``num_inference_steps=N``
    is the LCM-spaced grid (:func:`~dmd2.recipes.sdxl.grid`). ``schedule``: the run's
    :class:`~dmd2.models.sdxl.DiffusersVPSchedule`."""
    from diffusers import EulerDiscreteScheduler, LCMScheduler

    c = schedule.config
    if len(timesteps) == 1:
        return EulerDiscreteScheduler(num_train_timesteps=c["num_train_timesteps"], beta_start=c["beta_start"],
                                      beta_end=c["beta_end"], beta_schedule=c["beta_schedule"],
                                      prediction_type=prediction_type, timestep_spacing="leading",
                                      steps_offset=int(timesteps[0]), interpolation_type="linear",
                                      use_karras_sigmas=False, final_sigmas_type="zero", timestep_type="discrete")
    return LCMScheduler(num_train_timesteps=c["num_train_timesteps"], beta_start=c["beta_start"], beta_end=c["beta_end"],
                        beta_schedule=c["beta_schedule"], prediction_type=prediction_type,
                        original_inference_steps=len(timesteps), timestep_scaling=TIMESTEP_SCALING, set_alpha_to_one=True,
                        clip_sample=False, thresholding=False, steps_offset=0, timestep_spacing="leading")


def export_pipeline(unet, parts, cfg, timesteps: list[int], checkpoint: Path, out: str | Path, weights: str = "ema",
                    lora_format: str = "fused", dtype: str = "fp32", base_model: str = "") -> Path:
    """Write ``out`` as a ``StableDiffusionXLPipeline`` folder (module docstring) and return it.

    ``unet``: the student's UNet (``lora_format="fused"``: LoRA merged; ``"lora"`` in a LoRA memory mode: with its
    ``generator`` adapter); ``parts``: the run's :class:`~dmd2.models.sdxl.SDXLParts`; ``cfg``: the run's config;
    ``timesteps``: its grid; ``checkpoint``: the folder ``unet`` came from and ``weights`` which of its weights it
    holds; ``dtype``: a key of :data:`~dmd2.models.sdxl.DTYPES`; ``base_model``: the teacher, for the model card.
    """
    from diffusers import StableDiffusionXLPipeline

    from ..models.sdxl import DTYPES

    fuse = lora_format == "fused"
    ckpt = Path(checkpoint)
    scheduler = student_scheduler(parts.schedule, timesteps, parts.prediction_type)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dt = DTYPES[dtype]
    lora_state = None
    if cfg.model.memory_mode != "full" and not fuse:
        from peft.utils import get_peft_model_state_dict

        lora_state = {k: v.to(dt) for k, v in get_peft_model_state_dict(unet, adapter_name="generator").items()}
        unet.unload_lora()  # the folder's unet/ is the base model; the LoRA file sits next to it
    pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
                                     tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=unet.to(dt),
                                     scheduler=scheduler, force_zeros_for_empty_prompt=cfg.model.uncond == "zeros",
                                     add_watermarker=False)
    if dt != torch.float32:
        pipe.text_encoder.to(dt)
        pipe.text_encoder_2.to(dt)
    pipe.save_pretrained(out, safe_serialization=True)
    if lora_state is not None:
        meta = {"r": cfg.model.lora_rank, "lora_alpha": cfg.model.lora_alpha, "target_modules": list(cfg.model.lora_targets)}
        StableDiffusionXLPipeline.save_lora_weights(out, unet_lora_layers=lora_state, unet_lora_adapter_metadata=meta)
    probe = student_scheduler(parts.schedule, timesteps, parts.prediction_type)
    probe.set_timesteps(len(timesteps))
    by_count = probe.timesteps.tolist() == list(timesteps)  # num_inference_steps=N runs this grid
    info = {"timesteps": timesteps, "num_inference_steps": len(timesteps), "guidance_scale": 0.0,
            "resolution": cfg.model.resolution, "memory_mode": cfg.model.memory_mode, "weights": weights,
            "lora_format": lora_format if cfg.model.memory_mode != "full" else "full",
            "scheduler": type(scheduler).__name__,
            "call": (f"pipe(prompt, num_inference_steps={len(timesteps)}" if by_count else f"pipe(prompt, timesteps={timesteps}")
                    + f", guidance_scale=0.0, height={cfg.model.resolution}, width={cfg.model.resolution})",
            "source": {"checkpoint": str(ckpt.resolve()), "iteration": int(ckpt.name.split("-")[-1]),
                       "base_model": base_model or str(cfg.model.path), "origin": cfg.train.origin}}
    (out / "dmd2.json").write_text(json.dumps(info, indent=2))
    (out / "README.md").write_text(model_card(cfg, info, dtype))
    return out


def model_card(cfg, info: dict, dtype: str) -> str:
    """``README.md`` of an exported pipeline: what it is (recipe, steps and timesteps, guidance, source checkpoint and
    iteration), the exact diffusers call, and the base model's license. ``info``: what ``dmd2.json`` holds."""
    src, n, ts = info["source"], info["num_inference_steps"], info["timesteps"]
    base = src["base_model"]
    lic = BASE_LICENSES.get(base)
    torch_dtype = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}[dtype]
    lora = "pipe.load_lora_weights(\"PATH\")   # the student is a LoRA on the base UNet\n" if info["lora_format"] == "lora" else ""
    m = cfg.model
    front = ["---", f"license: {lic[0] if lic else 'other'}", "library_name: diffusers",
             *([f"base_model: {base}"] if lic else []), "tags:", "- text-to-image", "- stable-diffusion-xl", "- dmd2",
             "- distillation", "---", ""]
    scheduler = ("EulerDiscreteScheduler with timestep_spacing=\"leading\" and steps_offset={t}: "
                 "num_inference_steps=1 runs timestep {t} (and a 1-step student is meant for nothing else)".format(t=ts[0])
                 if n == 1 else
                 f"LCMScheduler with original_inference_steps={n} and timestep_scaling=1e6: each step is the student's "
                 "x0 prediction, re-noised with fresh noise to the next timestep (DMD2's multi-step sampler)")
    if not info["call"].startswith("pipe(prompt, num_inference_steps"):
        scheduler += f"; this grid is not what num_inference_steps={n} gives, so pass timesteps={ts} as below"
    body = [
        f"# DMD2 {n}-step student of {base}", "",
        f"A {n}-step text-to-image generator distilled from {base} with DMD2 (Improved Distribution Matching "
        "Distillation, Yin et al. 2024, arXiv:2405.14867) by the dmd2 library.", "",
        "| | |", "|---|---|",
        f"| recipe | `python -m dmd2.recipes.sdxl` (`model.memory_mode={m.memory_mode}`, resolution {m.resolution} px) |",
        f"| config | {src['origin'] or '(not recorded)'} |",
        f"| steps, timesteps | {n}: {ts} |",
        f"| guidance | the teacher's CFG scale {m.guidance_scale} is distilled in: call with `guidance_scale=0.0` |",
        f"| source checkpoint | `{src['checkpoint']}`, iteration {src['iteration']}, {info['weights']} weights |",
        f"| export | {info['lora_format']} weights, {dtype}; scheduler: {info['scheduler']} |", "",
        "## Use", "", "```python", "import torch", "from diffusers import StableDiffusionXLPipeline", "",
        f"pipe = StableDiffusionXLPipeline.from_pretrained(\"PATH\", dtype={torch_dtype}).to(\"cuda\")",
        lora + "image = " + info["call"].replace("pipe(prompt", 'pipe("a photo of a cat"') + ".images[0]",
        "```", "", f"`PATH` is this folder. Scheduler: {scheduler}. Images are {m.resolution} x {m.resolution}.", "",
        "## License", "",
        (f"These weights are a fine-tune of {base} and inherit its license, the {lic[1]} ({lic[2]}): its use "
         "restrictions apply to this model and to images made with it." if lic else
         f"These weights are a fine-tune of `{base}` and inherit its license; check that model's license before "
         "use or distribution."),
        "The dmd2 code that trained and exported them is MIT-licensed; that license does not cover the weights.", ""]
    return "\n".join(front + body)
