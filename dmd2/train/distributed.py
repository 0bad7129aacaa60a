"""Process groups, model wrapping (DDP / FSDP2) and the few collectives the loop needs.

Launch with ``torchrun --nproc_per_node N``; the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) selects the
rank. Backend: NCCL for CUDA, gloo for CPU. Control-plane values (the SIGTERM flag) go through a gloo group on CPU
tensors, so agreeing on them never waits on the GPU stream.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_distributed", "exit_process", "wrap_trained", "shard_frozen", "Trainable", "is_fsdp",
           "barrier", "all_reduce_mean", "any_rank", "broadcast_object", "all_gather_rows", "full_tensor",
           "gradient_sync"]


_joined_a_job = False  # set once this process has initialised a process group (a torchrun rank)


@dataclass
class DistInfo:
    """This process's place in the job: ``mode`` in ``none|ddp|fsdp2``, ``rank``, ``world_size``, ``device``."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    control_group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    @property
    def loads_weights(self) -> bool:
        """Whether this rank reads pretrained weights. Under FSDP2 only rank 0 does: a recipe may build its
        networks on the meta device on the other ranks, and :func:`wrap_trained` / :func:`shard_frozen` send each
        rank its shards from rank 0 (host memory per rank: its shards, not a full copy of every network)."""
        return self.mode != "fsdp2" or self.rank == 0


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is available (torch.cuda.is_available() is False); "
                             "use train.device=cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(mode: str, device: str = "auto") -> DistInfo:
    """Join the torchrun job (``mode`` ``ddp`` / ``fsdp2``) or run alone (``none``).

    Raises ``ValueError`` when the environment and ``mode`` disagree (several ranks launched with ``none``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if mode == "none":
        if world > 1:
            raise ValueError(f"launched with WORLD_SIZE={world} but train.distributed=none; set train.distributed=ddp or fsdp2")
        return DistInfo(device=_resolve_device(device, 0))
    if mode not in ("ddp", "fsdp2"):
        raise ValueError(f"distributed mode must be none|ddp|fsdp2, got {mode!r}")
    if "RANK" not in os.environ:
        raise ValueError(f"train.distributed={mode} needs a torchrun launch (RANK / WORLD_SIZE unset)")
    dev = _resolve_device(device, local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    global _joined_a_job
    _joined_a_job = True
    control = dist.new_group(backend="gloo") if dev.type == "cuda" else None
    return DistInfo(mode=mode, rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device=dev, control_group=control)


def exit_process(code: int | None) -> None:
    """End the process with ``code``: ``sys.exit`` normally; for a torchrun rank (a process group was initialised
    here and has been destroyed), flush stdio and logging, then ``os._exit``.

    Why: PyTorch's CPU/gloo ranks occasionally abort at interpreter finalisation, after every collective has finished
    and ``destroy_process_group`` has returned ("terminate called without an active exception", SIGABRT, no Python
    frame on the stack; about 2 in 25 two-rank runs of ``tests/train/fsdp_freeze_worker.py`` on this 2-core CPU, torch
    2.14.1), which torchrun then reports as a failed job. A rank has written its outputs by then (checkpoints and logs
    are closed explicitly), so skipping finalisation loses nothing and keeps the exit code honest.
    """
    import logging
    import sys

    code = 0 if code is None else int(code)
    if not _joined_a_job or dist.is_initialized():
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


class Trainable:
    """The parameters of ``modules`` that the recipe left trainable (``requires_grad``) when this was made,
    looked up again by name so that the lookup survives wrapping (FSDP2 swaps in sharded parameters).

    :meth:`set` freezes / unfreezes exactly those (a frozen network accumulates no gradient); parameters the recipe
    froze (a LoRA base, say) stay frozen. Safe under FSDP2 because :func:`wrap_trained` runs FSDP's lazy
    initialisation while the trainable set is unfrozen, and :meth:`set` reshards first so that the sharded
    parameters (which FSDP2 copies onto the unsharded ones at every all-gather) carry the flag.
    """

    def __init__(self, modules: Iterable[nn.Module]):
        self.modules = [m for m in modules if m is not None]
        self.names = [[n for n, p in m.named_parameters() if p.requires_grad] for m in self.modules]
        self._fixed: list[nn.Parameter] | None = None

    def parameters(self) -> list[nn.Parameter]:
        # FSDP2 swaps sharded / unsharded parameter objects on the module (and fully_shard replaces them when it
        # wraps), so under FSDP2 look them up by name every time; elsewhere they are fixed and looked up once.
        if any(is_fsdp(m) for m in self.modules):
            return self._lookup()
        if self._fixed is None:
            self._fixed = self._lookup()
        return self._fixed

    def _lookup(self) -> list[nn.Parameter]:
        out = []
        for m, names in zip(self.modules, self.names):
            params = dict(m.named_parameters())
            out += [params[n] for n in names]
        return out

    def set(self, flag: bool) -> None:
        for m in self.modules:
            if is_fsdp(m):
                m.reshard()
        for p in self.parameters():
            if p.requires_grad != flag:
                p.requires_grad_(flag)


def _fsdp_lazy_init(module: nn.Module) -> None:
    # FSDP2 fixes each parameter group's dtypes / trainable set at its first forward ("lazy init"). If that first
    # forward happens while the module is frozen (the fake score runs first inside the generator phase), the
    # mixed-precision state is derived from a frozen module. Initialising here, while every parameter still
    # requires grad, makes later requires_grad toggles harmless. (torch has no public hook for this.)
    module._get_fsdp_state()._lazy_init()


def _fully_shard_from_rank0(module: nn.Module, info: DistInfo, units: Iterable[nn.Module], **fsdp_kw) -> None:
    """FSDP2-shard ``module`` with every rank's values taken from rank 0's copy (the other ranks' copies may live
    on the meta device: they are never read).

    Rank 0 keeps its full state dict on the host and turns its module into meta tensors too; every rank applies
    ``fully_shard`` on the meta module, allocates only its shards on ``info.device`` (``to_empty``) and receives
    them from rank 0 (``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``: one tensor at a
    time, sliced to the shard on arrival). Buffers outside the state dict (``persistent=False``) are broadcast
    whole. Device memory per rank at load: its shards plus one tensor; host memory on ranks > 0: nothing of
    ``module``'s weights.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    keys = set(module.state_dict())
    transient = [n for n, _ in module.named_buffers() if n not in keys]  # the same names on every rank
    full = module.state_dict() if info.is_main else {}
    saved = {n: b.detach().clone() for n, b in module.named_buffers() if n in transient} if info.is_main else {}
    module.to("meta")
    for unit in units:
        fully_shard(unit, **fsdp_kw)
    fully_shard(module, **fsdp_kw)
    module.to_empty(device=info.device)
    set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for n, b in module.named_buffers():
        if n in transient:
            if info.is_main:
                b.copy_(saved[n])
            dist.broadcast(b, src=0)


