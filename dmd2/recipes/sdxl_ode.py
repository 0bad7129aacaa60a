r"""The 1-step SDXL warm start: teacher ODE pairs, then an LPIPS regression of the generator at timestep 399.

DMD2's 1-step SDXL student (Yin et al. 2024, Sec. 5.2; released checkpoint at 24k iterations, COCO FID 19.01) does
not start from the teacher's weights: the official run loads a generator that was first regressed onto the
teacher's deterministic sampler outputs. Two commands reproduce it, then training starts from their output::

    python -m dmd2.recipes.sdxl ode-pairs PAIRS --num 10000 --preset ode-paper data.prompts=prompts.parquet
    python -m dmd2.recipes.sdxl ode-pretrain PAIRS --preset ode-paper --out runs/ode
    python -m dmd2.recipes.sdxl --preset paper-1step model.generator_init=runs/ode data.prompts=FILE ...

``ode-pairs`` - for pair ``i``: unit noise :math:`z_i` and a prompt :math:`c_i` (both keyed by ``(train.seed, i)``,
so the pairs do not depend on the number of ranks or the batch), and the teacher's ODE solution
:math:`x_0 = \mathrm{DDIM}(\sigma_{999} z_i, c_i)` with CFG ``model.guidance_scale`` (8, zero unconditional
embeddings) over ``ode.teacher_steps`` (50) trailing-spaced timesteps 999, 979, ..., 19 - the sampler of the official
pairs (diffusers' ``EulerDiscreteScheduler(timestep_spacing="trailing")`` at the pipeline's default 50 steps, which
:func:`dmd2.eval.samplers.ddim` equals, including its start at :math:`\sigma_{999} z` rather than :math:`z`; tested
against the pipeline). The regression's input is the unit :math:`z_i`, as in the official code. Written as
``PAIRS/shard-XXXXX.safetensors`` of ``ode.shard_size`` pairs each (``noise``, ``latent`` ``(n, 4, R/8, R/8)`` fp32,
``prompt_index`` ``(n,)`` int64 into ``data.prompts``, the prompt texts in the header's metadata) and
``PAIRS/pairs.json`` (what the pairs were made with). Shard ``s`` is written by rank ``s mod world`` under torchrun,
to ``.tmp`` then renamed; a rerun skips the shards already complete, and refuses a folder made with different
settings.

``ode-pretrain`` - the generator :math:`G` (the teacher's UNet, trained in full) regressed at the conditioning
timestep :math:`t^\ast` = the 1-step grid (399; its input is the pure noise, as in 1-step training) onto the pairs:

.. math::  L = \mathrm{LPIPS}\big(\mathrm{dec}(G(z, t^\ast, c)),\ \mathrm{dec}(x_0)\big),

``dec`` the VAE decoder (``ode.vae``: the official run decodes with the tiny autoencoder ``madebyollin/taesdxl``;
``""`` uses the model's own VAE), LPIPS (Zhang et al. 2018) with a VGG-16 trunk through the ``lpips`` package
(the official run used piq's VGG LPIPS), on images in [-1, 1]. AdamW lr 1e-5 with 500 warm-up steps, batch 4 per GPU
(64 GPUs), grad clip 10, bf16 autocast, 2,000 iterations (preset ``ode-paper``). The output is a run folder whose
``checkpoints/checkpoint-XXXXXXXX/generator.safetensors`` is what ``model.generator_init`` loads (same keys as a
``full``-mode DMD2 checkpoint, so ``sdxl export`` / ``sdxl sample`` read it too). It resumes exactly (``--resume
auto``): batches are a pure function of ``(train.seed, step, shard)``.

Nothing is downloaded for LPIPS: the linear calibration layers ship inside the ``lpips`` package, and the trunk's
ImageNet weights are read from a local torchvision file (``ode.lpips_backbone``, default torch's hub cache); a run
without that file stops with an error naming it. ``ode.lpips_pretrained=false`` (preset ``ode-tiny``) uses a
randomly initialised trunk instead.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["SDXLODEConfig", "ODE_PRESETS", "PAIRS_FORMAT", "LPIPS_BACKBONES", "shard_path", "rank_shards",
           "write_pairs", "ODEPairs", "build_lpips", "lpips_backbone_path", "generator_init_checkpoint",
           "load_generator_init", "ode_pretrain",
           "ode_pairs_command", "ode_pretrain_command"]

PAIRS_FORMAT = "dmd2-sdxl-ode-pairs/1"
_NOISE, _PROMPT = 11, 12  # derive_seed tags of the pair streams

#: torchvision's ImageNet weight files of the LPIPS trunks (the names torch.hub caches them under) and their URLs
LPIPS_BACKBONES = {
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "squeeze": ("squeezenet1_1-b8a52dc0.pth", "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),
}


@dataclass(frozen=True)
class SDXLODEConfig:
    """The warm start (module docstring).

    Attributes:
        num: pairs to make (``ode-pairs``, ``--num``) and to regress on (``ode-pretrain``: the first ``num``).
        teacher_steps: DDIM / Euler steps of the teacher, trailing spacing (official: 50).
        batch: pairs per teacher call (per rank).
        shard_size: pairs per shard file (``ode-pairs`` writes, and resumes, whole shards).
        vae: decoder of the LPIPS images - ``""`` (the model's VAE) or a hub id / folder of a diffusers
            ``AutoencoderTiny`` (official: ``madebyollin/taesdxl``).
        lpips_net: LPIPS trunk, ``vgg`` | ``alex`` | ``squeeze`` (official: VGG-16).
        lpips_pretrained: load the trunk's ImageNet weights from ``lpips_backbone`` (false: random trunk, no file).
        lpips_backbone: the torchvision weight file of the trunk (empty: ``TORCH_HOME/hub/checkpoints/<name>``).
    """

    num: int = 10000
    teacher_steps: int = 50
    batch: int = 8
    shard_size: int = 256
    vae: str = "madebyollin/taesdxl"
    lpips_net: str = "vgg"
    lpips_pretrained: bool = True
    lpips_backbone: str = ""

    def __post_init__(self):
        for k in ("num", "teacher_steps", "batch", "shard_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"ode.{k} must be >= 1, got {getattr(self, k)}")
        if self.lpips_net not in LPIPS_BACKBONES:
            raise ValueError(f"ode.lpips_net must be one of {list(LPIPS_BACKBONES)}, got {self.lpips_net!r}")


ODE_PRESETS = {
    # the official regression (sdxl_lr1e-5_8node_ode_pretraining_10k_cond399): 64 GPUs x batch 4, DDP
    "paper": {
        "ode.num": 10000, "ode.teacher_steps": 50, "sampler.steps": 1, "train.lr_generator": 1e-5,
        "train.max_steps": 2000, "train.batch_size": 4, "train.warmup_steps": 500, "train.grad_clip": 10.0,
        "train.mixed_precision": "bf16", "train.grad_checkpointing": True, "train.distributed": "ddp",
        "train.ema_decay": None, "train.checkpoint_every": 500, "train.log_every": 10,
    },
    # CPU, no download (added to the recipe's tiny preset): 4 pairs from a 4-step teacher, 10 iterations
    "tiny": {
        "ode.num": 4, "ode.teacher_steps": 4, "ode.batch": 2, "ode.shard_size": 3, "ode.vae": "",
        "ode.lpips_pretrained": False, "sampler.steps": 1, "train.lr_generator": 1e-3, "train.max_steps": 10,
        "train.batch_size": 4, "train.warmup_steps": 0, "train.ema_decay": None, "train.checkpoint_every": 5,
        "train.log_every": 1, "train.keep_last": 0, "train.grad_checkpointing": False,
    },
}


# ------------------------------------------------------------------------------------------------ pairs
def shard_path(folder: str | Path, s: int) -> Path:
    return Path(folder) / f"shard-{s:05d}.safetensors"


def rank_shards(num: int, shard_size: int, rank: int, world: int) -> list[tuple[int, int, int]]:
    """``(shard, first pair, pairs)`` of the shards rank ``rank`` of ``world`` writes: ``s = rank, rank + world, ...``."""
    n_shards = math.ceil(num / shard_size)
    return [(s, s * shard_size, min(shard_size, num - s * shard_size)) for s in range(rank, n_shards, world)]


def _shard_rows(path: Path, first: int) -> int:
    """Pairs held by the shard file at ``path`` if it is readable and starts at pair ``first``, else 0."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return 0
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("first") != str(first):
                return 0
            return f.get_slice("noise").get_shape()[0]
    except SafetensorError:  # unreadable: written again
        return 0


def _identity(cfg, prompts: list[str], shape, timesteps) -> dict:
    """What decides the pairs' values; a folder's ``pairs.json`` must agree with it to be continued."""
    import hashlib

    m = cfg.model
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    return {"format": PAIRS_FORMAT, "model": "tiny" if m.tiny else m.path,
            "guidance_scale": m.guidance_scale, "uncond": m.uncond, "resolution": m.resolution,
            "frozen_dtype": m.frozen_dtype, "latent_shape": list(shape), "sampler": "ddim (EulerDiscrete, trailing)",
            "timesteps": list(timesteps), "num_prompts": len(prompts), "prompts_sha256": digest,
            "seed": cfg.train.seed, "shard_size": cfg.ode.shard_size}


def write_pairs(cfg, out: str | Path, info=None) -> Path:
    """``ode-pairs``: this rank's missing shards of ``cfg.ode.num`` pairs in ``out`` (module docstring)."""
    from safetensors.torch import save_file

    from ..core import CFGDenoiser
    from ..data.prompts import read_prompts
    from ..eval.samplers import ddim, euler_trailing_start, trailing_timesteps
    from ..models.sdxl import DTYPES, PromptEncoder, SDXLDenoiser, load_sdxl
    from ..models.sdxl_tiny import write_tiny_fixtures
    from ..train import derive_seed
    from ..train.distributed import DistInfo, barrier
    from .sdxl import base_path

    info = info or DistInfo()
    m, o = cfg.model, cfg.ode
    out = Path(out)
    prompts_path = cfg.data.prompts
    if m.tiny:  # the tiny preset's model and prompts (OUT/tiny-base, OUT/tiny-data)
        tiny = write_tiny_fixtures(cfg.train.out, m.resolution, seed=cfg.train.seed)
        prompts_path = prompts_path or str(tiny.prompts)
    if not prompts_path:
        raise ValueError("data.prompts is empty; expected a .txt / .jsonl / .parquet file of prompts for the ODE pairs")
    prompts = read_prompts(prompts_path, key=cfg.data.prompt_key or None)
    dev = info.device
    parts = load_sdxl(base_path(cfg), DTYPES[m.frozen_dtype], m.local_files_only,
                      components=("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
    shape = parts.latent_shape(m.resolution)
    timesteps = trailing_timesteps(o.teacher_steps, parts.schedule.num_train_timesteps)
    ident = _identity(cfg, prompts, shape, timesteps)
    index = out / "pairs.json"
    if index.is_file():
        old = json.loads(index.read_text())
        diff = sorted(k for k in ident if old.get(k) != ident[k])
        if diff:
            what = ", ".join(f"{k}: {old.get(k)!r} there, {ident[k]!r} now" for k in diff)
            raise ValueError(f"{out} holds pairs made with other settings ({what}); use a new folder or the same settings")
    elif info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        index.with_suffix(".tmp").write_text(json.dumps({**ident, "prompts_file": str(prompts_path)}, indent=2))
        os.replace(index.with_suffix(".tmp"), index)
    todo = [s for s in rank_shards(o.num, o.shard_size, info.rank, info.world_size)
            if _shard_rows(shard_path(out, s[0]), s[1]) != s[2]]
    if todo:
        for module in (parts.unet, parts.text_encoder, parts.text_encoder_2):
            module.to(dev)
        encoder = PromptEncoder(parts.tokenizer, parts.text_encoder, parts.tokenizer_2, parts.text_encoder_2)
        res = m.resolution
        teacher = CFGDenoiser(SDXLDenoiser(parts.unet, parts.schedule, parts.prediction_type, gan_layer=None),
                              m.guidance_scale, encoder.uncond(res, res, m.uncond))
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(derive_seed(cfg.train.seed, _PROMPT)))
        out.mkdir(parents=True, exist_ok=True)
    for s, first, count in todo:
        noise, latent, idx = [], [], []
        for b0 in range(first, first + count, o.batch):
            ids = range(b0, min(b0 + o.batch, first + count))
            z = torch.stack([torch.randn(shape, device=dev, generator=torch.Generator(dev).manual_seed(
                derive_seed(cfg.train.seed, i, _NOISE))) for i in ids])
            pi = [int(order[i % len(prompts)]) for i in ids]
            x = euler_trailing_start(z, parts.schedule, timesteps[0])
            x0 = ddim(teacher, x, encoder.cond([prompts[j] for j in pi], res, res), parts.schedule, timesteps)
            noise.append(z.cpu())
            latent.append(x0.cpu())
            idx += pi
        path = shard_path(out, s)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"noise": torch.cat(noise), "latent": torch.cat(latent), "prompt_index": torch.tensor(idx)},
                  str(tmp), metadata={"first": str(first), "prompts": json.dumps([prompts[j] for j in idx])})
        os.replace(tmp, path)
        print(f"rank {info.rank}: {path.name} ({count} pairs from {first})", file=sys.stderr, flush=True)
    barrier(info)
    return out


