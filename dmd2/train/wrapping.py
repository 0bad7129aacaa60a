"""How the trainer turns a recipe's networks into the ones its updates call, in this order: ``torch.compile`` of
blocks (``train.compile``), activation checkpointing (``train.grad_checkpointing``), then the data-parallel wrapper
(:func:`~dmd2.train.distributed.wrap_trained` for the trained networks, :func:`~dmd2.train.distributed.shard_frozen`
for the teacher). The order matters: module hooks (FeatureHooks' taps and stop, FSDP2's unshard / reshard, DDP's
reducer) run in eager mode around the compiled code, and checkpointing wraps the compiled forward.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn

from .config import TrainConfig
from .distributed import DistInfo, shard_frozen, wrap_trained

if TYPE_CHECKING:
    from .trainer import Components

__all__ = ["wrap_networks", "compile_blocks", "enable_grad_checkpointing"]


def _checkpointed(module: nn.Module) -> None:
    """Recompute ``module``'s activations in backward (non-reentrant ``torch.utils.checkpoint``)."""
    from torch.utils.checkpoint import checkpoint

    inner = module.forward

    def forward(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    module.forward = forward


def enable_grad_checkpointing(module: nn.Module, units) -> None:
    """Checkpoint each of ``units(module)`` (when given), else call the module's ``enable_gradient_checkpointing``."""
    if units is not None:
        for u in units(module):
            _checkpointed(u)
    elif hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()
    else:
        raise ValueError(f"train.grad_checkpointing=true but {type(module).__name__} has no enable_gradient_checkpointing() "
                         "and the recipe gave no Components.checkpoint_units")


def compile_blocks(modules: Iterable[Any], units) -> None:
    """``torch.compile`` the ``forward`` of each block ``units(module)`` returns (the whole module when it returns
    none). Blocks shared between networks (LoRA modes) are compiled once.

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


def wrap_networks(c: Components, info: DistInfo, t: TrainConfig) -> tuple[nn.Module, nn.Module, nn.Module | None, Callable]:
    """Compile, checkpoint and wrap ``c``'s networks (module docstring) on ``info.device``; returns the wrapped
    ``(generator, fake_score, gan_head, teacher)``. Under DDP the trained ones are wrappers around the modules of
    ``c`` (which the caller keeps for frozen calls); otherwise they are those modules."""
    gen, fake, head = c.generator, c.fake_score, c.gan_head
    if t.compile:
        compile_blocks([gen, fake, c.teacher], c.checkpoint_units or c.fsdp_units)
        compile_blocks([head], None)
    if t.grad_checkpointing:
        enable_grad_checkpointing(gen, c.checkpoint_units)
        enable_grad_checkpointing(fake, c.checkpoint_units)
    gen_w = wrap_trained(gen, info, t.mixed_precision, c.fsdp_units)
    fake_w = wrap_trained(fake, info, t.mixed_precision, c.fsdp_units)
    head_w = wrap_trained(head, info, t.mixed_precision) if head is not None else None
    teacher = c.teacher
    if isinstance(teacher, nn.Module):
        teacher = shard_frozen(teacher, info, c.fsdp_units)
    return gen_w, fake_w, head_w, teacher
