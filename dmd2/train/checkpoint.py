"""Checkpoints in the run-folder layout::

    OUT/checkpoints/checkpoint-00000200/{generator,fake_score,gan_head,ema}.safetensors  state.pt  config.json

The number is the count of completed iterations. A checkpoint is written to ``checkpoint-XXXXXXXX.tmp/`` and
renamed when every file is on disk, so a folder without ``.tmp`` is always complete. Weights are full (unsharded)
fp32/bf16 tensors keyed by parameter name: a run resumes on any number of ranks. ``state.pt`` (optimizers keyed by
parameter name, critic scheduler, RNG states, step, log accumulators) loads with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["CHECKPOINT_NAMES", "checkpoint_path", "is_complete", "list_checkpoints", "latest_checkpoint", "resolve_resume",
           "write_checkpoint", "read_checkpoint"]

#: the weight files a checkpoint may hold (``gan_head`` / ``ema`` only when the run has them)
CHECKPOINT_NAMES = ("generator", "fake_score", "gan_head", "ema")
_PATTERN = re.compile(r"^checkpoint-(\d{8})$")


def checkpoint_path(out: str | Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"checkpoint-{step:08d}"


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a complete checkpoint folder (the one completeness rule: resume, listing and loading
    all ask this)."""
    path = Path(path)
    return path.is_dir() and (path / "state.pt").is_file() and (path / "generator.safetensors").is_file()


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
                         f"generator.safetensors (e.g. OUT/checkpoints/checkpoint-00000200)")
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


def write_checkpoint(out: str | Path, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict,
                     config_json: str, keep_last: int = 0) -> Path:
    """Write one checkpoint (call on rank 0 only) and drop all but the newest ``keep_last`` (0 keeps all).

    ``weights``: file name (one of :data:`CHECKPOINT_NAMES`) -> flat state dict of CPU tensors.
    """
    unknown = set(weights) - set(CHECKPOINT_NAMES)
    if unknown:
        raise ValueError(f"write_checkpoint: unknown weight files {sorted(unknown)}; expected among {CHECKPOINT_NAMES}")
    final = checkpoint_path(out, step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from an interrupted write
    tmp.mkdir(parents=True)
    for name, sd in weights.items():
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(config_json)
    for f in tmp.iterdir():
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


def read_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """``(weights, state, config)`` of a checkpoint folder; ``state.pt`` is read with ``weights_only=True``."""
    path = Path(path)
    if not is_complete(path):
        raise ValueError(f"{path}: not a complete checkpoint (expected state.pt and generator.safetensors)")
    weights = {n: load_file(str(path / f"{n}.safetensors")) for n in CHECKPOINT_NAMES if (path / f"{n}.safetensors").is_file()}
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    cfg_file = path / "config.json"
    config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    return weights, state, config
