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
``N >= 2`` (999, 749, 499, 249 for 4); the 1-step student (timestep 399) needs ``timesteps=[399]``. The grid is also
written to ``OUT/dmd2.json``.

Use::

    pipe = StableDiffusionXLPipeline.from_pretrained(OUT, torch_dtype=torch.float16).to("cuda")
    image = pipe(prompt, num_inference_steps=4, guidance_scale=0.0).images[0]        # 4-step student
    image = pipe(prompt, timesteps=[399], guidance_scale=0.0).images[0]              # 1-step student

(``guidance_scale=0``: the student is guidance-distilled; with ``export.lora_format=lora`` also call
``pipe.load_lora_weights(OUT)``.)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["export_pipeline", "student_scheduler", "TIMESTEP_SCALING"]

TIMESTEP_SCALING = 1e6


def student_scheduler(schedule, timesteps: list[int], prediction_type: str = "epsilon"):
    """The ``LCMScheduler`` that runs our sampler's steps exactly (module docstring); ``schedule``: the run's
    :class:`~dmd2.models.sdxl.DiffusersVPSchedule`."""
    from diffusers import LCMScheduler

    c = schedule.config
    return LCMScheduler(num_train_timesteps=c["num_train_timesteps"], beta_start=c["beta_start"], beta_end=c["beta_end"],
                        beta_schedule=c["beta_schedule"], prediction_type=prediction_type,
                        original_inference_steps=len(timesteps), timestep_scaling=TIMESTEP_SCALING, set_alpha_to_one=True,
                        clip_sample=False, thresholding=False, steps_offset=0, timestep_spacing="leading")


def export_pipeline(unet, parts, cfg, timesteps: list[int], out: str | Path, weights: str = "ema",
                    lora_format: str = "fused", dtype: torch.dtype = torch.float32) -> Path:
    """Write ``out`` as a ``StableDiffusionXLPipeline`` folder (module docstring) and return it.

    ``unet``: the student's UNet (``lora_format="fused"``: LoRA merged; ``"lora"`` in a LoRA memory mode: with its
    ``generator`` adapter); ``parts``: the run's :class:`~dmd2.models.sdxl.SDXLParts`; ``cfg``: the run's config;
    ``timesteps``: its grid; ``weights``: which weights ``unet`` holds (recorded in ``dmd2.json``).
    """
    from diffusers import StableDiffusionXLPipeline

    fuse = lora_format == "fused"
    scheduler = student_scheduler(parts.schedule, timesteps, parts.prediction_type)
    probe = student_scheduler(parts.schedule, timesteps, parts.prediction_type)
    probe.set_timesteps(len(timesteps))
    by_steps = len(timesteps) > 1 and probe.timesteps.tolist() == list(timesteps)  # num_inference_steps=N runs our grid
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lora_state = None
    if cfg.model.memory_mode != "full" and not fuse:
        from peft.utils import get_peft_model_state_dict

        lora_state = {k: v.to(dtype) for k, v in get_peft_model_state_dict(unet, adapter_name="generator").items()}
        unet.unload_lora()  # the folder's unet/ is the base model; the LoRA file sits next to it
    pipe = StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
                                     tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=unet.to(dtype),
                                     scheduler=scheduler, force_zeros_for_empty_prompt=cfg.model.uncond == "zeros",
                                     add_watermarker=False)
    if dtype != torch.float32:
        pipe.text_encoder.to(dtype)
        pipe.text_encoder_2.to(dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    if lora_state is not None:
        meta = {"r": cfg.model.lora_rank, "lora_alpha": cfg.model.lora_alpha, "target_modules": list(cfg.model.lora_targets)}
        StableDiffusionXLPipeline.save_lora_weights(out, unet_lora_layers=lora_state, unet_lora_adapter_metadata=meta)
    info = {"timesteps": timesteps, "num_inference_steps": len(timesteps), "guidance_scale": 0.0,
            "resolution": cfg.model.resolution, "memory_mode": cfg.model.memory_mode, "weights": weights,
            "lora_format": lora_format if cfg.model.memory_mode != "full" else "full",
            "call": (f"pipe(prompt, num_inference_steps={len(timesteps)}, guidance_scale=0.0)" if by_steps
                     else f"pipe(prompt, timesteps={timesteps}, guidance_scale=0.0)")}
    (out / "dmd2.json").write_text(json.dumps(info, indent=2))
    return out