def wrap_trained(module: nn.Module, info: DistInfo, mixed_precision: str,
                 fsdp_units: Callable[[nn.Module], Iterable[nn.Module]] | None = None) -> nn.Module:
    """Move a trained network to the device and wrap it for ``info.mode``.

    * ``none``: the module itself; ``ddp``: :class:`~torch.nn.parallel.DistributedDataParallel` (the caller keeps
      the raw module for frozen calls); ``fsdp2``: ``fully_shard`` on each of ``fsdp_units(module)`` (e.g.
      transformer blocks) then on the root, with ``MixedPrecisionPolicy(bf16 params, fp32 reduce)`` under bf16,
      the values from rank 0 (:func:`_fully_shard_from_rank0`; on the other ranks ``module`` may be on meta).
    """
    if info.mode == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if not any(True for _ in module.parameters()):
            return module.to(info.device)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision == "bf16" else MixedPrecisionPolicy()
        _fully_shard_from_rank0(module, info, fsdp_units(module) if fsdp_units else (), mp_policy=mp)
        _fsdp_lazy_init(module)
        return module
    module.to(info.device)
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if not any(p.requires_grad for p in module.parameters()):
            return module
        return DDP(module, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    return module


def shard_frozen(module: nn.Module, info: DistInfo, fsdp_units=None) -> nn.Module:
    """The frozen teacher: no gradients, no optimizer state; sharded under FSDP2 (when it has parameters), with the
    values of rank 0 (as :func:`wrap_trained`)."""
    module.requires_grad_(False)
    module.eval()
    if info.mode == "fsdp2" and any(True for _ in module.parameters()):
        _fully_shard_from_rank0(module, info, fsdp_units(module) if fsdp_units else ())
        return module
    return module.to(info.device)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks (in place on a copy); identity when alone."""
    if not info.distributed:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world_size


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is set on any rank (a CPU gloo all-reduce: no GPU sync)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.control_group)
    return bool(t.item())


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` (any picklable value) on every rank (the CPU gloo control group); ``obj`` itself when alone."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=info.control_group)
    return box[0]


def all_gather_rows(row: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``(n,)`` per-rank values -> ``(world, n)`` on CPU (every rank gets every row)."""
    if not info.distributed:
        return row[None].cpu()
    out = [torch.empty_like(row) for _ in range(info.world_size)]
    dist.all_gather(out, row)
    return torch.stack(out).cpu()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective under FSDP2), else the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gradient_sync(wrapped: Sequence[nn.Module | None], info: DistInfo, sync: bool) -> contextlib.ExitStack:
    """A context in whose backward passes the DDP / FSDP2 modules of ``wrapped`` reduce their gradients over the
    ranks only when ``sync`` (skipped on all but the last micro-batch of an accumulation; None entries ignored)."""
    stack = contextlib.ExitStack()
    if sync:
        return stack
    for m in wrapped:
        if m is None:
            continue
        if info.mode == "ddp" and hasattr(m, "no_sync"):
            stack.enter_context(m.no_sync())
        elif info.mode == "fsdp2" and hasattr(m, "set_requires_gradient_sync"):
            m.set_requires_gradient_sync(False)
            stack.callback(m.set_requires_gradient_sync, True)
    return stack