class ODEPairs(torch.utils.data.Dataset):
    """The first ``num`` pairs of an ``ode-pairs`` folder: ``pairs[i] -> (noise (C, h, w), latent (C, h, w), prompt)``.

    Raises ``ValueError`` for a folder without ``pairs.json``, a missing or partial shard before pair ``num``, or
    fewer than ``num`` pairs. Shards are read lazily (one row at a time)."""

    def __init__(self, folder: str | Path, num: int):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "pairs.json"
        if not index.is_file():
            raise ValueError(f"{self.folder}: no pairs.json; expected a folder written by "
                             "`python -m dmd2.recipes.sdxl ode-pairs`")
        self.info = json.loads(index.read_text())
        if self.info.get("format") != PAIRS_FORMAT:
            raise ValueError(f"{index}: format {self.info.get('format')!r}, expected {PAIRS_FORMAT!r}")
        self.shard_size, self.num = int(self.info["shard_size"]), num
        self.latent_shape = tuple(self.info["latent_shape"])
        self._files: dict[int, object] = {}
        self.prompts: list[str] = []
        for s, first, count in rank_shards(num, self.shard_size, 0, 1):
            path = shard_path(self.folder, s)
            if _shard_rows(path, first) < count:  # a full shard also serves a smaller num that ends inside it
                raise ValueError(f"{path}: missing or partial (pairs {first}..{first + count - 1} of ode.num={num}); "
                                 f"run ode-pairs {self.folder} --num {num} with the same settings to finish it")
            with safe_open(str(path), framework="pt") as f:
                self.prompts += json.loads(f.metadata()["prompts"])[:count]

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int):
        from safetensors import safe_open

        if not (0 <= i < self.num):
            raise IndexError(f"ODEPairs: index {i} outside [0, {self.num})")
        s, row = divmod(i, self.shard_size)
        if s not in self._files:
            self._files[s] = safe_open(str(shard_path(self.folder, s)), framework="pt")
        f = self._files[s]
        return f.get_slice("noise")[row], f.get_slice("latent")[row], self.prompts[i]


