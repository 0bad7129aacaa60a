r"""SDXL through diffusers: loading, prompt encoding, LoRA adapters and the three memory modes of the SDXL recipe.

* :func:`load_sdxl` - UNet, VAE, both CLIP text encoders and tokenizers from a hub id or a local folder in the
  diffusers layout (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``).
  Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only``) nothing is downloaded; a missing model is a ``ValueError``
  that names the path. :class:`SDXLParts` places the frozen text encoders and VAE (:meth:`~SDXLParts.place`) and
  knows the latent shape of a resolution (:meth:`~SDXLParts.latent_shape`); :func:`unet_blocks` are the FSDP2 units.
* :class:`PromptEncoder` - SDXL's text conditioning (Podell et al. 2023, Sec. 2.1-2.2): the penultimate hidden
  states of both encoders concatenated, ``(B, 77, 768 + 1280 = 2048)``, the pooled projection of the second,
  ``(B, 1280)``, and the size/crop "time ids" ``(h, w, top, left, h, w)`` of the training resolution.
* :class:`SDXLDenoiser` - an SDXL UNet as the library's denoiser ``D(x_t, t, cond) -> x0``; optionally one named
  LoRA adapter of a UNet shared with other denoisers.
* :func:`build_networks` - teacher, generator and fake score for a memory mode:

  ============== ================================================================================================
  ``full``        three UNets: frozen teacher, full generator, full fake score (FSDP2 across GPUs)
  ``lora``        frozen teacher; generator = its own frozen copy + LoRA (rank 64; DMD2's LoRA variant);
                  full fake score
  ``shared-base`` ONE frozen UNet with two LoRA adapters, ``generator`` and ``fake_score``; the teacher is the
                  same UNet with adapters disabled (one copy of SDXL's weights)
  ============== ================================================================================================

Adapter switching. peft's ``set_adapter`` / ``disable_adapters`` also toggle ``requires_grad``, which would fight
the trainer's freezing of the inactive network. :class:`AdapterSwitch` sets only which adapter a layer runs. Because
the active adapter is global state of the shared UNet, gradient checkpointing records the state at forward time
and restores it before each recomputation (a block recomputed during the generator's backward runs the generator's
adapter even if the fake score ran last).
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..core.schedules import VPSchedule

__all__ = [
    "SUBFOLDERS", "SDXLParts", "load_sdxl", "is_offline", "PromptEncoder", "time_ids",
    "AdapterSwitch", "add_lora", "SDXLDenoiser", "Networks", "build_networks", "MEMORY_MODES", "DEFAULT_LORA_TARGETS",
    "schedule_from_folder", "unet_config_path", "lora_param_names", "DiffusersVPSchedule", "adapter_weights_from_checkpoint",
    "DTYPES", "unet_blocks",
]

#: the dtypes a config names: ``fp32`` | ``bf16`` | ``fp16``
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: component -> subfolder of a diffusers SDXL folder
SUBFOLDERS = {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2",
              "tokenizer": "tokenizer", "tokenizer_2": "tokenizer_2"}
MEMORY_MODES = ("full", "lora", "shared-base")
#: LoRA targets on SDXL's UNet: attention and feed-forward projections, the transformer in/out projections, the
#: ResNet convolutions and time projections, the resamplers.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                        "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def unet_config_path() -> Path:
    """The packaged UNet configuration of SDXL base 1.0 (builds the 2,567,463,684-parameter network)."""
    return Path(__file__).resolve().parent.parent / "assets" / "sdxl_base_unet_config.json"


def is_offline(local_files_only: bool = False) -> bool:
    """True when downloads are off: ``local_files_only`` or ``HF_HUB_OFFLINE`` set to 1/true/yes/on."""
    return local_files_only or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class SDXLParts:
    """The components of an SDXL checkpoint (diffusers / transformers objects)."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    text_encoder_2: nn.Module
    tokenizer: Any
    tokenizer_2: Any
    schedule: VPSchedule
    prediction_type: str = "epsilon"

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """``(C, R/f, R/f)``: the UNet's latents of ``resolution`` px images, ``f = 2^(levels - 1)`` the VAE's
        downsampling factor (SDXL: ``(4, 128, 128)`` at 1024 px); ``ValueError`` when ``f`` does not divide it."""
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if resolution % scale:
            raise ValueError(f"model.resolution {resolution} must be a multiple of the VAE's downsampling factor {scale}")
        return (self.unet.config.in_channels, resolution // scale, resolution // scale)

    def place(self, device, text_encoder_dtype: torch.dtype | None = None,
              vae_dtype: torch.dtype | None = None) -> "SDXLParts":
        """Move the frozen helpers - both text encoders and the VAE, those loaded - to ``device``, cast to their
        dtypes (``None``: as they are). The UNet is not moved: the networks built from it are placed by their owner.
        The SDXL recipe keeps both at fp32 by default: the official code runs the text encoders in fp32, and SDXL's
        VAE overflows in fp16."""
        for module, dtype in ((self.text_encoder, text_encoder_dtype), (self.text_encoder_2, text_encoder_dtype),
                              (self.vae, vae_dtype)):
            if module is not None:
                module.to(device) if dtype in (None, next(module.parameters()).dtype) else module.to(device, dtype)
        return self


def unet_blocks(module: nn.Module) -> list[nn.Module]:
    """FSDP2 units: the down, mid and up blocks of every diffusers ``UNet2DConditionModel`` inside ``module``."""
    from diffusers import UNet2DConditionModel

    out = []
    for u in module.modules():
        if isinstance(u, UNet2DConditionModel):
            out += [*u.down_blocks, u.mid_block, *u.up_blocks]
    return out


class DiffusersVPSchedule(VPSchedule):
    r"""A :class:`VPSchedule` whose tables are computed the way diffusers' schedulers compute them, in float32:
    ``betas`` (float32; ``scaled_linear``: ``linspace(sqrt(b0), sqrt(b1), T) ** 2``), ``abar = cumprod(1 - betas)``,
    :math:`\alpha = \sqrt{\bar\alpha}`, :math:`\sigma = \sqrt{1 - \bar\alpha}`.

    The float64 tables of :class:`VPSchedule` differ from these by ~1e-6 relative at ``t = 999``, which
    ``x0 = (x_t - sigma eps) / alpha`` amplifies ``1/alpha ~ 15`` times; with diffusers' tables an exported pipeline
    reproduces our sampler to float32 rounding (:mod:`dmd2.recipes.sdxl_export`).
    """

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                 beta_schedule: str = "scaled_linear"):
        if beta_schedule == "scaled_linear":
            b32 = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "linear":
            b32 = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        else:
            raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; expected 'scaled_linear' or 'linear'")
        super().__init__(b32.double())
        abar = torch.cumprod(1.0 - b32, dim=0)
        self.alphas_cumprod = abar.double()
        self._alpha = abar.sqrt()
        self._sigma = (1.0 - abar).sqrt()
        self._weight = abar / (1.0 - abar)
        self.config = {"beta_start": beta_start, "beta_end": beta_end, "num_train_timesteps": num_train_timesteps,
                       "beta_schedule": beta_schedule}


