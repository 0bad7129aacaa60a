r"""Sharded checkpoints (``train.checkpoint_format=sharded``) with torch.distributed.checkpoint (DCP).

Layout, inside the run folder's usual checkpoint folder (written as ``.tmp`` and renamed, like ``full``)::

    checkpoint-00000200/sharded/.metadata  __0_0.distcp  __1_0.distcp ...   state.pt  config.json

Every rank writes its own shards of the trained networks, the EMA and the AdamW moments; nothing is gathered, so a
checkpoint costs each rank's host about the size of its shard (``full`` gathers every tensor on rank 0). DCP keeps
each tensor's global shape and the offsets of the pieces, so a checkpoint written by ``W`` ranks loads on any
number of ranks: each rank reads only the pieces that overlap its own shard. Keys of the DCP folder (flat, tensors
only, so reading never unpickles an object)::

    model/<file>/<parameter or buffer name>      <file> in generator, fake_score, gan_head, ema
    optim/<optimizer>/<parameter name>/<key>     <optimizer> in generator, critic; <key>: exp_avg, exp_avg_sq, step

``state.pt`` holds what it holds for ``full`` (step, critic scheduler, RNG states, log accumulators), with each
optimizer's ``param_groups`` (hyperparameters, parameter names) in place of its state.
:func:`read_sharded` consolidates a checkpoint on one process (export, :func:`~dmd2.train.checkpoint.read_checkpoint`).
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

__all__ = ["SHARDED_DIR", "is_sharded", "sharded_tensors", "save_sharded", "load_sharded", "read_sharded"]

#: the DCP folder inside a checkpoint folder
SHARDED_DIR = "sharded"
_MODEL, _OPTIM = "model", "optim"


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns on every call without a process group ("assuming the intent is to load in a single process"):
    that is the intent wherever it happens here (one process, or ``no_dist=True``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def is_sharded(path: str | Path) -> bool:
    """``path`` is a checkpoint folder of the ``sharded`` format (its DCP metadata is written)."""
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def _optim_tensors(name: str, osd: Mapping) -> dict[str, torch.Tensor]:
    out = {}
    for fqn, st in osd["state"].items():
        for key, v in st.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"optimizer {name}: state {fqn}/{key} is a {type(v).__name__}; a sharded checkpoint "
                                 "holds tensors only (use train.checkpoint_format=full)")
            out[f"{_OPTIM}/{name}/{fqn}/{key}"] = v
    return out


def sharded_tensors(modules: Mapping[str, nn.Module], optimizers: Mapping[str, tuple[nn.Module, torch.optim.Optimizer]],
                    ema=None) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """``(tensors, param_groups)``: this rank's view of every tensor to save (DTensor shards under FSDP2, which DCP
    writes piece by piece; plain tensors elsewhere, written once) and each optimizer's ``param_groups``.

    ``modules``: checkpoint file name -> network; ``optimizers``: name -> (the module its parameters are named
    by, optimizer); ``ema``: an :class:`~dmd2.core.EMA` over the generator, or None.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    flat: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        flat.update({f"{_MODEL}/{name}/{k}": v for k, v in get_model_state_dict(module).items()})
    if ema is not None:
        flat.update({f"{_MODEL}/ema/{k}": v for k, v in ema.state_dict().items()})
    groups = {}
    for name, (module, opt) in optimizers.items():
        osd = get_optimizer_state_dict(module, opt)
        flat.update(_optim_tensors(name, osd))
        groups[name] = osd["param_groups"]
    return flat, groups


def save_sharded(tmp: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Every rank (collective when a process group is up): write ``tensors`` into ``tmp/sharded/`` (files fsynced).

    ``tmp`` is the ``.tmp`` checkpoint folder of :func:`~dmd2.train.checkpoint.begin_checkpoint`, made by rank 0
    before this call; rank 0 then finishes it with :func:`~dmd2.train.checkpoint.commit_checkpoint`.
    """
    import torch.distributed.checkpoint as dcp

    with _single_process_ok():
        dcp.save(dict(tensors), storage_writer=dcp.FileSystemWriter(str(Path(tmp) / SHARDED_DIR), sync_files=True))


def _metadata(path: Path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = dcp.FileSystemReader(str(path / SHARDED_DIR)).read_metadata().state_dict_metadata
    bad = [k for k, m in md.items() if not isinstance(m, TensorStorageMetadata)]
    if bad:
        raise ValueError(f"{path}: sharded checkpoint holds non-tensor entries {bad[:3]}; expected tensors only")
    return md


def _agree_finite(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """``ValueError`` on every rank when any rank's pieces hold a NaN/inf (the rank that found it names the tensor)."""
    import torch.distributed as dist

    from .checkpoint import _check_finite

    local = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in tensors.items()}
    try:
        _check_finite(local, path / SHARDED_DIR)
        err = None
    except ValueError as e:
        err = e
    bad = torch.tensor([err is not None], dtype=torch.int32)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if err is not None:
        raise err
    if bad.item():
        raise ValueError(f"{path / SHARDED_DIR}: another rank's pieces hold non-finite values; refusing to resume from it")