# ------------------------------------------------------------------------------------------------ LPIPS
def lpips_backbone_path(net: str, path: str = "") -> Path:
    """The trunk's torchvision weight file: ``path``, else torch's hub cache ``<hub>/checkpoints/<name>``."""
    return Path(path) if path else Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONES[net][0]


def build_lpips(net: str = "vgg", pretrained: bool = True, backbone: str = "") -> nn.Module:
    """A frozen ``lpips.LPIPS`` (v0.1, linear layers calibrated, from the package) that never downloads.

    ``pretrained``: the trunk's ImageNet weights from :func:`lpips_backbone_path` (``ValueError`` naming the file if
    it is absent); false: a random trunk (``pnet_rand``), for the CPU tests. Inputs: images in [-1, 1], ``(B, 3, H, W)``;
    output ``(B, 1, 1, 1)``.
    """
    try:
        import lpips
    except ImportError:
        raise ValueError("the LPIPS loss needs the lpips package: pip install -e '.[sdxl]' (or pip install lpips)") from None
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"LPIPS trunk must be one of {list(LPIPS_BACKBONES)}, got {net!r}")
    state = None
    if pretrained:
        path = lpips_backbone_path(net, backbone)
        if not path.is_file():
            name, url = LPIPS_BACKBONES[net]
            raise ValueError(f"LPIPS needs the {net} trunk's ImageNet weights {path} (missing; nothing is downloaded): "
                             f"fetch {url} there, or set ode.lpips_backbone=FILE (ode.lpips_pretrained=false: random trunk)")
        state = torch.load(path, map_location="cpu", weights_only=True)
    with warnings.catch_warnings():  # lpips builds its trunk with torchvision's deprecated `pretrained=False`
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
    if state is not None:  # lpips' slices keep torchvision's feature indices: net.sliceK.<i>.w <- features.<i>.w
        trunk = {n: state["features." + n.split(".", 1)[1]] for n in model.net.state_dict()}
        model.net.load_state_dict(trunk)
    model.requires_grad_(False)
    return model.eval()


