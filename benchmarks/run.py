"""Run the kernel benchmarks: ``python benchmarks/run.py [--quick] [--ops a,b] [--providers p,q] [--dtypes ...]
[--csv PATH] [--rep-ms MS]``.

Full run (GPU): SDXL latents (B = 2 and 16, 4x128x128) and ImageNet-64 (B = 40, 3x64x64) in bf16 and fp32; results
are appended to ``benchmarks/results/<device>.csv`` (committed) with a PNG plot next to it. ``--quick``: every op at
one small shape, written to the git-ignored ``benchmarks/results/quick-<device>.csv``; on CPU it runs the Triton
kernels in Triton's interpreter (correctness of the benchmark code only; those timings mean nothing) and skips, with
the reason, what cannot run there. ``--csv`` writes elsewhere (the plot beside it); each row is appended as soon as it
is measured, so a run stopped part-way keeps what it measured. ``--rep-ms`` sets ``do_bench``'s timed window on CUDA (default 500 ms,
50 with ``--quick``; warm-up a fifth of it, at least 25 ms).
``--quick`` also runs the whole-iteration benchmark (``step.py``) at the tiny
ImageNet config with batch 2 for one TTUR cycle, into ``benchmarks/results/quick-step-<device>.csv``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit is defined

import harness  # noqa: E402

OPS = ("philox_normal", "noise_add", "fused_dm", "denoise_loss")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small shape per op (CI smoke run)")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    ap.add_argument("--providers", default="", help="comma-separated subset (default: all available)")
    ap.add_argument("--dtypes", default="", help="comma-separated among float32,bfloat16")
    ap.add_argument("--csv", default=None, help="CSV to append to (default benchmarks/results/[quick-]<device>.csv)")
    ap.add_argument("--rep-ms", type=int, default=None, help="do_bench's timed window per measurement on CUDA")
    args = ap.parse_args(argv)
    ops = [o for o in args.ops.split(",") if o]
    for o in ops:
        if o not in OPS:
            raise SystemExit(f"unknown op {o!r}; expected one of {OPS}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtypes:
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    else:
        dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float32]
    wanted = set(args.providers.split(",")) if args.providers else None
    if args.quick and device.type == "cpu" and wanted is None:
        wanted = {"torch", "triton", "ext"}
        print("torch.compile: skipped on CPU in --quick (inductor's C++ compile takes minutes on a small CPU; "
              "pass --providers torch,torch.compile to include it)")
    shapes = harness.QUICK_SHAPES if args.quick else harness.FULL_SHAPES
    print(f"device: {harness.device_name()}  torch {torch.__version__}  quick={args.quick}")
    t0 = time.perf_counter()
    stem = ("quick-" if args.quick else "") + harness.device_name()
    out = Path(args.csv) if args.csv else HERE / "results" / f"{stem}.csv"
    rows = []
    for name in ops:
        mod = __import__(f"bench_{name}")
        rows += harness.run_op(mod.OP, shapes, dtypes, device, args.quick, wanted, rep_ms=args.rep_ms,
                               on_row=lambda r: harness.write([r], out))
    harness.plot(rows, out.with_suffix(".png"))
    print(f"{len(rows)} rows appended to {out} (plot: {out.with_suffix('.png').name}) in {time.perf_counter() - t0:.1f} s")
    if args.quick:
        import step

        step.main(["--config", "tiny-imagenet", "--device", device.type, "--iters", "1", "--warmup", "0",
                   "--set", "train.batch_size=2", "--csv", str(HERE / "results" / f"quick-step-{harness.device_name()}.csv")])


if __name__ == "__main__":
    main()