def load_sharded(path: str | Path, state: Mapping, modules: Mapping[str, nn.Module],
                 optimizers: Mapping[str, tuple[nn.Module, torch.optim.Optimizer]], ema=None) -> None:
    """Every rank (collective when a process group is up): fill ``modules``, ``optimizers`` and ``ema`` (as
    wrapped for this run, e.g. FSDP2-sharded over any number of ranks) from the checkpoint folder ``path``; ``state``
    is its ``state.pt``. Each rank reads only the pieces of its own shards.

    Raises ``ValueError`` naming the tensors that the run has and the checkpoint lacks (or the reverse, or whose
    shapes differ), and, on every rank, when a piece read holds a NaN/inf.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    md = _metadata(path)
    want: dict[str, torch.Tensor] = {}
    models = {}
    for name, module in modules.items():
        models[name] = get_model_state_dict(module)
        want.update({f"{_MODEL}/{name}/{k}": v for k, v in models[name].items()})
    if ema is not None:
        want.update({f"{_MODEL}/ema/{k}": v for k, v in ema.state_dict().items()})
    # optimizer moments: allocated like their parameters (same sharding), for exactly the entries the checkpoint has
    moments: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for name, (module, _) in optimizers.items():
        params = dict(module.named_parameters())
        prefix = f"{_OPTIM}/{name}/"
        moments[name] = {}
        for key, m in md.items():
            if not key.startswith(prefix):
                continue
            fqn, entry = key[len(prefix):].rsplit("/", 1)
            if fqn not in params:
                raise ValueError(f"{path}: optimizer {name} has state for {fqn}, which this run's networks lack")
            p = params[fqn]
            t = (torch.zeros(m.size, dtype=m.properties.dtype) if tuple(m.size) != tuple(p.shape)
                 else torch.zeros_like(p, dtype=m.properties.dtype))
            moments[name].setdefault(fqn, {})[entry] = t
            want[key] = t
    missing = sorted(set(want) - set(md))
    if missing:
        raise ValueError(f"{path}: sharded checkpoint lacks {len(missing)} tensor(s) of this run, e.g. {missing[:3]}")
    files = [*modules, *(["ema"] if ema is not None else [])]
    unexpected = sorted(k for k in md if k.startswith(_MODEL + "/") and k.split("/")[1] in files and k not in want)
    shapes = [f"{k} {tuple(md[k].size)} vs {tuple(want[k].shape)}" for k in sorted(want) if tuple(md[k].size) != tuple(want[k].shape)]
    if unexpected or shapes:
        raise ValueError(f"{path}: sharded checkpoint does not fit this run (a checkpoint of another recipe or width?): "
                         f"unexpected {unexpected[:3]} ({len(unexpected)}), shapes (file vs run) {shapes[:3]} ({len(shapes)})")
    with _single_process_ok():
        dcp.load(want, storage_reader=dcp.FileSystemReader(str(path / SHARDED_DIR)))
    _agree_finite(path, want)
    for name, module in modules.items():
        set_model_state_dict(module, models[name])
    if ema is not None:
        ema.load_state_dict({k[len(f"{_MODEL}/ema/"):]: v for k, v in want.items() if k.startswith(f"{_MODEL}/ema/")})
    for name, (module, opt) in optimizers.items():
        groups = state["optimizers"][name]["param_groups"]
        set_optimizer_state_dict(module, opt, {"state": moments[name], "param_groups": groups})


def read_sharded(path: str | Path, names: Sequence[str] | None = None, optimizers: bool = True
                 ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, dict[str, torch.Tensor]]]]:
    """Consolidate a sharded checkpoint on this process alone (no collectives, any process group ignored):
    ``(weights, moments)`` with ``weights``: file name -> {name: full CPU tensor} (what the ``full`` format's
    ``.safetensors`` files hold), only the files in ``names`` when given, and ``moments``: optimizer ->
    {parameter name: {key: tensor}} (empty when ``optimizers=False``). Pieces not asked for are not read."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    md = _metadata(path)

    def wanted(k: str) -> bool:
        kind, rest = k.split("/", 1)
        if kind == _MODEL:
            return names is None or rest.split("/", 1)[0] in names
        return optimizers

    flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.items() if wanted(k)}
    with _single_process_ok():
        dcp.load(flat, storage_reader=dcp.FileSystemReader(str(path / SHARDED_DIR)), no_dist=True)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    moments: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for k, v in flat.items():
        kind, rest = k.split("/", 1)
        if kind == _MODEL:
            name, key = rest.split("/", 1)
            weights.setdefault(name, {})[key] = v
        else:
            name, rest = rest.split("/", 1)
            fqn, entry = rest.rsplit("/", 1)
            moments.setdefault(name, {}).setdefault(fqn, {})[entry] = v
    return weights, moments
