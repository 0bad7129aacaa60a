r"""The one DMD2 training loop (Yin et al. 2024, Sec. 4): every recipe builds :class:`Components` and runs
:class:`Trainer`.

One iteration ``s`` (``train.max_steps`` counts them, docs/design.md "Iteration"):

1. when ``s % critic.ratio == 0``: a generator update - fake score and GAN head frozen, ``grad_accum`` micro-batches
   of :meth:`DMD2.generator_loss`, gradient clipping, AdamW step, EMA update;
2. always: a critic update - generator frozen, :meth:`DMD2.critic_loss` on generator samples and real images,
   clipping, AdamW step on the fake score + GAN head. The samples: on a generator turn, that turn's detached,
   pre-update output of the same micro-batch (with its conditions and ``k``; the official code's choice), else
   fresh ones (``objective.critic_fresh_samples=true``: fresh ones on every iteration).

One :class:`~dmd2.core.DMD2` objective serves both updates, pointed at each update's networks
(:meth:`Trainer.objective_for`). The rest lives with its idea: keyed randomness (every draw of micro-batch ``m`` on
rank ``r`` keyed by ``(seed, s, phase, r * grad_accum + m)``, so a run resumes bit-exactly and ``W`` ranks equal one
process with ``W`` times the accumulation) in :mod:`dmd2.train.randomness`; logged values and the NaN/inf stop in
:mod:`dmd2.train.metrics`; what a checkpoint holds in :mod:`dmd2.train.state`; compile, activation checkpointing and
DDP / FSDP2 wrapping in :mod:`dmd2.train.wrapping`. Real data are requested by ``(step, shard)``.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..core import DMD2, EMA, BackwardSimulationSampler, CriticScheduler, GANHead, NoiseSchedule
from . import checkpoint as ckpt
from .config import RecipeConfig, config_to_dict, config_to_json
from .distributed import DistInfo, Trainable, any_rank, full_tensor, gradient_sync
from .metrics import Metrics
from .monitor import RunMonitor
from .randomness import CRITIC, GENERATOR, KeyedStreams
from .state import TrainState, resolve_format
from .wrapping import wrap_networks

__all__ = ["Components", "Trainer", "warmup_factor"]


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning-rate factor of iteration ``step`` (0-based): linear warm-up ``min(1, (step + 1) / warmup_steps)``,
    then constant (1 throughout when ``warmup_steps`` is 0)."""
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


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
        self.device = self.info.device
        self.autocast = t.mixed_precision == "bf16"
        self.accum = t.grad_accum

        gen, fake, head = components.generator, components.fake_score, components.gan_head
        self.gen_trainable = Trainable([gen])  # the trainable names, taken before wrapping
        self.critic_trainable = Trainable([fake, head])
        if not self.gen_trainable.names[0] or not self.critic_trainable.names[0]:
            raise ValueError("Components: the generator and the fake score need trainable parameters (requires_grad=True)")
        self.gen_w, self.fake_w, self.head_w, self.teacher = wrap_networks(components, self.info, t)
        self.gen, self.fake, self.head = gen, fake, head  # raw modules (== wrapped ones except under DDP)
        self.critic_modules = nn.ModuleDict({"fake_score": fake, **({"gan_head": head} if head is not None else {})})
        # the GAN taps are hooks on the fake score's submodules, which its DDP wrapper shares: named once, unprefixed
        self.objective = DMD2(self.gen_w, fake, self.teacher, components.schedule, components.sampler, head,
                              list(components.gan_layers) if head is not None else None, cfg.objective)

        adam = dict(betas=tuple(t.betas), eps=t.adam_eps, weight_decay=t.weight_decay)
        self.opt_gen = _adamw(self.gen_trainable.parameters(), lr=t.lr_generator, **adam)
        self.opt_critic = _adamw(self.critic_trainable.parameters(), lr=t.lr_critic, **adam)
        self.ema = EMA(gen, t.ema_decay) if t.ema_decay is not None else None
        self.scheduler = CriticScheduler(cfg.critic.ratio)
        self.step = 0
        self.streams = KeyedStreams(t.seed, self.device)
        self.metrics = Metrics(self.info, self.out)
        modules = {"generator": gen, "fake_score": fake, **({"gan_head": head} if head is not None else {})}
        optimizers = {"generator": (gen, self.opt_gen), "critic": (self.critic_modules, self.opt_critic)}
        self.state = TrainState(self.info, modules, optimizers, self.ema, self.scheduler, self.metrics, t.seed)
        self._stop_signal = 0  # the number of the signal that asked the run to stop
        #: after :meth:`train`: the number of the signal (SIGTERM / SIGINT) that interrupted it, else None
        self.interrupted: int | None = None
        self.monitor: RunMonitor | None = None

    # -- helpers -----------------------------------------------------------------------------------------------
    def objective_for(self, critic: bool) -> DMD2:
        """The objective pointed at the networks of the critic update (``critic``) or of the generator update: the
        trained ones through their wrappers, the frozen ones raw (under DDP a frozen network called through its
        wrapper would arm the reducer for gradients that never come). A features-only pass then finishes the
        wrapper it entered (:class:`~dmd2.core.gan.FeatureHooks`)."""
        o = self.objective
        o.generator, o.fake_score, o.gan_head = ((self.gen, self.fake_w, self.head_w) if critic
                                                 else (self.gen_w, self.fake, self.head))
        if o.features is not None:
            o.features.model = o.fake_score
        return o

    def _keyed(self, step: int, phase: int, micro: int) -> tuple[int, torch.Generator]:
        """Micro-batch ``micro``'s global shard index and generator; with ``objective.fused_ops``, the objective's
        Philox noise starts at the micro-batch's keyed offset (:class:`~dmd2.train.randomness.KeyedStreams`)."""
        shard = self.info.rank * self.accum + micro
        g = self.streams.generator(step, phase, shard)
        if self.cfg.objective.fused_ops:
            self.objective.noise_offset = self.streams.noise_offset(step, phase, shard)
        return shard, g

    def lr_factor(self, step: int) -> float:
        """Constant with linear warmup (:func:`warmup_factor` of ``train.warmup_steps``)."""
        return warmup_factor(step, self.cfg.train.warmup_steps)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    # -- one update each ---------------------------------------------------------------------------------------
    def _backward(self, micro: int, wrapped: Sequence[nn.Module], loss_fn: Callable, logs_sum: dict) -> None:
        """One micro-batch: ``loss_fn() -> (loss, logs)`` under autocast, backward of ``loss / grad_accum``
        (gradients synchronised on the last micro-batch only), the logs added to ``logs_sum`` as means."""
        with gradient_sync(wrapped, self.info, micro == self.accum - 1):
            with self._autocast():
                loss, logs = loss_fn()
            (loss / self.accum).backward()
        for n, v in logs.items():
            if n != "k":
                logs_sum[n] = logs_sum.get(n, 0) + v.float() / self.accum

    def _clip(self, params: list[nn.Parameter]) -> torch.Tensor:
        """Clip to ``train.grad_clip`` (none when 0); the total gradient norm before clipping."""
        clip = self.cfg.train.grad_clip
        params = [p for p in params if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        return full_tensor(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf, foreach=True))

    def _apply(self, opt: torch.optim.Optimizer, trainable: Trainable, lr: float, step: int, logs_sum: dict,
               norm_name: str, tick: int) -> None:
        """The end of an update: warmed-up learning rate, clipping, AdamW step, then the logs and the gradient norm
        tracked at ``tick``."""
        for group in opt.param_groups:
            group["lr"] = lr * self.lr_factor(step)
        norm = self._clip(trainable.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
        for n, v in logs_sum.items():
            self.metrics.track(n, v, tick)
        self.metrics.track(norm_name, norm, tick)

    def _generator_update(self, step: int) -> list[tuple[Any, Any]]:
        """The generator update; returns each micro-batch's ``(Samples, cond)`` for the critic update."""
        self.critic_trainable.set(False)
        self.gen_trainable.set(True)
        obj, k = self.objective_for(critic=False), self.streams.draw_k(self.c.sampler, step, GENERATOR)
        logs_sum: dict[str, torch.Tensor] = {}
        made = []
        for m in range(self.accum):
            _, g = self._keyed(step, GENERATOR, m)
            noise, cond = self.c.latents(self.cfg.train.batch_size, g, self.device)
            self._backward(m, [self.gen_w], lambda: obj.generator_loss(noise, cond, k=k, generator=g), logs_sum)
            made.append((obj.last_samples, cond))
        self._apply(self.opt_gen, self.gen_trainable, self.cfg.train.lr_generator, step, logs_sum,
                    "grad_norm_generator", 2 * step)
        if self.ema is not None:
            self.ema.update(self.gen)
        return made

    def _critic_update(self, step: int, made: Sequence[tuple[Any, Any]] | None = None) -> None:
        """The critic update, on ``made`` (the generator turn's per-micro-batch samples) when given, else on fresh
        samples."""
        self.gen_trainable.set(False)
        self.critic_trainable.set(True)
        obj, k = self.objective_for(critic=True), self.streams.draw_k(self.c.sampler, step, CRITIC)
        logs_sum: dict[str, torch.Tensor] = {}
        b = self.cfg.train.batch_size
        for m in range(self.accum):
            shard, g = self._keyed(step, CRITIC, m)
            noise = samples = None
            if made is None:
                noise, cond = self.c.latents(b, g, self.device)
            else:
                samples, cond = made[m]
            real, real_cond = self.c.real_data(step, shard, b, self.device) if self.head is not None else (None, None)
            self._backward(m, [self.fake_w, self.head_w], lambda: obj.critic_loss(
                noise, cond, real, real_cond, k=k, generator=g, samples=samples), logs_sum)
        self._apply(self.opt_critic, self.critic_trainable, self.cfg.train.lr_critic, step, logs_sum,
                    "grad_norm_critic", 2 * step + 1)

    def train_step(self) -> None:
        """One iteration (see the module docstring)."""
        phase = self.scheduler.next()
        if phase.step != self.step:
            raise RuntimeError(f"critic scheduler at {phase.step} but trainer at {self.step}")
        made = self._generator_update(self.step) if phase.generator else None
        self._critic_update(self.step, None if self.cfg.objective.critic_fresh_samples else made)
        self.step += 1

    # -- logs, samples, checkpoints ----------------------------------------------------------------------------
    def _log(self) -> None:
        t = self.cfg.train
        lrs = {"lr_generator": t.lr_generator * self.lr_factor(self.step - 1),
               "lr_critic": t.lr_critic * self.lr_factor(self.step - 1)}
        self.monitor.log(self.step, self.metrics.record(lrs, t.batch_size * self.accum * self.info.world_size))

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

    def state_dict(self) -> tuple[dict, dict]:
        """``(weights, state)`` of a ``full`` checkpoint (:meth:`TrainState.state_dict <dmd2.train.state.TrainState>`)."""
        return self.state.state_dict(self.step)

    def save(self) -> Path | None:
        """Write ``checkpoint-{step:08d}`` (after a finiteness check) in ``train.checkpoint_format``; returns its path
        on rank 0 (:mod:`dmd2.train.state`)."""
        t = self.cfg.train
        return self.state.save(self.out, self.step, resolve_format(t.checkpoint_format, self.info),
                               config_to_json(self.cfg, self.recipe), t.keep_last)

    def load(self, path: str | Path, checksums: bool = True) -> None:
        """Restore everything from a checkpoint folder of either format, written on any number of ranks
        (``checksums=False``: the caller verified them, e.g. :func:`~dmd2.train.run_training`)."""
        self.step = self.state.load(path, checksums=checksums)

    # -- the loop ---------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if self._stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self._stop_signal = signum

    def train(self, resume: str | Path | None = None, checksums: bool = True) -> Path | None:
        """Run to ``train.max_steps`` (resuming from ``resume``, a checkpoint folder, if given; ``checksums=False``:
        its checksums were checked already, so loading checks file sizes only).

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
                self.load(resume, checksums=checksums)
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
        self.metrics.window_start = time.perf_counter()
        while self.step < t.max_steps:
            self.train_step()
            self.metrics.window_steps += 1
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