def schedule_from_folder(path: str | Path) -> tuple[VPSchedule, str]:
    """``(DiffusersVPSchedule, prediction_type)`` from ``path/scheduler/scheduler_config.json`` (SDXL's scaled-linear
    0.00085..0.012 over 1000 steps, epsilon prediction when the file is absent)."""
    f = Path(path) / "scheduler" / "scheduler_config.json"
    cfg = json.loads(f.read_text()) if f.is_file() else {}
    sched = DiffusersVPSchedule(cfg.get("beta_start", 0.00085), cfg.get("beta_end", 0.012),
                                cfg.get("num_train_timesteps", 1000), cfg.get("beta_schedule", "scaled_linear"))
    return sched, cfg.get("prediction_type", "epsilon")


def _load(cls, path: str, subfolder: str, local_only: bool, **kw):
    try:
        return cls.from_pretrained(path, subfolder=subfolder, local_files_only=local_only, **kw)
    except (OSError, ValueError) as e:  # diffusers / transformers / huggingface_hub raise OSError subclasses
        hint = (" Downloads are off (HF_HUB_OFFLINE=1 or model.local_files_only=true): model.path must be a local "
                "diffusers folder or a model already in the Hugging Face cache." if local_only else
                " Check model.path (a hub id such as stabilityai/stable-diffusion-xl-base-1.0 or a local folder) "
                "and the network.")
        raise ValueError(f"could not load the SDXL {subfolder} from {path}/{subfolder}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}.{hint}") from e


class _UNetConfig:
    """``from_pretrained`` that reads only the UNet's ``config.json`` (for :func:`_load`'s error handling)."""

    @staticmethod
    def from_pretrained(path, subfolder, local_files_only):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.load_config(path, subfolder=subfolder, local_files_only=local_files_only)


