"""Peak host memory (RSS) per rank while a run loads its networks, writes a checkpoint and resumes from it.

    torchrun --standalone --nproc_per_node 2 benchmarks/checkpoint_memory.py imagenet64 [key=value ...]
    torchrun --standalone --nproc_per_node 2 benchmarks/checkpoint_memory.py sdxl train.checkpoint_format=full

Runs the recipe's ``tiny`` preset (``train.distributed=fsdp2`` when launched on several ranks, CPU): build +
wrap the networks ("load"), one training iteration (so AdamW has its moments), ``Trainer.save`` ("checkpoint"),
then ``Trainer.load`` of that checkpoint into the same trainer ("resume"). Each phase's peak is Linux's VmHWM,
reset before the phase (``/proc/self/clear_refs``), minus the RSS when the phase began: the memory the phase
itself added. Prints one JSON line per rank (MB = 2**20 bytes). Uses only APIs that predate sharded checkpoints,
so the same script measures an older checkout (``PYTHONPATH=OLD_CHECKOUT``).
"""
from __future__ import annotations

import importlib
import json
import sys
import tempfile
from pathlib import Path


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _phase(fn):
    """``(result, RSS at the start, peak RSS added)`` in MB."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = _status("VmRSS")
    out = fn()
    return out, start, _status("VmHWM") - start


def main(argv: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from dmd2.train import checkpoint as ckpt
    from dmd2.train.cli import resolve_config
    from dmd2.train.distributed import init_distributed
    from dmd2.train.trainer import Trainer

    import os

    name, overrides = argv[0], argv[1:]
    recipe = importlib.import_module(f"dmd2.recipes.{name}").RECIPE
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(tempfile.mkdtemp(prefix="ckpt-mem-")) if world == 1 else None
    dist_mode = "fsdp2" if world > 1 else "none"
    if world > 1:  # one folder for every rank (rank 0 names it)
        import datetime

        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
        holder = [str(Path(tempfile.mkdtemp(prefix="ckpt-mem-"))) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(holder, src=0)
        out = Path(holder[0])
    cfg = resolve_config(recipe, "tiny", [f"train.distributed={dist_mode}", "train.device=cpu", "train.sample_every=0",
                                          "train.progress=false", *overrides], out=str(out))
    info = init_distributed(cfg.train.distributed, cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    trainer, load_start, load_peak = _phase(lambda: Trainer(cfg, recipe.build(cfg, info), info, out))
    trainer.train_step()
    _, save_start, save_peak = _phase(trainer.save)
    path = ckpt.checkpoint_path(out, trainer.step)
    _, resume_start, resume_peak = _phase(lambda: trainer.load(path))
    params = sum(p.numel() for m in (trainer.gen, trainer.fake) for p in m.parameters())
    try:
        from dmd2.train.state import resolve_format

        fmt = resolve_format(cfg.train.checkpoint_format, info)
    except ImportError:  # an older checkout: Trainer.checkpoint_format, or only the full format
        fmt = getattr(trainer, "checkpoint_format", lambda: "full")()
    print("RESULT " + json.dumps({
        "recipe": name, "rank": info.rank, "world": info.world_size, "format": fmt,
        "trained_params_local": params, "rss_start_mb": round(load_start, 1),
        "load_peak_added_mb": round(load_peak, 1), "checkpoint_peak_added_mb": round(save_peak, 1),
        "resume_peak_added_mb": round(resume_peak, 1), "rss_end_mb": round(_status("VmRSS"), 1),
        "overrides": overrides}), flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
