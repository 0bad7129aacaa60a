"""A training run's state and its checkpoints: what the trainer writes into a checkpoint folder and restores from one.

The state: the trained networks (``generator``, ``fake_score``, ``gan_head``), the generator's EMA, both AdamW
optimizers (``generator``; ``critic`` over the fake score and the head), and ``state.pt``'s run state - the iteration,
the critic scheduler, every rank's RNG state and the log window's sums (:class:`~dmd2.train.metrics.Metrics`).
Everything else is keyed by the iteration (:mod:`dmd2.train.randomness`), so nothing more is needed to resume
bit-exactly.

Two formats (``train.checkpoint_format``; ``auto`` is ``sharded`` under FSDP2, ``full`` otherwise): ``full`` gathers
every tensor on rank 0 (:func:`~dmd2.train.checkpoint.write_checkpoint`), ``sharded`` has every rank write its own
shards (:mod:`dmd2.train.sharded`). Either loads on any number of ranks; on a world size other than the writer's,
each rank reseeds its global RNG from ``(seed, step, rank)`` and the log sums become the ranks' mean. The folder
layout, atomic writes and verification are :mod:`dmd2.train.checkpoint`'s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..core import EMA, CriticScheduler
from . import checkpoint as ckpt
from .distributed import DistInfo, all_gather_rows, full_tensor
from .metrics import Metrics
from .randomness import derive_seed

__all__ = ["TrainState", "resolve_format", "check_fits"]


def resolve_format(fmt: str, info: DistInfo) -> str:
    """``train.checkpoint_format`` resolved: ``auto`` is ``sharded`` under FSDP2, ``full`` otherwise."""
    return ("sharded" if info.mode == "fsdp2" else "full") if fmt == "auto" else fmt


def check_fits(module, sd: Mapping[str, torch.Tensor], file: Path) -> None:
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


class TrainState:
    """The state of one run, by reference (see the module docstring).

    Args:
        info: this process's place in the job.
        modules: the trained networks by file name (``generator``, ``fake_score``, optional ``gan_head``), unwrapped
            (under FSDP2 the sharded modules themselves).
        optimizers: ``{name: (module, optimizer)}`` with the module whose parameters the optimizer owns.
        ema: the generator's EMA, or None.
        scheduler: the critic scheduler; metrics: the log window's sums; seed: ``train.seed``.
    """

    def __init__(self, info: DistInfo, modules: Mapping[str, nn.Module],
                 optimizers: Mapping[str, tuple[nn.Module, torch.optim.Optimizer]], ema: EMA | None,
                 scheduler: CriticScheduler, metrics: Metrics, seed: int):
        self.info, self.device = info, info.device
        self.modules, self.optimizers, self.ema = dict(modules), dict(optimizers), ema
        self.scheduler, self.metrics, self.seed = scheduler, metrics, seed

    # -- save --------------------------------------------------------------------------------------------------
    def _model_sd(self, module: nn.Module) -> dict[str, torch.Tensor]:
        if self.info.mode == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    @staticmethod
    def _optim_sd(module: nn.Module, opt) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def state_dict(self, step: int) -> tuple[dict, dict]:
        """``(weights, state)`` of a ``full`` checkpoint; collective under DDP/FSDP2 (rank 0's copy is complete)."""
        weights = {name: self._model_sd(m) for name, m in self.modules.items()}
        if self.ema is not None:
            weights["ema"] = {k: full_tensor(v).detach().cpu().clone() for k, v in self.ema.state_dict().items()}
        state = self.run_state(step)
        state["optimizers"] = {name: self._optim_sd(m, opt) for name, (m, opt) in self.optimizers.items()}
        return weights, state

    def run_state(self, step: int) -> dict:
        """What ``state.pt`` holds besides the optimizers (collective: every rank's RNG state and log sums)."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rng_rows = all_gather_rows(torch.cat([v.to(self.device) for v in rng.values()]), self.info)
        return {
            "step": step,
            "world_size": self.info.world_size,
            "critic_scheduler": self.scheduler.state_dict(),
            "rng": {"keys": list(rng), "sizes": [v.numel() for v in rng.values()], "per_rank": rng_rows},
            "log": self.metrics.state_dict(lambda row: all_gather_rows(row, self.info)),
        }

    def save(self, out: Path, step: int, fmt: str, config_json: str, keep_last: int) -> Path | None:
        """Write ``checkpoint-{step:08d}`` in ``fmt`` (``full`` | ``sharded``) after a finiteness check; returns its
        path on rank 0. ``sharded``: every rank writes its shards, nothing is gathered."""
        self.metrics.check_finite()
        path = None
        if fmt == "sharded":
            from . import sharded

            tensors, groups = sharded.sharded_tensors(self.modules, self.optimizers, self.ema)
            state = self.run_state(step)
            state["optimizers"] = {name: {"param_groups": g} for name, g in groups.items()}
            if self.info.is_main:
                ckpt.begin_checkpoint(out, step)
            if self.info.distributed:
                dist.barrier()
            sharded.save_sharded(ckpt.tmp_checkpoint_path(out, step), tensors)
            if self.info.is_main:
                path = ckpt.commit_checkpoint(out, step, state, config_json, keep_last=keep_last)
        else:
            weights, state = self.state_dict(step)
            if self.info.is_main:
                path = ckpt.write_checkpoint(out, step, weights, state, config_json, keep_last=keep_last)
        if self.info.distributed:
            dist.barrier()
        return path

    # -- load --------------------------------------------------------------------------------------------------
    def load(self, path: str | Path, checksums: bool = True) -> int:
        """Restore everything from a checkpoint folder of either format (any world size); returns its iteration.
        A ``sharded`` one fills each rank's shards from the pieces that overlap them; a ``full`` one is read whole on
        every rank. The folder must verify (:func:`~dmd2.train.checkpoint.verify_checkpoint`): file sizes always,
        SHA-256 checksums with ``checksums`` (a full checkpoint's; the caller checked them when False)."""
        from . import sharded

        if sharded.is_sharded(path):
            ckpt.verify_checkpoint(path, checksums=checksums)
            state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
            sharded.load_sharded(path, state, self.modules, self.optimizers, self.ema)
        else:
            state = self._load_full(path, checksums)
        return self._load_run_state(state)

    def _load_full(self, path: str | Path, checksums: bool) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        weights, state, _ = ckpt.read_checkpoint(path, checksums=checksums)
        fsdp = self.info.mode == "fsdp2"
        opts = StateDictOptions(full_state_dict=True)
        for name, module in self.modules.items():
            if name not in weights:
                raise ValueError(f"{path}: missing {name}.safetensors")
            check_fits(module, weights[name], Path(path) / f"{name}.safetensors")
            if fsdp:
                set_model_state_dict(module, weights[name], options=opts)
            else:
                module.load_state_dict(weights[name])
        if self.ema is not None:
            if "ema" not in weights:
                raise ValueError(f"{path}: missing ema.safetensors (train.ema_decay is set)")
            check_fits(self.ema, weights["ema"], Path(path) / "ema.safetensors")
            self._load_ema(weights["ema"])
        for name, (module, opt) in self.optimizers.items():
            set_optimizer_state_dict(module, opt, state["optimizers"][name], options=opts)
        return state

    def _load_run_state(self, state: dict) -> int:
        self.scheduler.load_state_dict(state["critic_scheduler"])
        step = int(state["step"])
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
            torch.manual_seed(derive_seed(self.seed, step, self.info.rank))
        self.metrics.load_state_dict(state["log"], same_world)
        return step

    def _load_ema(self, sd: dict[str, torch.Tensor]) -> None:
        """Load the EMA; under FSDP2 each averaged parameter becomes a DTensor placed like the generator's."""
        params = dict(self.modules["generator"].named_parameters())
        local = {}
        for k, v in sd.items():
            p = params.get(k)
            if p is not None and hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                v = distribute_tensor(v.to(self.device), p.device_mesh, p.placements)
            local[k] = v
        self.ema.load_state_dict(local)