def load_sdxl(path: str | Path, dtype: torch.dtype = torch.float32, local_files_only: bool = False,
              components: Sequence[str] = tuple(SUBFOLDERS), meta_unet: bool = False) -> SDXLParts:
    """Load SDXL's components from a hub id or a local diffusers folder.

    Args:
        path: ``"stabilityai/stable-diffusion-xl-base-1.0"`` or a local folder with the subfolders of
            :data:`SUBFOLDERS`.
        dtype: dtype of the UNet, VAE and text encoders.
        local_files_only: never download (also implied by ``HF_HUB_OFFLINE=1``).
        components: which components to load (the others are ``None``).
        meta_unet: build the UNet from its config on the meta device (no weights read, no memory): for the FSDP2
            ranks that receive their shards from rank 0 (:func:`dmd2.train.distributed.wrap_trained`).

    Raises ``ValueError`` naming the missing path when a local folder lacks a subfolder, or when a hub id cannot
    be resolved (offline, not cached, or no network).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = str(Path(path).expanduser()) if str(path).startswith("~") else str(path)
    local_only = is_offline(local_files_only)
    unknown = set(components) - set(SUBFOLDERS)
    if unknown:
        raise ValueError(f"load_sdxl: unknown components {sorted(unknown)}; expected among {list(SUBFOLDERS)}")
    p = Path(path)
    looks_local = p.exists() or path.startswith((".", "/")) or path.count("/") != 1
    if looks_local:
        if not p.is_dir():
            raise ValueError(f"model.path {path!r} is not a folder; expected a diffusers SDXL folder with "
                             f"{', '.join(SUBFOLDERS.values())}/ or a hub id like stabilityai/stable-diffusion-xl-base-1.0")
        missing = [str(p / SUBFOLDERS[c]) for c in components if not (p / SUBFOLDERS[c]).is_dir()]
        if missing:
            raise ValueError(f"model.path {path!r} is missing {', '.join(missing)} (a diffusers SDXL folder has "
                             f"{', '.join(SUBFOLDERS.values())}/)")
        schedule, pred = schedule_from_folder(p)
    else:
        schedule, pred = DiffusersVPSchedule(), "epsilon"
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection, "tokenizer": CLIPTokenizer, "tokenizer_2": CLIPTokenizer}
    out = {}
    for name in SUBFOLDERS:
        if name not in components:
            out[name] = None
            continue
        kw = {} if name.startswith("tokenizer") else {"dtype": dtype}
        if name == "unet" and meta_unet:
            config = _load(_UNetConfig, path, SUBFOLDERS[name], local_only)
            with torch.device("meta"):
                out[name] = UNet2DConditionModel.from_config(config).to(dtype)
            continue
        out[name] = _load(classes[name], path, SUBFOLDERS[name], local_only, **kw)
    if not looks_local and "unet" in components:
        try:  # the scheduler config of a cached hub model
            from huggingface_hub import hf_hub_download

            f = hf_hub_download(path, "scheduler/scheduler_config.json", local_files_only=local_only)
            schedule, pred = schedule_from_folder(Path(f).parent.parent)
        except (OSError, ValueError):  # not cached: SDXL's defaults apply
            pass
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if out[name] is not None:
            out[name].requires_grad_(False)
            out[name].eval()
    return SDXLParts(**out, schedule=schedule, prediction_type=pred)


# ------------------------------------------------------------------------------------------------ prompts
def time_ids(height: int, width: int, batch: int = 1, device=None, crop_top: int = 0, crop_left: int = 0) -> torch.Tensor:
    """SDXL's micro-conditioning ``(batch, 6)``: original size, crop top-left, target size = ``(h, w, top, left, h, w)``."""
    if height < 1 or width < 1:
        raise ValueError(f"time_ids: height and width must be >= 1, got {height}, {width}")
    row = torch.tensor([height, width, crop_top, crop_left, height, width], dtype=torch.float32, device=device)
    return row.expand(batch, 6).clone()


