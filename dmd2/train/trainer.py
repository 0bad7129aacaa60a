r"""The one DMD2 training loop (Yin et al. 2024, Sec. 4): every recipe builds :class:`Components` and runs
:class:`Trainer`.

One iteration ``s`` (``train.max_steps`` counts them, docs/design.md "Iteration"):

1. when ``s % critic.ratio == 0``: a generator update - fake score and GAN head frozen, ``grad_accum`` micro-batches
   of :meth:`DMD2.generator_loss`, gradient clipping, AdamW step, EMA update;
2. always: a critic update - generator frozen, :meth:`DMD2.critic_loss` on generator samples and real images,
   clipping, AdamW step on the fake score + GAN head. The samples: on a generator turn, that turn's detached,
   pre-update output of the same micro-batch (with its conditions and ``k``; the official code's choice), else
   fresh ones (``objective.critic_fresh_samples=true``: fresh ones on every iteration).

Randomness is keyed, not carried: the noise, times and re-noises of micro-batch ``m`` on rank ``r`` come from a
generator seeded by ``(seed, s, phase, shard)`` with the global shard index ``shard = r * grad_accum + m`` (with
``objective.fused_ops``, the Philox noise offset is keyed the same way); the
backward-simulation step ``k`` from ``(seed, s, phase)`` (so every rank agrees on it without communication). Hence
a run is a function of (config, step): it resumes bit-exactly, and ``W`` ranks with ``grad_accum = A`` compute the
same updates as one process with ``grad_accum = W * A`` (up to reduction order). Real data are requested by
``(step, shard)`` too.

Non-finite values: every loss term and both gradient norms are tracked on device (no sync); the first iteration
and term that went NaN/inf are read at each log interval and before every checkpoint, and the run stops with
:class:`NonFiniteError` naming them, leaving the last good checkpoint untouched.
"""
from __future__ import annotations

import contextlib
import math
import resource
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..core import DMD2, EMA, BackwardSimulationSampler, CriticScheduler, GANHead, NoiseSchedule
from . import checkpoint as ckpt
from .config import RecipeConfig, config_to_dict, config_to_json
from .distributed import DistInfo, Trainable, all_reduce_mean, any_rank, shard_frozen, wrap_trained
from .monitor import RunMonitor

__all__ = ["Components", "Trainer", "NonFiniteError", "derive_seed"]

