"""Shared benchmark harness: providers from the kernel registry, timing, bytes model, CSV + PNG output.

A benchmark (``bench_<op>.py``) describes its op with :class:`Op`: how to build inputs for a shape, how to call an
implementation, and how many bytes each mode must move at minimum (every input read once, every output written once).
The harness times each available provider in modes ``forward``, ``backward`` and ``full`` (forward + backward):

* providers: every implementation registered for the op in :mod:`dmd2.kernels` whose availability check passes on the
  device (``torch`` = the eager reference, ``triton``, ``ext`` when built), plus ``torch.compile`` of the reference;
* time: median of ``triton.testing.do_bench`` on CUDA, of a ``time.perf_counter`` loop on CPU;
* GB/s = bytes / time; percent of the device-to-device copy bandwidth measured in the same run on a tensor of
  the op's size; peak memory above the inputs (CUDA only); speed-up vs eager.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))  # the repository's dmd2, not an installed copy

import dmd2.kernels as K  # noqa: E402
from dmd2.kernels import reference as R  # noqa: E402

MODES = ("forward", "backward", "full")
FULL_SHAPES = {"sdxl-b2": (2, 4, 128, 128), "sdxl-b16": (16, 4, 128, 128), "imagenet64-b40": (40, 3, 64, 64)}
QUICK_SHAPES = {"quick": (2, 4, 16, 16)}
FIELDS = ["date", "device", "torch", "triton", "op", "shape", "dtype", "provider", "mode", "median_ms", "gbps",
          "pct_copy", "peak_mem_mb", "speedup_vs_eager", "note"]


@dataclass
class Op:
    """One benchmarked op.

    name: registry name. setup(shape, dtype, device) -> dict of inputs (tensors requiring grad where the op has a
    backward). call(fn, inputs) -> the differentiable output (a tensor) for implementation ``fn`` (the registered
    callable). bytes(mode, shape, dtype) -> minimal bytes moved. has_backward: whether backward/full apply.
    """

    name: str
    setup: Callable
    call: Callable
    bytes: Callable
    has_backward: bool = True


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{platform.machine()}"


def elsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_passes(forward: int, backward: int, dtype: torch.dtype | None = None) -> Callable:
    """:attr:`Op.bytes` of an op whose minimal traffic is ``forward`` (``backward``) reads + writes of tensors of the
    benchmarked shape in the forward (backward) pass, each element ``elsize(dtype)`` bytes (default: the benchmarked
    dtype); ``full`` moves both."""
    per_mode = {"forward": forward, "backward": backward, "full": forward + backward}
    return lambda mode, shape, dt: per_mode[mode] * torch.Size(shape).numel() * elsize(dtype or dt)


def bench(fn: Callable[[], object], quick: bool, rep_ms: int | None = None) -> float:
    """Median milliseconds of ``fn()``; on CUDA ``do_bench`` over ``rep_ms`` (default 50 quick, 500 full; warm-up a fifth, >= 25)."""
    if torch.cuda.is_available():
        import triton.testing

        rep = rep_ms or (50 if quick else 500)
        return float(triton.testing.do_bench(fn, warmup=max(25, rep // 5), rep=rep, return_mode="median"))
    fn()  # warm up (and compile)
    times = []
    budget = time.perf_counter() + (0.3 if quick else 3.0)
    while len(times) < 3 or (time.perf_counter() < budget and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_gbps(numel: int, dtype: torch.dtype, device, quick: bool, rep_ms: int | None = None) -> float:
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), quick, rep_ms)
    return 2 * numel * elsize(dtype) / ms / 1e6


def providers(op: Op, device: torch.device, wanted=None) -> tuple[dict[str, Callable], dict[str, str]]:
    """Runnable implementations of ``op`` on ``device`` and, for the others, why they are skipped."""
    run, skipped = {}, {}
    for impl in K.implementations(op.name):
        reason = K.availability(impl, device)
        if reason is None:
            run[impl] = K.resolve(op.name, impl, device)
        else:
            skipped[impl] = reason
    run["torch.compile"] = torch.compile(getattr(R, op.name))
    if wanted:
        for name in list(run):
            if name not in wanted:
                skipped.setdefault(name, "not requested (--providers)")
                del run[name]
    return run, skipped


def _timed(op: Op, fn: Callable, inputs: dict, mode: str, quick: bool, rep_ms: int | None) -> float:
    grad_inputs = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def forward():
        return op.call(fn, inputs)

    if mode == "forward":
        with torch.no_grad():
            return bench(forward, quick, rep_ms)
    out = forward()
    up = torch.randn_like(out)
    if mode == "backward":
        return bench(lambda: torch.autograd.grad(out, grad_inputs, up, retain_graph=True), quick, rep_ms)
    return bench(lambda: torch.autograd.grad(forward(), grad_inputs, up), quick, rep_ms)


def run_op(op: Op, shapes: dict, dtypes, device: torch.device, quick: bool, wanted=None, note: str = "",
           rep_ms: int | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Rows of every (shape, dtype, provider, mode); ``on_row(row)`` as soon as each is measured."""
    import triton

    rows = []
    provs, skipped = providers(op, device, wanted)
    for name, why in skipped.items():
        print(f"  {op.name}: provider {name} skipped: {why}")
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for shape_name, shape in shapes.items():
        for dtype in dtypes:
            numel = torch.Size(shape).numel()
            copy = copy_gbps(numel, dtype, device, quick, rep_ms)
            eager = {}
            for prov, fn in provs.items():
                for mode in MODES if op.has_backward else ("forward",):
                    inputs = op.setup(shape, dtype, device)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                    try:
                        ms = _timed(op, fn, inputs, mode, quick, rep_ms)
                    except Exception as e:  # a provider that cannot run this case is reported, not fatal
                        print(f"  {op.name} {shape_name} {dtype} {prov} {mode}: failed: {type(e).__name__}: {e}")
                        continue
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")
                    gbps = op.bytes(mode, shape, dtype) / ms / 1e6
                    if prov == "torch":
                        eager[mode] = ms
                    rows.append(dict(
                        date=stamp, device=device_name(), torch=torch.__version__, triton=triton.__version__, op=op.name,
                        shape=f"{shape_name}:{'x'.join(map(str, shape))}", dtype=str(dtype).replace("torch.", ""),
                        provider=prov, mode=mode, median_ms=f"{ms:.4f}", gbps=f"{gbps:.2f}",
                        pct_copy=f"{100 * gbps / copy:.1f}", peak_mem_mb=f"{peak:.2f}",
                        speedup_vs_eager=f"{eager[mode] / ms:.2f}" if mode in eager else "", note=note,
                    ))
                    if device.type == "cpu" and prov == "triton":
                        rows[-1]["note"] = (note + " triton-interpreter").strip()
                    r = rows[-1]
                    if on_row is not None:
                        on_row(r)
                    print(f"  {op.name:13s} {r['shape']:24s} {r['dtype']:8s} {prov:13s} {mode:8s} {r['median_ms']:>10s} ms"
                          f" {r['gbps']:>9s} GB/s {r['pct_copy']:>6s}% copy  x{r['speedup_vs_eager'] or '-'} eager")
    return rows


def write(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict], path: Path) -> None:
    """Bar chart of achieved GB/s per (op, shape, mode), one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["op"], r["shape"].split(":")[0], r["dtype"], r["mode"]) for r in rows})
    provs = sorted({r["provider"] for r in rows})
    if not keys:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(keys) * len(provs) / 2), 4.5))
    width = 0.8 / len(provs)
    for j, p in enumerate(provs):
        vals = []
        for k in keys:
            v = [float(r["gbps"]) for r in rows if (r["op"], r["shape"].split(":")[0], r["dtype"], r["mode"]) == k
                 and r["provider"] == p]
            vals.append(v[-1] if v else 0.0)
        ax.bar([i + j * width for i in range(len(keys))], vals, width, label=p)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
    ax.set_xticklabels(["\n".join(k) for k in keys], fontsize=6)
    ax.set_ylabel("GB/s (minimal bytes / median time)")
    ax.set_title(f"dmd2 kernels on {rows[0]['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
