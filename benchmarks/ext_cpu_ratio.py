"""CPU speed of the C++ extension (impl="ext") against eager PyTorch (dmd2.kernels.reference).

    python benchmarks/ext_cpu_ratio.py [--threads 2] [--batch 4] [--shape 4 128 128] [--repeats 50]

Prints one line per op and dtype: median and minimum milliseconds of each and the ratio eager / ext (> 1: the extension is
faster). Timings are wall-clock medians over ``--repeats`` calls after warm-up; on a machine shared with other jobs,
rerun when it is quiet and read the medians, not single calls.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dmd2.kernels import cuda as ext
from dmd2.kernels import reference as R


def _median_ms(fn, repeats: int) -> float:
    """Median wall time of one call in ms, over ``repeats`` interleaved-free calls after 5 warm-up calls."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    _median_ms.last_min = min(times)
    return statistics.median(times)


def _noise_reference(x0, alpha, sigma, seed, offset):
    z = R.philox_normal(seed, offset, x0.shape)
    shape = (x0.shape[0],) + (1,) * (x0.dim() - 1)
    return (alpha.reshape(shape) * x0.float() + sigma.reshape(shape) * z).to(x0.dtype)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--shape", type=int, nargs="+", default=[4, 128, 128])
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ext.ensure_loaded()
    shape = (args.batch, *args.shape)
    print(f"threads={torch.get_num_threads()} shape={shape} torch {torch.__version__}")
    for dtype in (torch.float32, torch.bfloat16):
        x, r, f = (torch.randn(shape).to(dtype) for _ in range(3))
        torch.testing.assert_close(ext.dm_grad(x, r, f), R.dm_grad(x, r, f), rtol=1e-2, atol=1e-3)
        t_ref = _median_ms(lambda: R.dm_grad(x, r, f), args.repeats)
        m_ref = _median_ms.last_min
        t_ext = _median_ms(lambda: ext.dm_grad(x, r, f), args.repeats)
        m_ext = _median_ms.last_min
        print(f"dm_grad   {str(dtype):15s} median: eager {t_ref:8.3f} ms  ext {t_ext:8.3f} ms  ratio {t_ref / t_ext:7.2f}x"
              f" | min: eager {m_ref:.3f} ms  ext {m_ext:.3f} ms  ratio {m_ref / m_ext:.2f}x")
    alpha, sigma = torch.rand(args.batch), torch.rand(args.batch)
    x0 = torch.randn(shape)
    t_ref = _median_ms(lambda: _noise_reference(x0, alpha, sigma, 1, 0), max(5, args.repeats // 10))
    m_ref = _median_ms.last_min
    t_ext = _median_ms(lambda: ext.noise_add(x0, alpha, sigma, 1, 0), args.repeats)
    m_ext = _median_ms.last_min
    print(f"noise_add {str(torch.float32):15s} median: eager {t_ref:8.3f} ms  ext {t_ext:8.3f} ms  ratio {t_ref / t_ext:7.2f}x"
          f" | min: eager {m_ref:.3f} ms  ext {m_ext:.3f} ms  ratio {m_ref / m_ext:.2f}x")


if __name__ == "__main__":
    main()