_GEN, _CRITIC, _K = 1, 2, 3
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*values: int) -> int:
    """A 63-bit seed from a tuple of ints (SplitMix64 chained): distinct tuples give unrelated streams."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h & ((1 << 63) - 1)


class NonFiniteError(RuntimeError):
    """A loss term or gradient norm became NaN or inf; the message names the iteration and the term."""


@dataclass
class Components:
    """What a recipe hands the trainer (all on CPU or any device; the trainer moves and wraps them).

    Attributes:
        generator: the student ``G(x_t, t, cond) -> x0`` (trained).
        fake_score: ``D_fake(x_t, t, cond) -> x0`` (trained by the critic update).
        teacher: ``D_real(x_t, t, cond) -> x0``, frozen (wrap in :class:`~dmd2.core.CFGDenoiser` for guidance).
        schedule, sampler: the noise schedule and the student's grid (:class:`~dmd2.core.BackwardSimulationSampler`).
        latents: ``latents(batch, generator, device) -> (noise (batch, ...) unit Gaussian, cond)`` - the generator's
            inputs; draw everything from ``generator`` (a ``torch.Generator`` on ``device``).
        real_data: ``real_data(step, shard, batch, device) -> (images (batch, ...), cond)``, needed with a GAN head;
            ``shard`` in ``[0, world * grad_accum)`` is the global micro-batch index: shards of one step must be
            disjoint, and a pure function of ``(step, shard)`` resumes exactly (:mod:`dmd2.train.data` helps).
        gan_head, gan_layers: optional :class:`~dmd2.core.GANHead` and the ``fake_score`` submodule names it reads.
        sample_fn: optional ``sample_fn(generator_module, device) -> images (N, C, H, W) in [-1, 1]`` for PNG grids;
            called on every rank (collectives under FSDP2), under no-grad.
        sample_rows: optional labels of the sample grid's rows (e.g. the class of each row); ``sample_fn`` then returns
            ``len(sample_rows)`` rows of ``N / len(sample_rows)`` images, row after row.
        fsdp_units: optional ``module -> submodules`` to ``fully_shard`` before the root (e.g. UNet blocks).
        checkpoint_units: optional ``module -> submodules`` whose activations are recomputed when
            ``train.grad_checkpointing`` (diffusers models use their own ``enable_gradient_checkpointing``).
    """

    generator: nn.Module
    fake_score: nn.Module
    teacher: Callable
    schedule: NoiseSchedule
    sampler: BackwardSimulationSampler
    latents: Callable[[int, torch.Generator, torch.device], tuple[torch.Tensor, Any]]
    real_data: Callable[[int, int, int, torch.device], tuple[torch.Tensor, Any]] | None = None
    gan_head: GANHead | None = None
    gan_layers: Sequence[str] = ()
    sample_fn: Callable[[nn.Module, torch.device], torch.Tensor] | None = None
    sample_rows: Sequence[str] = ()
    fsdp_units: Callable[[nn.Module], Iterable[nn.Module]] | None = None
    checkpoint_units: Callable[[nn.Module], Iterable[nn.Module]] | None = None


def _checkpointed(module: nn.Module) -> None:
    """Recompute ``module``'s activations in backward (non-reentrant ``torch.utils.checkpoint``)."""
    from torch.utils.checkpoint import checkpoint

    inner = module.forward

    def forward(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    module.forward = forward


def _enable_grad_checkpointing(module: nn.Module, units) -> None:
    if units is not None:
        for u in units(module):
            _checkpointed(u)
    elif hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()
    else:
        raise ValueError(f"train.grad_checkpointing=true but {type(module).__name__} has no enable_gradient_checkpointing() "
                         "and the recipe gave no Components.checkpoint_units")


def _compile_blocks(modules: Iterable[Any], units) -> None:
    """``torch.compile`` the ``forward`` of each block ``units(module)`` returns (the whole module when it returns
    none): module hooks run in eager mode around the compiled code (FeatureHooks' taps and stop, FSDP2's unshard /
    reshard, DDP's reducer on the parameters), and activation checkpointing wraps the compiled forward. Blocks shared
    between networks (LoRA modes) are compiled once.

    Static shapes (``dynamic=False``): the batch takes a few values per run (B, the 2B of the critic's GAN pass and of
    CFG), each compiled once; with automatic dynamic shapes inductor failed on CPU (torch 2.14.1, ADM blocks:
    "cannot determine truth value of Relational: 32*s0*s53 < 32"). The blocks of one class share one code object, so Dynamo's
    per-code-object recompile limit is raised to hold every (block shape, batch, grad mode) variant (a process-wide
    setting, never lowered)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.cache_size_limit = max(cfg.cache_size_limit, 256)
    cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 1024)
    done: set[int] = set()
    for module in modules:
        if not isinstance(module, nn.Module):
            continue
        for u in (list(units(module)) if units is not None else []) or [module]:
            if id(u) not in done:
                done.add(id(u))
                u.forward = torch.compile(u.forward, dynamic=False)


def _local(t):
    """A DTensor's full value (collective), else the tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _check_fits(module, sd: dict[str, torch.Tensor], file: Path) -> None:
    """``ValueError`` naming ``file`` unless ``sd`` has exactly ``module.state_dict()``'s names and shapes."""
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in sd.items()}
    if ours == theirs:
        return
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    shapes = [f"{k} {theirs[k]} vs {ours[k]}" for k in sorted(set(ours) & set(theirs)) if ours[k] != theirs[k]]
    raise ValueError(f"{file} does not fit this run's {type(module).__name__} (a checkpoint of another recipe or "
                     f"width?): missing {missing[:3]} ({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)}), "
                     f"shapes (file vs run) {shapes[:3]} ({len(shapes)})")