class PromptEncoder(nn.Module):
    r"""SDXL text conditioning from both CLIP encoders (Podell et al. 2023, Sec. 2.1).

    ``encode(prompts)`` -> ``{"encoder_hidden_states": (B, L, D1 + D2), "text_embeds": (B, P)}``, where each
    encoder's contribution is its penultimate hidden state (``hidden_states[-2]``) on prompts padded to the
    tokenizer's ``model_max_length`` ``L`` (77), and ``text_embeds`` is the projected pooled output of the second
    encoder (SDXL: D1 = 768, D2 = 1280, P = 1280). Identical to diffusers' ``StableDiffusionXLPipeline.encode_prompt``.

    ``cond(prompts, height, width)`` adds ``time_ids`` ``(B, 6)``. ``uncond(height, width, mode)``: batch-1 null
    conditioning, ``"zeros"`` (zero text embeddings: DMD2's choice, diffusers' ``force_zeros_for_empty_prompt``) or
    ``"empty"`` (the encoded empty prompt); the time ids are those of the conditional branch.
    """

    UNCOND = ("zeros", "empty")

    def __init__(self, tokenizer, text_encoder: nn.Module, tokenizer_2, text_encoder_2: nn.Module):
        super().__init__()
        self.tokenizers = [tokenizer, tokenizer_2]
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or len(prompts) == 0:
            raise ValueError("PromptEncoder.encode: expected a non-empty list of strings")
        states, pooled = [], None
        for tok, enc in zip(self.tokenizers, (self.text_encoder, self.text_encoder_2)):
            ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(next(enc.parameters()).device)
            out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projected pooled output (text_embeds)
        if pooled.dim() != 2:
            raise ValueError("PromptEncoder: the second text encoder must return a pooled projection (B, P) "
                             "(CLIPTextModelWithProjection)")
        return {"encoder_hidden_states": torch.cat(states, dim=-1), "text_embeds": pooled}

    def cond(self, prompts: Sequence[str], height: int, width: int) -> dict[str, torch.Tensor]:
        c = self.encode(prompts)
        c["time_ids"] = time_ids(height, width, len(prompts), c["text_embeds"].device)
        return c

    def uncond(self, height: int, width: int, mode: str = "zeros") -> dict[str, torch.Tensor]:
        if mode not in self.UNCOND:
            raise ValueError(f"PromptEncoder.uncond: mode must be one of {self.UNCOND}, got {mode!r}")
        c = self.cond([""], height, width)
        if mode == "zeros":
            c["encoder_hidden_states"] = torch.zeros_like(c["encoder_hidden_states"])
            c["text_embeds"] = torch.zeros_like(c["text_embeds"])
        return c


