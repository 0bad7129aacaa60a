"""Checkpoints in the run-folder layout::

    OUT/checkpoints/checkpoint-00000200/{generator,fake_score,gan_head,ema}.safetensors  state.pt  config.json

The number is the count of completed iterations. A checkpoint is written to ``checkpoint-XXXXXXXX.tmp/`` and
renamed when every file is on disk, so a folder without ``.tmp`` is always complete. Two formats
(``train.checkpoint_format``), both resumable on any number of ranks:

* ``full``: weights are full (unsharded) fp32/bf16 tensors keyed by parameter name, gathered on rank 0;
  ``state.pt`` (optimizers keyed by parameter name, critic scheduler, RNG states, step, log accumulators) loads
  with ``torch.load(..., weights_only=True)``.
* ``sharded``: ``sharded/`` instead of the ``.safetensors`` files, a torch.distributed.checkpoint folder that every
  rank writes its own shards into (weights and optimizer moments); ``state.pt`` keeps the rest
  (:mod:`dmd2.train.sharded`). :func:`read_checkpoint` reads either on one process.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["CHECKPOINT_NAMES", "checkpoint_path", "tmp_checkpoint_path", "is_complete", "list_checkpoints", "latest_checkpoint",
           "resolve_resume", "begin_checkpoint", "commit_checkpoint", "write_checkpoint", "read_checkpoint"]

#: the weight files a checkpoint may hold (``gan_head`` / ``ema`` only when the run has them)
CHECKPOINT_NAMES = ("generator", "fake_score", "gan_head", "ema")
_PATTERN = re.compile(r"^checkpoint-(\d{8})$")


def checkpoint_path(out: str | Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"checkpoint-{step:08d}"


def tmp_checkpoint_path(out: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before the rename: ``checkpoint-{step:08d}.tmp``."""
    final = checkpoint_path(out, step)
    return final.with_name(final.name + ".tmp")


def is_complete(path: str | Path) -> bool:
    """A finished checkpoint folder: ``state.pt`` and the weights (``generator.safetensors`` or ``sharded/``)."""
    from .sharded import is_sharded

    path = Path(path)
    return (path.is_dir() and (path / "state.pt").is_file()
            and ((path / "generator.safetensors").is_file() or is_sharded(path)))


def list_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run folder, oldest first (``.tmp`` folders are ignored)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _PATTERN.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def resolve_resume(out: str | Path, resume: str) -> Path | None:
    """``""`` -> None; ``"auto"`` -> the newest complete checkpoint of ``out`` (None if there is none);
    a path -> that checkpoint folder, which must be complete (``ValueError`` otherwise)."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(out)
    p = Path(resume)
    if not is_complete(p):
        raise ValueError(f"--resume {resume}: expected a complete checkpoint folder holding state.pt and "
                         f"generator.safetensors or sharded/ (e.g. OUT/checkpoints/checkpoint-00000200)")
    return p


def _finalize(tmp: Path, final: Path) -> None:
    """The atomic step: rename the finished ``.tmp`` folder (tests interrupt it here)."""
    os.replace(tmp, final)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def begin_checkpoint(out: str | Path, step: int) -> Path:
    """A fresh, empty ``checkpoint-{step:08d}.tmp/`` folder (one left over from an interrupted write is removed)."""
    tmp = tmp_checkpoint_path(out, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(out: str | Path, step: int, state: dict, config_json: str, keep_last: int = 0) -> Path:
    """Finish the ``.tmp`` folder of :func:`begin_checkpoint` (call on rank 0 only, once its weights are written):
    write ``state.pt`` and ``config.json``, fsync every file, rename, and drop all but the newest ``keep_last``
    checkpoints (0 keeps all)."""
    final, tmp = checkpoint_path(out, step), tmp_checkpoint_path(out, step)
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(config_json)
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    _finalize(tmp, final)
    _fsync_dir(final.parent)
    if keep_last > 0:
        for _, old in list_checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def write_checkpoint(out: str | Path, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict,
                     config_json: str, keep_last: int = 0) -> Path:
    """Write one ``full`` checkpoint (call on rank 0 only) and drop all but the newest ``keep_last`` (0 keeps all).

    ``weights``: file name (one of :data:`CHECKPOINT_NAMES`) -> flat state dict of CPU tensors.
    """
    unknown = set(weights) - set(CHECKPOINT_NAMES)
    if unknown:
        raise ValueError(f"write_checkpoint: unknown weight files {sorted(unknown)}; expected among {CHECKPOINT_NAMES}")
    tmp = begin_checkpoint(out, step)
    for name, sd in weights.items():
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
    return commit_checkpoint(out, step, state, config_json, keep_last)


def read_checkpoint(path: str | Path, optimizers: bool = True) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """``(weights, state, config)`` of a checkpoint folder of either format, on one process; ``state.pt`` is read
    with ``weights_only=True``.

    A ``sharded`` checkpoint is consolidated (full tensors); its ``state["optimizers"]`` then has the ``full``
    format's layout (``{"state": {name: {...}}, "param_groups": [...]}``), or only ``param_groups`` when
    ``optimizers=False`` (export: the moments are never read).
    """
    path = Path(path)
    if not is_complete(path):
        raise ValueError(f"{path}: not a complete checkpoint (expected state.pt and generator.safetensors or sharded/)")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    from .sharded import is_sharded, read_sharded

    if is_sharded(path):
        weights, moments = read_sharded(path, optimizers=optimizers)
        for name, st in moments.items():
            state["optimizers"][name]["state"] = st
    else:
        weights = {n: load_file(str(path / f"{n}.safetensors")) for n in CHECKPOINT_NAMES
                   if (path / f"{n}.safetensors").is_file()}
    cfg_file = path / "config.json"
    config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    return weights, state, config
