"""Checkpoints in the run-folder layout, and the run folder's lock::

    OUT/.lock                                   held (flock) by the run's rank 0 for the run's life
    OUT/checkpoints/checkpoint-00000200/{generator,fake_score,gan_head,ema}.safetensors  state.pt  config.json
                                        manifest.json
    OUT/checkpoints/checkpoint-00000200/sharded/{.metadata,__0_0.distcp,...}  state.pt  config.json  manifest.json

The number is the count of completed iterations. A checkpoint is written to ``checkpoint-XXXXXXXX.tmp/``; its
``manifest.json`` (every other file's name, size in bytes and SHA-256) is written last, then the folder is renamed.
The one completeness rule, :func:`verify_checkpoint`: a checkpoint is trusted only when its manifest parses, lists
``state.pt`` and the weights (``generator.safetensors``, or ``sharded/.metadata``), and every listed file exists
with the listed size (and checksum). Pruning (``keep_last``) renames a folder to ``*.trash`` before deleting it, so
a kill leaves either a whole checkpoint or a ``.trash`` / ``.tmp`` folder, which :func:`remove_stale` deletes when
the next run starts. At load, every floating-point tensor (weights and ``state.pt``) must be finite.

Two formats (``train.checkpoint_format``), both resumable on any number of ranks:

* ``full``: weights are full (unsharded) fp32/bf16 tensors keyed by parameter name, gathered on rank 0;
  ``state.pt`` (optimizers keyed by parameter name, critic scheduler, RNG states, step, log accumulators) loads
  with ``torch.load(..., weights_only=True)``.
* ``sharded``: ``sharded/`` instead of the ``.safetensors`` files, a torch.distributed.checkpoint folder that every
  rank writes its own shards into (weights and optimizer moments); ``state.pt`` keeps the rest
  (:mod:`dmd2.train.sharded`). The manifest lists the shard files as ``sharded/NAME``.

:func:`read_checkpoint` reads either on one process. Files get the process's normal mode (``0666 & ~umask``).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file

__all__ = ["CHECKPOINT_NAMES", "MANIFEST", "RunFolderLocked", "CheckpointWriteError", "checkpoint_path",
           "tmp_checkpoint_path", "verify_checkpoint", "is_complete", "list_checkpoints", "latest_checkpoint",
           "resolve_resume", "remove_stale", "hold_run_folder", "write_manifest", "begin_checkpoint",
           "commit_checkpoint", "write_checkpoint", "read_weights", "read_checkpoint", "load_weights"]

#: the weight files a checkpoint may hold (``gan_head`` / ``ema`` only when the run has them)
CHECKPOINT_NAMES = ("generator", "fake_score", "gan_head", "ema")
#: the manifest's file name (written last inside the ``.tmp`` folder)
MANIFEST = "manifest.json"
# a DMD2 run also needs fake_score (Trainer.load names it when missing); an ode-pretrain checkpoint holds no fake score
_REQUIRED = ("state.pt", "generator.safetensors")
_REQUIRED_SHARDED = ("state.pt", "sharded/.metadata")
_SUBFOLDER = "sharded"  # dmd2.train.sharded.SHARDED_DIR: the one folder a checkpoint may hold
_PATTERN = re.compile(r"^checkpoint-(\d{8})$")
_STALE = re.compile(r"^checkpoint-\d{8}\.(tmp|trash)$")


def checkpoint_path(out: str | Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"checkpoint-{step:08d}"


def tmp_checkpoint_path(out: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before the rename: ``checkpoint-{step:08d}.tmp``."""
    final = checkpoint_path(out, step)
    return final.with_name(final.name + ".tmp")