# ------------------------------------------------------------------------------------------------ LoRA
def add_lora(unet: nn.Module, name: str, rank: int = 64, alpha: float | None = None,
             targets: Sequence[str] = DEFAULT_LORA_TARGETS) -> list[str]:
    """Add a peft LoRA adapter ``name`` (``W + (alpha / rank) B A``, ``B = 0`` at init so the adapted UNet starts
    equal to the base) to ``unet``; the adapter's weights are fp32 and trainable, the base stays as it is.

    ``targets``: module-name suffixes (:data:`DEFAULT_LORA_TARGETS`). Returns the adapter's parameter names.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"add_lora: rank must be >= 1, got {rank}")
    before = {n: p.requires_grad for n, p in unet.named_parameters()}
    present = {n for n, _ in unet.named_modules()}
    if not any(any(m == t or m.endswith("." + t) for t in targets) for m in present):
        raise ValueError(f"add_lora: none of the target modules {list(targets)} exist in {type(unet).__name__}")
    cfg = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), target_modules=list(targets),
                     init_lora_weights=True)
    with warnings.catch_warnings():  # peft warns whenever a second adapter is added: that is the point here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        unet.add_adapter(cfg, adapter_name=name)
    names = lora_param_names(unet, name)
    params = dict(unet.named_parameters())
    for n, p in params.items():
        if n in names:
            p.data = p.data.float()
            p.requires_grad_(True)
        elif n in before:
            p.requires_grad_(before[n])
    AdapterSwitch(unet).set(None)  # adding an adapter activates it; every denoiser chooses its own per call
    return names


def lora_param_names(unet: nn.Module, name: str) -> list[str]:
    """Parameter names of adapter ``name`` (``...lora_A.<name>.weight``, ``...lora_B.<name>.weight``)."""
    return [n for n, _ in unet.named_parameters() if (".lora_A." + name + ".") in n or (".lora_B." + name + ".") in n]


class AdapterSwitch:
    """Chooses which LoRA adapter the peft layers of a UNet run - ``set(name)`` or ``set(None)`` (base only) - without
    touching ``requires_grad`` (unlike peft's ``set_adapter`` / ``disable_adapters``)."""

    def __init__(self, unet: nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]

    def state(self):
        if not self.layers:
            return None
        m = self.layers[0]
        return None if m._disable_adapters else tuple(m.active_adapters)

    def set(self, state) -> None:
        if isinstance(state, str):
            state = (state,)
        for m in self.layers:
            if state is None:
                m._disable_adapters = True
            else:
                m._active_adapter = list(state)
                m._disable_adapters = False


def _escape(name: str) -> str:
    return name.replace(".", "~")


def _unescape(name: str) -> str:
    return name.replace("~", ".")


class SDXLDenoiser(nn.Module):
    r"""An SDXL UNet (epsilon / v prediction on a :class:`VPSchedule`) as ``D(x_t, t, cond) -> x0``.

    ``cond``: ``{"encoder_hidden_states": (B, L, 2048), "text_embeds": (B, 1280), "time_ids": (B, 6)}``; ``t``:
    integer timesteps ``(B,)``; ``x_t``: latents ``(B, 4, H/8, W/8)``. x0 from epsilon:
    :math:`\hat x_0 = (x_t - \sigma_t \hat\epsilon)/\alpha_t`.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        schedule, prediction_type: as in :class:`~dmd2.core.DiffusersDenoiser`.
        adapter: run this LoRA adapter of ``unet`` (``None``: no adapter; with ``shared=True``, adapters disabled,
            i.e. the base model - the teacher of the ``shared-base`` mode).
        shared: the UNet is shared with other denoisers and NOT registered as a submodule: this module's
            parameters are exactly the adapter's (``state_dict`` keys ``adapter.<param name with ~ for .>``), so
            optimizers, EMA and checkpoints see the LoRA weights only. Move the UNet to its device yourself.
        gan_layer: UNet submodule whose output feeds the GAN head through :attr:`gan_tap` (an identity module, so
            :class:`~dmd2.core.FeatureHooks` reads it as ``"gan_tap"`` whatever the sharing; SDXL: ``mid_block``,
            1280 channels at 1/32 of the image size).
    """

    def __init__(self, unet: nn.Module, schedule: VPSchedule, prediction_type: str = "epsilon", adapter: str | None = None,
                 shared: bool = False, gan_layer: str | None = "mid_block"):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
        self.schedule, self.prediction_type, self.adapter, self.shared = schedule, prediction_type, adapter, shared
        if shared:
            object.__setattr__(self, "_unet", unet)
            names = lora_param_names(unet, adapter) if adapter is not None else []
            if adapter is not None and not names:
                raise ValueError(f"SDXLDenoiser: the UNet has no LoRA adapter named {adapter!r}")
            params = dict(unet.named_parameters())
            self.adapter_params = nn.ParameterDict({_escape(n): params[n] for n in names})
        else:
            self.unet_module = unet
            if adapter is not None and not lora_param_names(unet, adapter):
                raise ValueError(f"SDXLDenoiser: the UNet has no LoRA adapter named {adapter!r}")
        self.switch = AdapterSwitch(unet) if (adapter is not None or shared) else None
        self.gan_tap = nn.Identity()
        self._running = False
        if gan_layer is not None:
            mods = dict(unet.named_modules())
            if gan_layer not in mods:
                raise ValueError(f"SDXLDenoiser: the UNet has no submodule {gan_layer!r}")
            mods[gan_layer].register_forward_hook(self._tap)

    @property
    def unet(self) -> nn.Module:
        return self._unet if self.shared else self.unet_module

    def _tap(self, module, args, output):
        if self._running:
            self.gan_tap(output[0] if isinstance(output, (tuple, list)) else output)

    def enable_gradient_checkpointing(self) -> None:
        """Block-wise activation recomputation (diffusers' checkpointing) that re-selects the adapter state of the
        forward pass before recomputing a block (see the module docstring)."""
        from torch.utils.checkpoint import checkpoint

        switch = self.switch

        def ckpt(block, *args, **kwargs):
            state = switch.state() if switch is not None else None

            def run(*a, **k):
                if switch is not None:
                    switch.set(state)
                return block(*a, **k)

            return checkpoint(run, *args, use_reentrant=False, **kwargs)

        self.unet.enable_gradient_checkpointing(gradient_checkpointing_func=ckpt)

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The UNet's own output (epsilon / v / x0) for this denoiser's adapter."""
        self.schedule.check_t(t)
        if not isinstance(cond, dict) or not {"encoder_hidden_states", "text_embeds", "time_ids"} <= set(cond):
            raise ValueError("SDXLDenoiser: cond must be a dict with encoder_hidden_states (B, L, D), text_embeds (B, P) "
                             "and time_ids (B, 6)")
        unet = self.unet
        if self.switch is not None:
            self.switch.set(self.adapter)
        dtype = unet.conv_in.weight.dtype  # under autocast the ops cast further
        self._running = True
        try:
            out = unet(x_t.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                       added_cond_kwargs={"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)},
                       return_dict=False)[0]
        finally:
            self._running = False
        return out

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        out = self.raw(x_t, t, cond)
        if self.prediction_type == "epsilon":
            return self.schedule.x0_from_eps(x_t, out.to(x_t.dtype), t)
        if self.prediction_type == "v_prediction":
            return self.schedule.x0_from_v(x_t, out.to(x_t.dtype), t)
        return out.to(x_t.dtype)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """``{peft parameter name: tensor}`` of a ``shared`` denoiser's adapter."""
        return adapter_weights_from_checkpoint(self.state_dict())


def adapter_weights_from_checkpoint(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft parameter names -> tensors from a checkpointed ``shared`` denoiser's (or its EMA's) state dict."""
    return {_unescape(k[len("adapter_params."):]): v for k, v in sd.items() if k.startswith("adapter_params.")}


@dataclass
class Networks:
    """Teacher (frozen, unguided), generator and fake score of one memory mode, plus the UNet that shared modes
    hide from the trainer (move it to the device yourself: :meth:`to`)."""

    teacher: SDXLDenoiser
    generator: SDXLDenoiser
    fake_score: SDXLDenoiser
    mode: str
    hidden_unets: list

    def to(self, device) -> "Networks":
        for u in self.hidden_unets:
            u.to(device)
        return self


def build_networks(unet: nn.Module, schedule: VPSchedule, prediction_type: str = "epsilon", mode: str = "shared-base",
                   lora_rank: int = 64, lora_alpha: float | None = None, lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
                   frozen_dtype: torch.dtype | None = None) -> Networks:
    """Teacher, generator and fake score from a (loaded) SDXL UNet, per memory mode (module docstring).

    Trained weights are fp32 (master weights; the trainer's autocast runs bf16); frozen weights are cast to
    ``frozen_dtype`` (e.g. bf16) when given. Generator and fake score start equal to the teacher (DMD2 initialises
    both from it; LoRA adapters start at ``B = 0``). ``unet`` is used in place (frozen base / teacher).
    """
    if mode not in MEMORY_MODES:
        raise ValueError(f"model.memory_mode must be one of {MEMORY_MODES}, got {mode!r}")
    unet.requires_grad_(False)
    unet.eval()
    base_dtype = frozen_dtype or unet.conv_in.weight.dtype

    def trained_copy():  # from the weights as loaded (before the frozen copy is cast)
        u = copy.deepcopy(unet).float()
        u.requires_grad_(True)
        u.train()
        return u

    def freeze_cast():
        if unet.conv_in.weight.dtype != base_dtype:
            unet.to(base_dtype)

    if mode == "full":
        gen, fake = trained_copy(), trained_copy()
        freeze_cast()
        return Networks(SDXLDenoiser(unet, schedule, prediction_type, gan_layer=None),
                        SDXLDenoiser(gen, schedule, prediction_type), SDXLDenoiser(fake, schedule, prediction_type), mode, [])
    if mode == "lora":
        fake = trained_copy()
        freeze_cast()
        gen_base = copy.deepcopy(unet)
        add_lora(gen_base, "generator", lora_rank, lora_alpha, lora_targets)
        return Networks(SDXLDenoiser(unet, schedule, prediction_type, gan_layer=None),
                        SDXLDenoiser(gen_base, schedule, prediction_type, adapter="generator", shared=True),
                        SDXLDenoiser(fake, schedule, prediction_type), mode, [gen_base])
    freeze_cast()
    add_lora(unet, "generator", lora_rank, lora_alpha, lora_targets)
    add_lora(unet, "fake_score", lora_rank, lora_alpha, lora_targets)
    return Networks(SDXLDenoiser(unet, schedule, prediction_type, adapter=None, shared=True, gan_layer=None),
                    SDXLDenoiser(unet, schedule, prediction_type, adapter="generator", shared=True),
                    SDXLDenoiser(unet, schedule, prediction_type, adapter="fake_score", shared=True), mode, [unet])