# ------------------------------------------------------------------------------------------------ generator init
def generator_init_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder ``model.generator_init`` names: an ``ode-pretrain`` run folder (its newest checkpoint) or a
    checkpoint folder; ``ValueError`` naming the path otherwise (checked before any model is loaded)."""
    from ..train import resolve_checkpoint

    p = Path(path)
    if not p.exists():
        raise ValueError(f"model.generator_init={str(path)!r} does not exist; expected an ode-pretrain output (its run "
                         "folder or a checkpoint-XXXXXXXX folder holding generator.safetensors)")
    return resolve_checkpoint(p)


def load_generator_init(generator: nn.Module, ckpt: Path) -> None:
    """Load ``ckpt/generator.safetensors`` into a ``full``-mode generator, strictly."""
    from safetensors.torch import load_file

    sd = load_file(str(Path(ckpt) / "generator.safetensors"))
    try:
        missing, unexpected = generator.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ValueError(f"model.generator_init={str(ckpt)!r}: {str(e).splitlines()[0]} "
                         "(weights of another model?)") from None
    if missing or unexpected:
        raise ValueError(f"model.generator_init={str(ckpt)!r}: not this generator's weights (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); expected a full SDXL UNet from ode-pretrain")


# ------------------------------------------------------------------------------------------------ regression
def _decoder(cfg, parts):
    from ..models.sdxl import is_offline

    if not cfg.ode.vae:
        return parts.vae
    from diffusers import AutoencoderTiny

    local = is_offline(cfg.model.local_files_only)
    try:
        return AutoencoderTiny.from_pretrained(cfg.ode.vae, torch_dtype=torch.float32, local_files_only=local)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load ode.vae={cfg.ode.vae!r} (a diffusers AutoencoderTiny; '' uses the model's VAE): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def ode_pretrain(cfg, pairs: str | Path, info=None) -> Path:
    """``ode-pretrain``: regress the generator onto ``pairs`` (module docstring); returns the last checkpoint."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    from ..data.sdxl_images import vae_decode
    from ..models.sdxl import DTYPES, PromptEncoder, SDXLDenoiser, load_sdxl, unet_blocks
    from ..models.sdxl_tiny import write_tiny_fixtures
    from ..train import IndexedBatches
    from ..train.checkpoint import read_checkpoint, resolve_resume, write_checkpoint
    from ..train.config import config_to_json
    from ..train.distributed import DistInfo, all_reduce_mean, wrap_trained
    from ..train.monitor import RunMonitor
    from ..train.metrics import NonFiniteError
    from ..train.trainer import _adamw, warmup_factor
    from .sdxl import base_path, grid

    info = info or DistInfo()
    m, t = cfg.model, cfg.train
    if cfg.sampler.steps != 1:
        raise ValueError(f"ode-pretrain regresses the 1-step generator (its timestep is the 1-step grid's, 399); "
                         f"got sampler.steps={cfg.sampler.steps}: pass --steps 1 or --preset ode-paper")
    if t.distributed == "fsdp2":
        raise ValueError("ode-pretrain runs with train.distributed=none or ddp (the official regression used DDP)")
    (t_star,) = cfg.sampler.grid(grid)
    if m.tiny:
        write_tiny_fixtures(t.out, m.resolution, seed=t.seed)
    data = ODEPairs(pairs, cfg.ode.num)
    lp = build_lpips(cfg.ode.lpips_net, cfg.ode.lpips_pretrained, cfg.ode.lpips_backbone)  # before the UNet: fails fast
    parts = load_sdxl(base_path(cfg), torch.float32, m.local_files_only)
    shape = parts.latent_shape(m.resolution)
    if tuple(data.latent_shape) != shape:
        raise ValueError(f"{pairs}: latents of shape {data.latent_shape}, the model at model.resolution={m.resolution} "
                         f"makes {shape}")
    dev, frozen = info.device, DTYPES[m.frozen_dtype]
    for module in (parts.text_encoder, parts.text_encoder_2):
        module.to(dev, frozen)
    encoder = PromptEncoder(parts.tokenizer, parts.text_encoder, parts.tokenizer_2, parts.text_encoder_2)
    unet = parts.unet.float().requires_grad_(True).train()
    gen = SDXLDenoiser(unet, parts.schedule, parts.prediction_type, gan_layer=None)
    if t.grad_checkpointing:
        gen.enable_gradient_checkpointing()
    gen_w = wrap_trained(gen, info, t.mixed_precision, unet_blocks)
    params = [p for p in gen.parameters() if p.requires_grad]
    opt = _adamw(params, lr=t.lr_generator, betas=tuple(t.betas), eps=t.adam_eps, weight_decay=t.weight_decay)
    vae = _decoder(cfg, parts).to(dev).requires_grad_(False).eval()
    lp = lp.to(dev)

    def collate(items):
        return torch.stack([torch.stack([z, x]) for z, x, _ in items]), [c for _, _, c in items]

    accum, shards = t.grad_accum, info.world_size * t.grad_accum
    batches = IndexedBatches(data, shards=shards, batch=t.batch_size, seed=t.seed, collate=collate)
    out, step = Path(t.out), 0
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    resume = resolve_resume(out, t.resume)
    if resume is not None:
        weights, state, _ = read_checkpoint(resume)
        gen.load_state_dict(weights["generator"])
        set_optimizer_state_dict(gen, opt, state["optimizers"]["generator"], options=StateDictOptions(full_state_dict=True))
        step = int(state["step"])
    monitor = RunMonitor(out, info.is_main, step, t.max_steps, progress=t.progress)
    if info.is_main:
        (out / "config.json").write_text(config_to_json(cfg))
    res, last = m.resolution, None
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=t.mixed_precision == "bf16")
    acc = torch.zeros(2, device=dev)  # (sum of losses, count) over the log window
    bad = torch.zeros((), device=dev)  # > 0 once a loss or gradient norm was non-finite (checked on device)

    def check_finite():
        if float(all_reduce_mean(bad, info)) > 0:
            raise NonFiniteError(f"non-finite loss_lpips or grad_norm_generator by iteration {step - 1}; the last good "
                                 f"checkpoint in {out / 'checkpoints'} is untouched")

    try:
        while step < t.max_steps:
            for micro in range(accum):
                pair, prompts = batches(step, info.rank * accum + micro, t.batch_size, dev)
                noise, target = pair[:, 0], pair[:, 1]
                ts = parts.schedule.time_tensor(t_star, noise.shape[0], dev)
                sync = micro == accum - 1 or info.mode != "ddp"  # DDP reduces gradients on the last micro-batch only
                with contextlib.nullcontext() if sync else gen_w.no_sync():
                    with autocast:
                        x0 = gen_w(noise, ts, encoder.cond(prompts, res, res))
                    with torch.no_grad():
                        ref = vae_decode(vae, target)
                    loss = lp(vae_decode(vae, x0), ref).mean()  # fp32: decoder and LPIPS outside autocast
                    (loss / accum).backward()
                acc += torch.stack([loss.detach(), torch.ones((), device=dev)])
                bad += (~torch.isfinite(loss.detach())).float()
            lr = t.lr_generator * warmup_factor(step, t.warmup_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else math.inf, foreach=True)
            bad += (~torch.isfinite(norm)).float()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            monitor.advance()
            if step % t.log_every == 0 or step == t.max_steps:
                check_finite()
                mean_loss, norm_v = all_reduce_mean(torch.stack([acc[0] / acc[1], norm.float()]), info).tolist()
                monitor.log(step, {"loss_lpips": mean_loss, "grad_norm_generator": norm_v, "lr_generator": lr})
                acc.zero_()
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                check_finite()
                if info.is_main:
                    state = {"step": step, "world_size": info.world_size,
                             "optimizers": {"generator": get_optimizer_state_dict(gen, opt, options=opts)}}
                    sd = {k: v.detach().cpu() for k, v in gen.state_dict().items()}
                    last = write_checkpoint(out, step, {"generator": sd}, state, config_to_json(cfg), keep_last=t.keep_last)
                if info.distributed:
                    torch.distributed.barrier()
    finally:
        monitor.close()
    return last