def _files(folder: Path) -> list[str]:
    """The files of a checkpoint folder as manifest names: top-level files, and ``sharded/NAME``."""
    names = [f.name for f in folder.iterdir() if f.name != MANIFEST and f.name != _SUBFOLDER]
    sub = folder / _SUBFOLDER
    if sub.is_dir():
        names += [f"{_SUBFOLDER}/{f.name}" for f in sub.iterdir()]
    elif sub.exists():
        names.append(_SUBFOLDER)
    return sorted(names)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(path: str | Path, checksums: bool = True) -> None:
    """Raise ``ValueError`` (the reason, naming the folder and file) unless ``path`` is a complete checkpoint: its
    ``manifest.json`` parses, lists the required files, and every listed file has the listed size and (when
    ``checksums``, reading every byte) SHA-256. Files the manifest does not list are not trusted either. A folder
    that vanishes while it is read (a running job pruning it, ``train.keep_last``) is a ``ValueError`` too."""
    path = Path(path)
    try:
        _verify(path, checksums)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ValueError(f"{path}: disappeared while it was read (pruned by a running job?): {e.filename}") from None


def _verify(path: Path, checksums: bool) -> None:
    if not path.is_dir():
        raise ValueError(f"{path}: not a checkpoint folder (it does not exist or is not a directory)")
    man = path / MANIFEST
    if not man.is_file():
        raise ValueError(f"{path}: no {MANIFEST} (an interrupted write; a checkpoint is trusted only with one)")
    try:
        files = json.loads(man.read_text())["files"]
        entries = {str(n): (int(e["size"]), str(e["sha256"])) for n, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{man}: unreadable manifest ({type(e).__name__}: {e})") from None
    required = _REQUIRED_SHARDED if f"{_SUBFOLDER}/.metadata" in entries else _REQUIRED
    missing = [n for n in required if n not in entries]
    if missing:
        raise ValueError(f"{man}: does not list {', '.join(missing)}")
    extra = [n for n in _files(path) if n not in entries]
    if extra:
        raise ValueError(f"{path}: {', '.join(extra)} not listed in {MANIFEST}")
    for name, (size, digest) in entries.items():
        f = path / name
        top, _, rest = name.rpartition("/")
        if top not in ("", _SUBFOLDER) or (not top and rest.startswith(".")) or not f.is_file():
            raise ValueError(f"{f}: listed in {MANIFEST} but missing")
        actual = f.stat().st_size
        if actual != size:
            raise ValueError(f"{f}: {actual} bytes, the manifest says {size} (truncated or rewritten)")
        if checksums and _sha256(f) != digest:
            raise ValueError(f"{f}: SHA-256 differs from the manifest (corrupt or rewritten)")


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint folder whose manifest and file sizes verify (no checksums read)."""
    try:
        verify_checkpoint(path, checksums=False)
    except ValueError:
        return False
    return True


def _candidates(out: str | Path) -> list[tuple[int, Path]]:
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _PATTERN.match(p.name)) and p.is_dir())


def list_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """Checkpoints of a run folder whose manifest and file sizes verify (no checksums read), oldest first."""
    found = []
    for step, p in _candidates(out):
        try:
            verify_checkpoint(p, checksums=False)
        except ValueError:
            continue
        found.append((step, p))
    return found


def latest_checkpoint(out: str | Path, report=None) -> Path | None:
    """The newest checkpoint of ``out`` that fully verifies (:func:`verify_checkpoint`), or None.

    Each newer one that does not verify is skipped with one line ``skipping PATH: REASON`` passed to ``report``
    (default: printed to stderr as ``warning: ...``)."""
    if report is None:
        def report(msg):
            print(f"warning: {msg}", file=sys.stderr, flush=True)
    for _, p in reversed(_candidates(out)):
        try:
            verify_checkpoint(p)
        except ValueError as e:
            report(f"skipping {p}: {e}")
            continue
        return p
    return None


def resolve_resume(out: str | Path, resume: str) -> Path | None:
    """``""`` -> None; ``"auto"`` -> the newest checkpoint of ``out`` that verifies (None if there is none);
    a path -> that checkpoint folder, which must verify (``ValueError`` with the reason otherwise)."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(out)
    p = Path(resume)
    try:
        verify_checkpoint(p)
    except ValueError as e:
        raise ValueError(f"--resume {resume}: expected a complete checkpoint folder "
                         f"(e.g. OUT/checkpoints/checkpoint-00000200): {e}") from None
    return p


def remove_stale(out: str | Path) -> list[Path]:
    """Delete ``checkpoint-*.tmp`` and ``checkpoint-*.trash`` folders left by a killed run (call under the lock)."""
    root = Path(out) / "checkpoints"
    gone = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if _STALE.match(p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                gone.append(p)
    return gone


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); the message names the folder."""


class RunFolderLocked(ValueError):
    """Another process holds the run folder's lock."""


_HELD: dict[str, list] = {}  # resolved folder -> [open lock file, depth]: the lock is re-entrant within a process


@contextlib.contextmanager
def hold_run_folder(out: str | Path) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``OUT/.lock`` (creating ``OUT``) for the ``with`` block; the file records the
    holder's pid. Re-entrant within one process; the OS releases it when the process dies. A folder this call
    created is removed again if nothing but the lock was written in it (a run that failed while building). A second process gets
    :class:`RunFolderLocked` naming the folder and the holder's pid, at once (no waiting)."""
    out = Path(out)
    key = str(out.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield out
        finally:
            _HELD[key][1] -= 1
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RunFolderLocked(f"run folder {out} is in use by another run (pid {holder}); wait for it to end or "
                              f"choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _HELD[key] = [f, 1]
    try:
        yield out
    finally:
        if _HELD[key][1] == 1:
            del _HELD[key]
            if created and [p.name for p in out.iterdir()] == [".lock"]:  # it failed before writing: leave no trace
                (out / ".lock").unlink()
                out.rmdir()
            f.close()  # releases the flock
        else:
            _HELD[key][1] -= 1


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


def _discard(folder: Path) -> None:
    """Rename to ``*.trash`` (one atomic step: the folder stops being a checkpoint), then delete."""
    trash = folder.with_name(folder.name + ".trash")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(folder, trash)
    shutil.rmtree(trash)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_manifest(folder: str | Path, step: int, world_size: int) -> None:
    """Give every file of ``folder`` the normal mode, fsync it, then write ``manifest.json`` (each file's size and
    SHA-256, the step and the world size that wrote it) and fsync that: the last write of a checkpoint."""
    folder = Path(folder)
    mode = 0o666 & ~_umask()
    files = {}
    for name in _files(folder):
        f = folder / name
        os.chmod(f, mode)  # safetensors creates its files 0600
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        files[name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    if (folder / _SUBFOLDER).is_dir():
        _fsync_dir(folder / _SUBFOLDER)
    with open(folder / MANIFEST, "w") as fh:
        fh.write(json.dumps({"step": step, "world_size": world_size, "files": files}, indent=1))
        fh.flush()
        os.fsync(fh.fileno())


def begin_checkpoint(out: str | Path, step: int) -> Path:
    """A fresh, empty ``checkpoint-{step:08d}.tmp/`` (one left over from an interrupted write is removed); rank 0
    only, before the weights are written into it (by rank 0, or by every rank for ``sharded``)."""
    tmp = tmp_checkpoint_path(out, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


@contextlib.contextmanager
def _writing(tmp: Path, step: int) -> Iterator[None]:
    """A failed write (a full disk, a quota, an I/O error: torch and safetensors word these obscurely) removes the
    ``.tmp`` folder and raises :class:`CheckpointWriteError` naming it."""
    try:
        yield
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(tmp.parent).free
        why = (str(e).splitlines() or [""])[0]
        raise CheckpointWriteError(f"{tmp}: could not write checkpoint {step} ({type(e).__name__}: {why}); "
                                   f"{free / 2**20:.1f} MiB free on that disk; earlier checkpoints are untouched, "
                                   f"resume with --resume auto once there is room") from e


def commit_checkpoint(out: str | Path, step: int, state: dict, config_json: str, keep_last: int = 0) -> Path:
    """Finish the ``.tmp`` folder of :func:`begin_checkpoint` once its weights are written (rank 0 only, holding
    :func:`hold_run_folder`): ``state.pt``, ``config.json``, fsync, ``manifest.json`` last (it covers every file,
    ``sharded/`` included), fsync, rename, fsync the parent; then drop all but the newest ``keep_last``
    (0 keeps all)."""
    final, tmp = checkpoint_path(out, step), tmp_checkpoint_path(out, step)
    with _writing(tmp, step):
        torch.save(state, tmp / "state.pt")
        (tmp / "config.json").write_text(config_json)
        write_manifest(tmp, step, state.get("world_size", 1))
    if final.exists():
        _discard(final)
    _finalize(tmp, final)
    _fsync_dir(final.parent)
    if keep_last > 0:
        for _, old in list_checkpoints(out)[:-keep_last]:
            _discard(old)
    return final


def write_checkpoint(out: str | Path, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict,
                     config_json: str, keep_last: int = 0) -> Path:
    """Write one ``full`` checkpoint (call on rank 0 only, holding :func:`hold_run_folder`) and drop all but the
    newest ``keep_last`` (0 keeps all).

    ``weights``: file name (one of :data:`CHECKPOINT_NAMES`) -> flat state dict of CPU tensors. Order: every file into
    ``checkpoint-XXXXXXXX.tmp/``, fsync, ``manifest.json`` last, fsync, rename, fsync the parent.
    """
    unknown = set(weights) - set(CHECKPOINT_NAMES)
    if unknown:
        raise ValueError(f"write_checkpoint: unknown weight files {sorted(unknown)}; expected among {CHECKPOINT_NAMES}")
    tmp = begin_checkpoint(out, step)
    with _writing(tmp, step):
        for name, sd in weights.items():
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
    return commit_checkpoint(out, step, state, config_json, keep_last)


def _check_finite(tree, file: Path, where: str = "") -> None:
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and tree.numel() and not bool(torch.isfinite(tree).all()):
            bad = int((~torch.isfinite(tree)).sum())
            raise ValueError(f"{file}: tensor {where or '<root>'} holds {bad} non-finite value(s) (NaN/inf); "
                             f"refusing to resume from it")
    elif isinstance(tree, dict):
        for k, v in tree.items():
            _check_finite(v, file, f"{where}/{k}" if where else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _check_finite(v, file, f"{where}[{i}]")


def load_weights(file: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (CPU); ``FileNotFoundError`` / ``ValueError`` name the file."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such safetensors file")
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types, without the file name
        raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def read_weights(path: str | Path, names: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The weight files ``names`` (among :data:`CHECKPOINT_NAMES`) of a checkpoint folder of either format, those it
    has, as full CPU tensors, on one process; only those are read (a ``sharded`` one reads no other piece)."""
    from .sharded import is_sharded, read_sharded

    path = Path(path)
    if is_sharded(path):
        return read_sharded(path, names=names, optimizers=False)[0]
    return {n: load_weights(path / f"{n}.safetensors") for n in names if (path / f"{n}.safetensors").is_file()}


def read_checkpoint(path: str | Path, optimizers: bool = True,
                    checksums: bool = True) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """``(weights, state, config)`` of a checkpoint folder of either format that verifies (:func:`verify_checkpoint`;
    sizes only with ``checksums=False``, for a caller that checked them), on one process; ``state.pt`` is read with
    ``weights_only=True``. ``ValueError`` names the file (and tensor) when
    it does not verify, does not parse, or holds a non-finite floating-point value.

    A ``sharded`` checkpoint is consolidated (full tensors); its ``state["optimizers"]`` then has the ``full``
    format's layout (``{"state": {name: {...}}, "param_groups": [...]}``), or only ``param_groups`` when
    ``optimizers=False`` (export: the moments are never read).
    """
    from .sharded import is_sharded, read_sharded

    path = Path(path)
    verify_checkpoint(path, checksums=checksums)
    weights, state = {}, None
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors, or a global weights_only refuses
        raise ValueError(f"{path / 'state.pt'}: not loadable with torch.load(weights_only=True) "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if is_sharded(path):
        weights, moments = read_sharded(path, optimizers=optimizers)
        for name, sd in weights.items():
            _check_finite(sd, path / _SUBFOLDER, name)
        for name, st in moments.items():
            state["optimizers"][name]["state"] = st
    for n in CHECKPOINT_NAMES:
        f = path / f"{n}.safetensors"
        if f.is_file():
            weights[n] = load_weights(f)
            _check_finite(weights[n], f)
    _check_finite(state, path / "state.pt")
    cfg_file = path / "config.json"
    try:
        config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    except ValueError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    return weights, state, config
