"""Reading trained generators back: one API for every recipe's checkpoints.

* :func:`resolve_checkpoint` - a checkpoint folder as given, or a run folder's newest complete checkpoint
  (completeness: :func:`dmd2.train.checkpoint.verify_checkpoint`, the rule resume uses; a checkpoint written before
  checkpoints carried a manifest is read with a warning that it could not be verified).
* :func:`generator_state_dict` - the generator's plain state dict from ``ema.safetensors`` (read through
  :meth:`dmd2.core.EMA.module_state_dict`, old ``buffer::`` files too) or ``generator.safetensors`` (or their pieces in a sharded checkpoint's ``sharded/``).
* :func:`load_generator` - a ready :class:`Student` (weights loaded, eval mode, frozen, on ``device``)::

      from dmd2.train import load_generator
      G = load_generator("runs/mnist")                              # newest checkpoint, EMA weights
      images = G(torch.randn(8, *G.shape), torch.arange(8))        # noise (B, *shape), labels -> x0 (B, *shape)

The recipe supplies only its builder, :attr:`Recipe.generator <dmd2.train.cli.Recipe>` ``(cfg, state_dict) ->
Student``; it is found through the module name the run recorded in its ``config.json`` (key ``"recipe"``, see
:func:`~dmd2.train.config.config_to_json`), or given as ``recipe=`` (a :class:`~dmd2.train.cli.Recipe` or its
module name), which checkpoints written before that key need.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..core import EMA, BackwardSimulationSampler
from .checkpoint import MANIFEST, latest_checkpoint, read_weights, verify_checkpoint
from .config import RECIPE_KEY, apply_overrides, config_from_dict

__all__ = ["Student", "resolve_checkpoint", "generator_state_dict", "load_config", "load_generator", "WEIGHTS"]

#: which weights :func:`load_generator` reads: the generator's EMA or its trained weights
WEIGHTS = ("ema", "generator")


def _legacy(p: Path) -> bool:
    """A checkpoint folder from before manifests (read, but it cannot be verified)."""
    return (p.is_dir() and not (p / MANIFEST).exists() and (p / "state.pt").is_file()
            and (p / "generator.safetensors").is_file())


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a checkpoint folder that verifies, else the newest such checkpoint of the run
    folder ``path``; ``ValueError`` when it is neither (the reason names the file). Checkpoints written before
    manifests existed are taken with a warning."""
    p = Path(path)
    try:
        verify_checkpoint(p)
        return p
    except ValueError as e:
        reason = e
    if _legacy(p):
        print(f"warning: {p}: no {MANIFEST} (written by an older dmd2); its files cannot be verified", file=sys.stderr)
        return p
    if not (p / "checkpoints").is_dir():
        raise ValueError(f"{p}: neither a complete checkpoint folder (RUN/checkpoints/checkpoint-XXXXXXXX with a "
                         f"{MANIFEST} that verifies) nor a run folder holding one ({reason})")
    latest = latest_checkpoint(p)
    if latest is not None:
        return latest
    legacy = sorted(c for c in (p / "checkpoints").glob("checkpoint-*") if _legacy(c))
    if legacy:
        return resolve_checkpoint(legacy[-1])
    raise ValueError(f"{p}: neither a complete checkpoint folder (RUN/checkpoints/checkpoint-XXXXXXXX with a "
                     f"{MANIFEST} that verifies) nor a run folder holding one (none of its checkpoints verifies)")