# ------------------------------------------------------------------------------------------------ commands
def _in_job(cfg, work) -> int:
    """Join the torchrun job if any, seed, ``work(info)`` on every rank, leave the job; rank 0 prints the result
    (the folder written)."""
    from ..train.distributed import init_distributed

    info = init_distributed(cfg.train.distributed, cfg.train.device)
    try:
        torch.manual_seed(cfg.train.seed)
        result = work(info)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if info.is_main:
        print(result)
    return 0


def ode_pairs_command(cfg, args: list[str]) -> int:
    """``ode-pairs OUT [--num N]``: teacher ODE pairs into OUT (resumable; one shard set per torchrun rank)."""
    from ..train.config import apply_overrides

    if len(args) != 1:
        raise ValueError("usage: python -m dmd2.recipes.sdxl ode-pairs OUT [--num N] [--preset ode-paper] data.prompts=...")
    cfg = apply_overrides(cfg, {"train.out": args[0]})  # the tiny preset writes its base model inside OUT
    return _in_job(cfg, lambda info: write_pairs(cfg, args[0], info))


def ode_pretrain_command(cfg, args: list[str]) -> int:
    """``ode-pretrain PAIRS [--out OUT]``: the LPIPS regression; OUT is what ``model.generator_init`` takes."""
    if len(args) != 1:
        raise ValueError("usage: python -m dmd2.recipes.sdxl ode-pretrain PAIRS --preset ode-paper [--out OUT] "
                         "(PAIRS: an ode-pairs folder)")
    return _in_job(cfg, lambda info: ode_pretrain(cfg, args[0], info))