def _adamw(params, **kw) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel (one pass over every parameter: on CPU about 8x faster than the per-tensor
    loop for a network of ~150 small tensors) when every parameter is a floating-point CPU / CUDA tensor; the default
    implementation otherwise. Same update rule either way."""
    params = list(params)
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **kw)


class Trainer:
    """Runs DMD2 under the critic scheduler (see the module docstring).

    Args:
        cfg: the resolved :class:`~dmd2.train.config.RecipeConfig` (or a subclass).
        components: what the recipe built.
        info: from :func:`~dmd2.train.distributed.init_distributed`.
        out: the run folder (checkpoints, logs, samples); defaults to ``cfg.train.out``.
        recipe: the recipe's module name, recorded in every ``config.json`` (:func:`dmd2.train.load_generator`).
    """

    def __init__(self, cfg: RecipeConfig, components: Components, info: DistInfo | None = None, out: str | Path | None = None,
                 recipe: str = ""):
        self.cfg, self.c, self.recipe = cfg, components, recipe
        self.info = info or DistInfo()
        t = cfg.train
        self.out = Path(out or t.out or "runs/dmd2")
        if t.distributed != self.info.mode:
            raise ValueError(f"train.distributed={t.distributed} but the process group was set up for {self.info.mode}")
        if components.gan_head is not None and components.real_data is None:
            raise ValueError("Components: a GAN head needs real_data (the discriminator's real images)")
        dev = self.info.device
        self.device = dev
        self.autocast = t.mixed_precision == "bf16"
        self.accum = t.grad_accum

        gen, fake, head = components.generator, components.fake_score, components.gan_head
        self.gen_trainable = Trainable([gen])  # the trainable names, taken before wrapping
        self.critic_trainable = Trainable([fake, head])
        if not self.gen_trainable.names[0] or not self.critic_trainable.names[0]:
            raise ValueError("Components: the generator and the fake score need trainable parameters (requires_grad=True)")
        if t.compile:
            _compile_blocks([gen, fake, components.teacher], components.checkpoint_units or components.fsdp_units)
            _compile_blocks([head], None)
        if t.grad_checkpointing:
            _enable_grad_checkpointing(gen, components.checkpoint_units)
            _enable_grad_checkpointing(fake, components.checkpoint_units)
        self.gen_w = wrap_trained(gen, self.info, t.mixed_precision, components.fsdp_units)
        self.fake_w = wrap_trained(fake, self.info, t.mixed_precision, components.fsdp_units)
        self.head_w = wrap_trained(head, self.info, t.mixed_precision) if head is not None else None
        self.gen, self.fake, self.head = gen, fake, head  # raw modules (== wrapped ones except under DDP)
        teacher = components.teacher
        if isinstance(teacher, nn.Module):
            teacher = shard_frozen(teacher, self.info, components.fsdp_units)
        self.teacher = teacher
        self.critic_modules = nn.ModuleDict({"fake_score": fake, **({"gan_head": head} if head is not None else {})})

        ddp = self.info.mode == "ddp"
        layers = list(components.gan_layers)
        oc = cfg.objective
        # generator phase: trained generator through its wrapper; frozen critic called raw (no DDP hooks armed)
        self.obj_gen = DMD2(self.gen_w, fake, teacher, components.schedule, components.sampler, head,
                            layers if head is not None else None, oc)
        if ddp:  # critic phase: trained critic through DDP; frozen generator raw
            self.obj_critic = DMD2(gen, self.fake_w, teacher, components.schedule, components.sampler, self.head_w,
                                   ["module." + n for n in layers] if head is not None else None, oc)
        else:
            self.obj_critic = self.obj_gen

        wd, betas, eps = t.weight_decay, tuple(t.betas), t.adam_eps
        self.opt_gen = _adamw(self.gen_trainable.parameters(), lr=t.lr_generator, betas=betas, eps=eps,
                              weight_decay=wd)
        self.opt_critic = _adamw(self.critic_trainable.parameters(), lr=t.lr_critic, betas=betas, eps=eps,
                                 weight_decay=wd)
        self.ema = EMA(gen, t.ema_decay) if t.ema_decay is not None else None
        self.scheduler = CriticScheduler(cfg.critic.ratio)
        self.step = 0
        self._acc: dict[str, torch.Tensor] = {}
        self._cnt: dict[str, int] = {}
        self._bad: dict[str, torch.Tensor] = {}
        self._stop_signal = 0  # the number of the signal that asked the run to stop
        #: after :meth:`train`: the number of the signal (SIGTERM / SIGINT) that interrupted it, else None
        self.interrupted: int | None = None
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self.monitor: RunMonitor | None = None

    # -- randomness --------------------------------------------------------------------------------------------
    def _rng(self, step: int, phase: int, shard: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(derive_seed(self.cfg.train.seed, step, phase, shard))
        return g

    def draw_k(self, step: int, phase: int) -> int:
        """The backward-simulation step of ``(step, phase)``: identical on every rank by construction."""
        g = torch.Generator().manual_seed(derive_seed(self.cfg.train.seed, step, phase, _K))
        return self.c.sampler.draw_k(g)

    def _key_noise_stream(self, step: int, phase: int, shard: int) -> None:
        """With ``objective.fused_ops`` the objective's noise is the Philox stream ``(noise_seed, noise_offset)``:
        start each micro-batch at an offset keyed like the torch generators (a random block start in
        ``[0, 2**61)``, far from every other block with overwhelming probability)."""
        if self.cfg.objective.fused_ops:
            offset = derive_seed(self.cfg.train.seed, step, phase, shard, _K + 1) >> 2
            self.obj_gen.noise_offset = offset
            self.obj_critic.noise_offset = offset

    def _shard(self, micro: int) -> int:
        return self.info.rank * self.accum + micro

    # -- helpers -----------------------------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        """Constant with linear warmup: ``min(1, (step + 1) / warmup_steps)``."""
        w = self.cfg.train.warmup_steps
        return 1.0 if w == 0 else min(1.0, (step + 1) / w)

    def _no_sync(self, wrapped: Sequence[nn.Module], last: bool):
        """Skip gradient synchronisation on all but the last micro-batch."""
        stack = contextlib.ExitStack()
        if last:
            return stack
        for m in wrapped:
            if m is None:
                continue
            if self.info.mode == "ddp" and hasattr(m, "no_sync"):
                stack.enter_context(m.no_sync())
            elif self.info.mode == "fsdp2" and hasattr(m, "set_requires_gradient_sync"):
                m.set_requires_gradient_sync(False)
                stack.callback(m.set_requires_gradient_sync, True)
        return stack

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def _track(self, name: str, value: torch.Tensor, tick: int) -> None:
        """Accumulate a logged value and remember the first ``tick`` (``2 * step + phase``) it was non-finite."""
        v = value.detach().float().reshape(())
        if v.device != self.device:
            v = v.to(self.device)
        bad = self._bad.get(name)
        if bad is None:
            bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self._bad[name] = torch.where((bad < 0) & ~torch.isfinite(v), torch.full_like(bad, tick), bad)
        self._acc[name] = self._acc.get(name, torch.zeros((), device=self.device)) + v
        self._cnt[name] = self._cnt.get(name, 0) + 1

    def _clip(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        clip = self.cfg.train.grad_clip
        params = [p for p in params if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf, foreach=True)
        return _local(norm)

    # -- one update each ---------------------------------------------------------------------------------------
    def _generator_update(self, step: int) -> list[tuple[Any, Any]]:
        """The generator update; returns each micro-batch's ``(Samples, cond)`` for the critic update."""
        self.critic_trainable.set(False)
        self.gen_trainable.set(True)
        k = self.draw_k(step, _GEN)
        logs_sum: dict[str, torch.Tensor] = {}
        made = []
        for m in range(self.accum):
            g = self._rng(step, _GEN, self._shard(m))
            self._key_noise_stream(step, _GEN, self._shard(m))
            noise, cond = self.c.latents(self.cfg.train.batch_size, g, self.device)
            with self._no_sync([self.gen_w], m == self.accum - 1):
                with self._autocast():
                    loss, logs = self.obj_gen.generator_loss(noise, cond, k=k, generator=g)
                (loss / self.accum).backward()
            made.append((self.obj_gen.last_samples, cond))
            for n, v in logs.items():
                if n != "k":
                    logs_sum[n] = logs_sum.get(n, 0) + v.float() / self.accum
        for group in self.opt_gen.param_groups:
            group["lr"] = self.cfg.train.lr_generator * self.lr_factor(step)
        norm = self._clip(self.gen_trainable.parameters())
        self.opt_gen.step()
        self.opt_gen.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.gen)
        for n, v in logs_sum.items():
            self._track(n, v, 2 * step)
        self._track("grad_norm_generator", norm, 2 * step)
        return made

    def _critic_update(self, step: int, made: Sequence[tuple[Any, Any]] | None = None) -> None:
        """The critic update, on ``made`` (the generator turn's per-micro-batch samples) when given, else on fresh
        samples."""
        self.gen_trainable.set(False)
        self.critic_trainable.set(True)
        k = self.draw_k(step, _CRITIC)
        logs_sum: dict[str, torch.Tensor] = {}
        b = self.cfg.train.batch_size
        for m in range(self.accum):
            shard = self._shard(m)
            g = self._rng(step, _CRITIC, shard)
            self._key_noise_stream(step, _CRITIC, shard)
            samples = None
            if made is None:
                noise, cond = self.c.latents(b, g, self.device)
            else:
                (samples, cond), noise = made[m], None
            real, real_cond = (self.c.real_data(step, shard, b, self.device) if self.c.real_data is not None and self.head is not None
                               else (None, None))
            with self._no_sync([self.fake_w, self.head_w], m == self.accum - 1):
                with self._autocast():
                    loss, logs = self.obj_critic.critic_loss(noise, cond, real, real_cond, k=k, generator=g,
                                                             samples=samples)
                (loss / self.accum).backward()
            for n, v in logs.items():
                logs_sum[n] = logs_sum.get(n, 0) + v.float() / self.accum
        for group in self.opt_critic.param_groups:
            group["lr"] = self.cfg.train.lr_critic * self.lr_factor(step)
        norm = self._clip(self.critic_trainable.parameters())
        self.opt_critic.step()
        self.opt_critic.zero_grad(set_to_none=True)
        for n, v in logs_sum.items():
            self._track(n, v, 2 * step + 1)
        self._track("grad_norm_critic", norm, 2 * step + 1)

    def train_step(self) -> None:
        """One iteration (see the module docstring)."""
        phase = self.scheduler.next()
        if phase.step != self.step:
            raise RuntimeError(f"critic scheduler at {phase.step} but trainer at {self.step}")
        made = self._generator_update(self.step) if phase.generator else None
        self._critic_update(self.step, None if self.cfg.objective.critic_fresh_samples else made)
        self.step += 1

    # -- checks and logs ---------------------------------------------------------------------------------------
    def check_finite(self) -> None:
        """Raise :class:`NonFiniteError` if any tracked term went non-finite (one host sync)."""
        if not self._bad:
            return
        names = sorted(self._bad)
        bad = torch.stack([self._bad[n] for n in names])
        if self.info.distributed:
            bad = bad.clone()
            big = torch.iinfo(torch.long).max
            bad = torch.where(bad < 0, torch.full_like(bad, big), bad)  # earliest tick over ranks
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            bad = torch.where(bad == big, torch.full_like(bad, -1), bad)
        vals = bad.tolist()
        # first in time (generator phase before critic phase); within a phase the loss terms before their sums,
        # logits and gradient norms, which a NaN term makes NaN in the same phase
        def rank(n):
            return 3 if n.startswith("grad_norm") else 1 if n in ("loss_g", "loss_critic") else 0 if n.startswith("loss") else 2

        hits = sorted((tick, rank(n), n) for tick, n in zip(vals, names) if tick >= 0)
        if hits:
            tick, _, n = hits[0]
            phase = "generator" if tick % 2 == 0 else "critic"
            raise NonFiniteError(f"non-finite {n} at iteration {tick // 2} ({phase} update; 0-based; all: "
                                 f"{', '.join(f'{m}@{t // 2}' for t, _, m in hits)}); "
                                 f"the last good checkpoint in {self.out / 'checkpoints'} is untouched")

    def _log(self) -> None:
        names = sorted(n for n in self._acc if self._cnt.get(n, 0) > 0)
        if names:
            means = torch.stack([self._acc[n] / self._cnt[n] for n in names])
            means = all_reduce_mean(means, self.info).tolist()
        else:
            means = []
        self.check_finite()
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        t = self.cfg.train
        rec = dict(zip(names, means))
        rec["lr_generator"] = t.lr_generator * self.lr_factor(self.step - 1)
        rec["lr_critic"] = t.lr_critic * self.lr_factor(self.step - 1)
        rec["samples_per_s"] = self._window_steps * t.batch_size * self.accum * self.info.world_size / elapsed
        rec["it_per_s"] = self._window_steps / elapsed
        if self.device.type == "cuda":
            rec["peak_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            rec["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.monitor.log(self.step, rec)
        for n in self._acc:
            self._acc[n] = torch.zeros((), device=self.device)
            self._cnt[n] = 0
        self._window_start, self._window_steps = time.perf_counter(), 0

    @torch.no_grad()
    def samples(self) -> torch.Tensor | None:
        """A sample grid from the current generator (all ranks call; rank 0 writes the PNG)."""
        if self.c.sample_fn is None:
            return None
        was = self.gen.training
        self.gen.eval()
        with self._autocast():
            imgs = self.c.sample_fn(self.gen, self.device)
        self.gen.train(was)
        self.monitor.samples(self.step, imgs.float(), self.c.sample_rows)
        return imgs

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _model_sd(self, module: nn.Module) -> dict[str, torch.Tensor]:
        if self.info.mode == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def _optim_sd(self, module: nn.Module, opt) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(module, opt, options=opts)

    def _gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """``(n,)`` per-rank values -> ``(world, n)`` on CPU."""
        if not self.info.distributed:
            return row[None].cpu()
        out = [torch.empty_like(row) for _ in range(self.info.world_size)]
        dist.all_gather(out, row)
        return torch.stack(out).cpu()

    def checkpoint_format(self) -> str:
        """``train.checkpoint_format`` resolved: ``auto`` is ``sharded`` under FSDP2, ``full`` otherwise."""
        fmt = self.cfg.train.checkpoint_format
        return ("sharded" if self.info.mode == "fsdp2" else "full") if fmt == "auto" else fmt

    def _trained_modules(self) -> dict[str, nn.Module]:
        return {"generator": self.gen, "fake_score": self.fake, **({"gan_head": self.head} if self.head is not None else {})}

    def _optimizers(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        return {"generator": (self.gen, self.opt_gen), "critic": (self.critic_modules, self.opt_critic)}

    def state_dict(self) -> tuple[dict, dict]:
        """``(weights, state)`` of a ``full`` checkpoint; collective under DDP/FSDP2 (rank 0's copy is complete)."""
        weights = {name: self._model_sd(m) for name, m in self._trained_modules().items()}
        if self.ema is not None:
            weights["ema"] = {k: _local(v).detach().cpu().clone() for k, v in self.ema.state_dict().items()}
        state = self._run_state()
        state["optimizers"] = {name: self._optim_sd(m, opt) for name, (m, opt) in self._optimizers().items()}
        return weights, state

    def _run_state(self) -> dict:
        """What ``state.pt`` holds besides the optimizers (collective: every rank's RNG state and log sums)."""
        names = sorted(self._acc)
        acc = torch.stack([self._acc[n] for n in names]) if names else torch.zeros(0, device=self.device)
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rng_rows = self._gather_rows(torch.cat([v.to(self.device) for v in rng.values()]))
        return {
            "step": self.step,
            "world_size": self.info.world_size,
            "critic_scheduler": self.scheduler.state_dict(),
            "rng": {"keys": list(rng), "sizes": [v.numel() for v in rng.values()], "per_rank": rng_rows},
            "log": {"names": names, "acc": self._gather_rows(acc), "cnt": [self._cnt[n] for n in names],
                    "window_steps": self._window_steps},
        }

    def save(self) -> Path | None:
        """Write ``checkpoint-{step:08d}`` (after a finiteness check) in :meth:`checkpoint_format`; returns its path
        on rank 0. ``sharded``: every rank writes its shards (:mod:`dmd2.train.sharded`), nothing is gathered."""
        self.check_finite()
        path = None
        if self.checkpoint_format() == "sharded":
            from . import sharded

            tensors, groups = sharded.sharded_tensors(self._trained_modules(), self._optimizers(), self.ema)
            state = self._run_state()
            state["optimizers"] = {name: {"param_groups": g} for name, g in groups.items()}
            if self.info.is_main:
                ckpt.begin_checkpoint(self.out, self.step)
            if self.info.distributed:
                dist.barrier()
            sharded.save_sharded(ckpt.tmp_checkpoint_path(self.out, self.step), tensors)
            if self.info.is_main:
                path = ckpt.commit_checkpoint(self.out, self.step, state, config_to_json(self.cfg, self.recipe),
                                              keep_last=self.cfg.train.keep_last)
        else:
            weights, state = self.state_dict()
            if self.info.is_main:
                path = ckpt.write_checkpoint(self.out, self.step, weights, state, config_to_json(self.cfg, self.recipe),
                                             keep_last=self.cfg.train.keep_last)
        if self.info.distributed:
            dist.barrier()
        return path

    def load(self, path: str | Path) -> None:
        """Restore everything from a checkpoint folder of either format (any world size). A ``sharded`` one fills
        each rank's shards from the pieces that overlap them; a ``full`` one is read whole on every rank."""
        from . import sharded

        if sharded.is_sharded(path):
            ckpt.verify_checkpoint(path, checksums=False)  # sizes; --resume verified the checksums
            state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
            sharded.load_sharded(path, state, self._trained_modules(), self._optimizers(), self.ema)
        else:
            state = self._load_full(path)
        self._load_run_state(state)

    def _load_full(self, path: str | Path) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        weights, state, _ = ckpt.read_checkpoint(path)
        fsdp = self.info.mode == "fsdp2"
        opts = StateDictOptions(full_state_dict=True)
        for name, module in self._trained_modules().items():
            if name not in weights:
                raise ValueError(f"{path}: missing {name}.safetensors")
            _check_fits(module, weights[name], Path(path) / f"{name}.safetensors")
            if fsdp:
                set_model_state_dict(module, weights[name], options=opts)
            else:
                module.load_state_dict(weights[name])
        if self.ema is not None:
            if "ema" not in weights:
                raise ValueError(f"{path}: missing ema.safetensors (train.ema_decay is set)")
            _check_fits(self.ema, weights["ema"], Path(path) / "ema.safetensors")
            self._load_ema(weights["ema"])
        for name, (module, opt) in self._optimizers().items():
            set_optimizer_state_dict(module, opt, state["optimizers"][name], options=opts)
        return state

    def _load_run_state(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["critic_scheduler"])
        self.step = int(state["step"])
        same_world = int(state["world_size"]) == self.info.world_size
        rng = state["rng"]
        row = rng["per_rank"][self.info.rank] if same_world else None
        if row is not None:
            off = 0
            for key, size in zip(rng["keys"], rng["sizes"]):
                part = row[off: off + size].to(torch.uint8).clone()  # a fresh tensor: set_rng_state misreads offset views
                off += size
                if key == "cpu":
                    torch.set_rng_state(part)
                elif key == "cuda" and self.device.type == "cuda":
                    torch.cuda.set_rng_state(part, self.device)
        else:
            torch.manual_seed(derive_seed(self.cfg.train.seed, self.step, self.info.rank))
        log = state["log"]
        acc = log["acc"][self.info.rank] if same_world else log["acc"].mean(0)
        self._acc = {n: acc[i].to(self.device) for i, n in enumerate(log["names"])}
        self._cnt = dict(zip(log["names"], log["cnt"]))
        self._window_steps = int(log["window_steps"])

    def _load_ema(self, sd: dict[str, torch.Tensor]) -> None:
        params = dict(self.gen.named_parameters())
        local = {}
        for k, v in sd.items():
            p = params.get(k)
            if p is not None and hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                v = distribute_tensor(v.to(self.device), p.device_mesh, p.placements)
            local[k] = v
        self.ema.load_state_dict(local)

    # -- the loop ---------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if self._stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self._stop_signal = signum

    def train(self, resume: str | Path | None = None) -> Path | None:
        """Run to ``train.max_steps`` (resuming from ``resume``, a checkpoint folder, if given).

        Rank 0 holds the run folder's lock (:func:`~dmd2.train.checkpoint.hold_run_folder`) throughout and first
        deletes stale ``.tmp`` / ``.trash`` checkpoint folders. Checkpoints every ``checkpoint_every`` iterations and at
        ``max_steps``. On SIGTERM or SIGINT (a second SIGINT raises ``KeyboardInterrupt`` at once) the iteration in
        progress finishes, a checkpoint is written, and it returns without sampling; :attr:`interrupted` is then the
        signal's number (``None`` after a complete run), and :func:`~dmd2.train.run_training` exits with
        ``128 + signal`` (143 for SIGTERM, 130 for SIGINT) so that nothing runs after an interrupted run.
        Returns the last checkpoint's path (rank 0).
        """
        t = self.cfg.train
        self.interrupted = None
        with contextlib.ExitStack() as stack:
            if self.info.is_main:
                stack.enter_context(ckpt.hold_run_folder(self.out))
                ckpt.remove_stale(self.out)
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT):
                    stack.callback(signal.signal, sig, signal.signal(sig, self._on_signal))
            if resume is not None:
                self.load(resume)
            self.monitor = RunMonitor(self.out, self.info.is_main, self.step, t.max_steps, progress=t.progress,
                                      loggers=t.logger_names(), config=config_to_dict(self.cfg))
            stack.callback(self.monitor.close)
            if self.info.is_main:
                (self.out / "config.json").write_text(config_to_json(self.cfg, self.recipe))
                if resume is not None:
                    self.monitor.write(f"resumed from {resume} at iteration {self.step}")
            return self._loop()

    def _loop(self) -> Path | None:
        t = self.cfg.train
        last = None
        self._window_start = time.perf_counter()
        while self.step < t.max_steps:
            self.train_step()
            self._window_steps += 1
            self.monitor.advance()
            s = self.step
            if s % t.log_every == 0 or s == t.max_steps:
                self._log()
            stop = any_rank(bool(self._stop_signal), self.info)
            if t.sample_every and s % t.sample_every == 0 and not stop:
                self.samples()
            if s % t.checkpoint_every == 0 or s == t.max_steps or stop:
                last = self.save()
            if stop:
                self.interrupted = int(self._stop_signal or signal.SIGTERM)  # SIGTERM: the signal went to another rank
                self.monitor.write(f"{signal.Signals(self.interrupted).name}: checkpoint written at iteration {s}; "
                                   f"stopping (exit code {128 + self.interrupted})")
                return last
        if any_rank(bool(self._stop_signal), self.info):  # the signal came during the last iteration's checkpoint
            self.interrupted = int(self._stop_signal or signal.SIGTERM)
        return last