def generator_state_dict(ckpt: str | os.PathLike, weights: str = "ema") -> tuple[dict[str, torch.Tensor], str]:
    """``(state_dict, which)``: the generator's weights of the checkpoint folder ``ckpt`` in the module's own layout.

    ``weights="ema"`` reads ``ema.safetensors``, or, when the run kept no EMA (``train.ema_decay=None``), the trained
    weights; ``which`` says what was read (``"ema"`` or ``"generator"``). ``weights="generator"``: the trained weights.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    ckpt = Path(ckpt)
    if weights == "ema":
        found = read_weights(ckpt, ["ema"])  # either checkpoint format (a sharded one reads only these pieces)
        if "ema" in found:
            return EMA.module_state_dict(found["ema"]), "ema"
    found = read_weights(ckpt, ["generator"])
    if "generator" not in found:
        raise ValueError(f"{ckpt}: no generator weights (generator.safetensors or sharded/)")
    return found["generator"], "generator"


def _recipe(recipe, config: dict, ckpt: Path):
    if recipe is None:
        recipe = config.get(RECIPE_KEY)
        if not recipe:
            raise ValueError(f"{ckpt}/config.json names no recipe (a checkpoint written before runs recorded it): pass "
                             f"recipe=RECIPE of the recipe that trained it (e.g. from dmd2.recipes.mnist import RECIPE)")
    if isinstance(recipe, str):
        module = importlib.import_module(recipe)
        if not hasattr(module, "RECIPE"):
            raise ValueError(f"recipe module {recipe!r} has no RECIPE")
        recipe = module.RECIPE
    if getattr(recipe, "generator", None) is None:
        raise ValueError(f"recipe {recipe.name!r} gives no generator builder (Recipe.generator)")
    return recipe


def load_config(ckpt: str | os.PathLike, recipe=None) -> tuple[Any, Any]:
    """``(recipe, cfg)``: the recipe of checkpoint folder ``ckpt`` (see the module docstring) and the run's resolved
    config, rebuilt from the checkpoint's ``config.json``."""
    ckpt = Path(ckpt)
    f = ckpt / "config.json"
    if not f.is_file():
        raise ValueError(f"{ckpt}: no config.json; cannot tell how the run built its generator")
    config = json.loads(f.read_text())
    recipe = _recipe(recipe, config, ckpt)
    return recipe, config_from_dict(recipe.config, config)


def load_generator(path: str | os.PathLike, weights: str = "ema", device: torch.device | str = "cpu",
                   steps: int | None = None, recipe=None) -> "Student":
    """The student of a checkpoint (folder, or a run folder -> its newest complete checkpoint), ready to sample.

    Args:
        weights: ``"ema"`` (the EMA; the trained weights when the run kept none) or ``"generator"``;
            :attr:`Student.weights` says which were loaded.
        device: where the returned module lives.
        steps: sampling steps (default: the run's ``sampler.steps``; the grid is then the recipe's for ``steps``).
        recipe: the :class:`~dmd2.train.cli.Recipe` (or its module name) when ``config.json`` names none.
    """
    ckpt = resolve_checkpoint(path)
    recipe, cfg = load_config(ckpt, recipe)
    if steps is not None:
        cfg = apply_overrides(cfg, {"sampler.steps": steps, "sampler.timesteps": None})
    sd, which = generator_state_dict(ckpt, weights)
    student = recipe.generator(cfg, sd)
    student.weights, student.checkpoint = which, ckpt
    return student.to(device).eval().requires_grad_(False)


class Student(nn.Module):
    r"""A trained few-step generator: ``forward(noise (B, *shape) unit Gaussian, cond=None, generator=None,
    steps=None) -> x0 (B, *shape)`` (images in [-1, 1], or latents), through the run's grid with fresh re-noise
    noise from ``generator`` between steps (:class:`~dmd2.core.BackwardSimulationSampler`, DMD2 Sec. 4.4).

    Attributes: ``denoiser`` (the generator network ``G(x_t, t, cond) -> x0``), ``sampler``, ``shape`` (one sample's
    noise shape), ``num_classes`` (class labels ``0..num_classes-1`` as ``cond``; 0: another kind of ``cond``),
    ``timesteps``, ``num_steps``; after :func:`load_generator` also ``weights`` and ``checkpoint``.
    """

    def __init__(self, denoiser: nn.Module, sampler: BackwardSimulationSampler, shape: Sequence[int],
                 num_classes: int = 0):
        super().__init__()
        self.denoiser, self.sampler = denoiser, sampler
        self.shape, self.num_classes = tuple(shape), int(num_classes)
        self.weights, self.checkpoint = "", None

    @property
    def timesteps(self) -> list:
        return list(self.sampler.timesteps)

    @property
    def num_steps(self) -> int:
        return self.sampler.num_steps

    def forward(self, noise: torch.Tensor, cond: Any = None, generator: torch.Generator | None = None,
                steps: int | None = None) -> torch.Tensor:
        if noise.dim() != len(self.shape) + 1 or tuple(noise.shape[1:]) != self.shape:
            raise ValueError(f"Student: noise must be (B, {', '.join(map(str, self.shape))}), got {tuple(noise.shape)}")
        return self.sampler.sample(self.denoiser, noise, cond, generator=generator, steps=steps)
