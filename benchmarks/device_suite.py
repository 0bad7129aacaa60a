"""Every GPU measurement the README needs, in one command for one CUDA GPU (<= 8 minutes wall), or its CPU dry run.

``bash benchmarks/device_suite.sh [--out DIR] [--wheels DIR] [--only PART,...] [--dry-run]``
(``python benchmarks/device_suite.py`` takes the same arguments).

Parts, in order, each in a child process under ``timeout`` with its own time box (seconds: GPU / dry run), each
recorded whatever the others did (a part that fails or runs out of time is written down and the suite goes on):

* ``env`` (in-process): GPU, driver, CUDA, nvcc, torch, triton, diffusers and Python versions, load average, commit;
  every API of :data:`API_CHECKS` (what the package needs from torch 2.11 / triton 3.6) looked up, missing ones listed.
* ``deps`` (15 / 90): ``import diffusers``; if that fails, ``pip install --no-index --no-deps`` every wheel of
  ``--wheels DIR`` into a private folder that goes on the children's ``PYTHONPATH``.
* ``ext_build`` (75 / 90): ``python -m dmd2.kernels.cuda --build`` for this GPU's architecture (dry: ``--cpu``).
* ``pytest`` (100 / 90): ``pytest -m "gpu or triton" tests`` (the extension's CUDA kernels, every implementation's
  contract on CUDA, the Triton kernels vs the reference on CUDA) with a junit XML; the dry run runs ``-m gpu``: it
  collects the same tests and skips them ("needs a CUDA GPU"); CI's test run covers the Triton ones in the interpreter.
* ``sdxl_plan`` (25 / 90): ``python -m dmd2.recipes.sdxl memory --json``, the planned memory per mode (dry: batch 1 at
  256 px).
* ``step_imagenet64`` (55 / 90): ``benchmarks/step.py --config imagenet64`` (the 296M ADM, batch 40, bf16, random
  weights; dry: ``tiny-imagenet`` on CPU).
* ``step_sdxl`` (100 / 90): ``benchmarks/step.py --config sdxl`` (SDXL base UNet in ``shared-base`` mode, 1024 px,
  batch 2, gradient checkpointing, random weights materialised from the meta device; dry: ``sdxl-tiny`` on CPU).
* ``kernels`` (55 / 90): ``benchmarks/run.py`` at full sizes, providers ``torch`` (eager), ``triton``, ``ext``,
  ``--rep-ms 100`` (dry: ``--quick``).
* ``kernels_compile`` (50 / not run): the same for ``torch.compile`` of the reference, into the same CSV; it comes
  last because inductor's compilations take most of its box (rows are written as they are measured, so a box that
  ends keeps what was measured). Not in the dry run: inductor's C++ build takes minutes on a small CPU.

The GPU boxes add up to 475 s (plus a few seconds of env and summary): 8 minutes at most. The dry run's boxes are
hang guards; it takes about 40 s of CPU (CI runs it after the test suite, with the C++ extension already built), so
it ends well inside 2 minutes on an idle 2-core machine. Each part's wall and child CPU seconds are recorded.

Output, flat under ``--out`` (default: ``$OUT`` if set, else a new temporary folder), seven files at most:
``summary.md`` (the tables, also printed last), ``suite.json`` (environment, every part's command, status, exit
code, seconds; the parsed results; the full-run commands even in a dry run), ``kernels.csv`` + ``kernels.png``
(run.py's rows), ``step.csv`` (step.py's rows), ``pytest-gpu.xml`` and ``logs.txt`` (every part's output).
Exit code 0 when every part ran to completion with exit code 0, else 1.

Guards for the device image (torch 2.11, triton 3.6, no diffusers): the package uses no API newer than those
(audit in benchmarks/README.md, "Device suite"); ``env`` looks each one up on the machine and records what is missing;
diffusers (and any other pure-Python package the image lacks) comes from ``--wheels``; ``pytest`` runs with
``--continue-on-collection-errors`` so one test module's missing import cannot stop the GPU tests of the others.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import importlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
GB = 1e9


@dataclass(frozen=True)
class Part:
    """One time-boxed step: its box in seconds on the GPU and in the dry run (``None``: not part of the dry run)."""

    name: str
    box_s: int
    dry_box_s: int | None


PARTS = (
    Part("deps", 15, 90),
    Part("ext_build", 75, 90),
    Part("pytest", 100, 90),
    Part("sdxl_plan", 25, 90),
    Part("step_imagenet64", 55, 90),
    Part("step_sdxl", 100, 90),
    Part("kernels", 55, 90),
    Part("kernels_compile", 50, None),
)
STEP_CONFIGS = {"step_imagenet64": ("imagenet64", "tiny-imagenet"), "step_sdxl": ("sdxl", "sdxl-tiny")}

# (module, attribute path, the oldest release that has it): what the package calls that a torch 2.11 / triton 3.6
# image must provide; `env` records any that is missing
API_CHECKS = (
    ("torch.library", "register_fake", "torch 2.4"),
    ("torch.library", "register_autograd", "torch 2.4"),
    ("torch.library", "opcheck", "torch 2.4"),
    ("torch.distributed.fsdp", "fully_shard", "torch 2.6 (public path)"),
    ("torch.distributed.fsdp", "MixedPrecisionPolicy", "torch 2.6 (public path)"),
    ("torch.distributed.checkpoint.state_dict", "get_model_state_dict", "torch 2.2"),
    ("torch.distributed.tensor", "distribute_tensor", "torch 2.5 (public path)"),
    ("torch.utils.flop_counter", "FlopCounterMode", "torch 2.1"),
    ("torch.nn.functional", "scaled_dot_product_attention", "torch 2.0"),
    ("triton", "knobs.runtime.interpret", "triton 3.4"),
    ("triton.language", "randn", "triton 2.0"),
    ("triton.testing", "do_bench", "triton 2.0"),
)


def _run(cmd, timeout: float | None = 15) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (r.stdout or r.stderr).strip() if r.returncode == 0 else f"unavailable (exit {r.returncode})"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({type(e).__name__})"


def _lookup(module: str, attr: str):
    obj = importlib.import_module(module)
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def environment() -> dict:
    """Versions and the GPU, read on this machine; every field is a string, never an exception."""
    env: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "host": platform.node(), "machine": platform.machine(), "cpus": str(os.cpu_count()),
                 "python": platform.python_version(), "python_exe": PY}
    try:
        env["loadavg"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        env["loadavg"] = "n/a"
    env["git_commit"] = _run(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    for name in ("torch", "triton", "diffusers", "transformers", "numpy"):
        try:
            env[name] = importlib.import_module(name).__version__
        except Exception as e:  # a missing or broken package is a fact to record
            env[name] = f"not importable ({type(e).__name__}: {e})"
    try:
        import torch

        env["torch_cuda"] = str(torch.version.cuda)
        env["cuda_available"] = str(torch.cuda.is_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env["gpu"] = p.name
            env["gpu_capability"] = f"{p.major}.{p.minor}"
            env["gpu_memory_gib"] = f"{p.total_memory / 2**30:.1f}"
            env["gpu_count"] = str(torch.cuda.device_count())
    except Exception as e:
        env["torch_cuda"] = f"unavailable ({type(e).__name__}: {e})"
    env["nvidia_smi"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"]) if shutil.which("nvidia-smi") else "not found"
    env["nvcc"] = _run(["nvcc", "--version"]).splitlines()[-1] if shutil.which("nvcc") else "not found"
    missing = []
    for module, attr, since in API_CHECKS:
        try:
            _lookup(module, attr)
        except Exception as e:
            missing.append(f"{module}.{attr} (since {since}): {type(e).__name__}")
    env["api_missing"] = missing
    return env


def _arch() -> str:
    """TORCH_CUDA_ARCH_LIST for the extension: the visible GPU's capability, else the build's default (8.0;9.0)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}.{minor}"
    except Exception:
        pass
    return "8.0;9.0"


def commands(dry: bool, out: Path, work: Path) -> dict[str, list[str]]:
    """The command of every child part (``deps`` runs in-process)."""
    step = [PY, str(HERE / "step.py"), "--iters", "1", "--csv", str(out / "step.csv")]
    cmds = {
        "ext_build": [PY, "-m", "dmd2.kernels.cuda", "--cpu" if dry else "--build", "--quiet"],
        "pytest": [PY, "-m", "pytest", "-m", "gpu" if dry else "gpu or triton", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                   f"--junitxml={out / 'pytest-gpu.xml'}", str(ROOT / "tests")],
        "sdxl_plan": [PY, "-m", "dmd2.recipes.sdxl", "memory", "--json"]
                     + (["train.batch_size=1", "model.resolution=256"] if dry else []),
        "kernels": [PY, str(HERE / "run.py"), "--csv", str(out / "kernels.csv"), "--providers", "torch,triton,ext"]
                   + (["--quick"] if dry else ["--rep-ms", "100"]),
        "kernels_compile": [PY, str(HERE / "run.py"), "--csv", str(out / "kernels.csv"), "--providers", "torch.compile",
                            "--rep-ms", "100"],
    }
    for part, (full, tiny) in STEP_CONFIGS.items():
        device = ["--device", "cpu", "--warmup", "0", "--threads", "1"] if dry else ["--device", "cuda", "--warmup", "1"]
        cmds[part] = step + ["--config", tiny if dry else full, "--json", str(work / f"{part}.json"), *device]
    return cmds


def install_wheels(wheels: Path | None, site: Path, log, box: int) -> tuple[str, str]:
    """``deps``: diffusers importable as it is, or installed from ``wheels``; returns ``(what happened, diffusers
    version)`` and raises when diffusers cannot be imported afterwards (or a step outlasts ``box`` seconds)."""
    probe = [PY, "-c", "import diffusers; print(diffusers.__version__)"]
    r = subprocess.run(probe, capture_output=True, text=True, env=_child_env(site), timeout=box)
    if r.returncode == 0:
        return "already importable; nothing installed", r.stdout.strip()
    if wheels is None:
        raise RuntimeError("diffusers is not importable and no --wheels DIR was given")
    found = sorted(str(p) for p in wheels.glob("*.whl"))
    if not found:
        raise RuntimeError(f"no .whl files in --wheels {wheels}")
    cmd = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--target", str(site), *found]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, timeout=box)
    r = subprocess.run(probe, capture_output=True, text=True, env=_child_env(site), timeout=box)
    if r.returncode != 0:
        raise RuntimeError(f"installed {len(found)} wheels but diffusers still fails to import: {r.stderr.strip()[-400:]}")
    return f"installed {', '.join(Path(f).name for f in found)}", r.stdout.strip()


def _child_env(site: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(site), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_part(part: Part, cmd: list[str], box: int, env: dict, log, stdout=None) -> dict:
    """Run ``cmd`` under ``timeout`` (SIGTERM at ``box`` s, SIGKILL 10 s later); its output goes to ``log`` (its
    stdout to the file ``stdout`` when given)."""
    log.write(f"\n===== {part.name} (box {box} s): {' '.join(cmd)}\n")
    log.flush()
    t0, cpu0 = time.perf_counter(), _children_cpu()
    wrapped = ["timeout", "-k", "10", str(box), *cmd] if shutil.which("timeout") else cmd
    try:
        with open(stdout, "w") if stdout else contextlib.nullcontext(log) as sink:
            rc = subprocess.run(wrapped, stdout=sink, stderr=log if stdout else subprocess.STDOUT, env=env, cwd=ROOT,
                                timeout=None if wrapped is not cmd else box).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    seconds, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    status = "ok" if rc == 0 else "timeout" if rc in (124, 137, -9) else "failed"
    log.write(f"===== {part.name}: {status} (exit {rc}) in {seconds:.1f} s, {cpu:.1f} s CPU\n")
    log.flush()
    return {"name": part.name, "cmd": cmd, "box_s": box, "rc": rc, "status": status, "seconds": round(seconds, 1),
            "cpu_s": round(cpu, 1)}


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (``timeout`` passes on its child's)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# ------------------------------------------------------------------------------------------------ results
def pytest_counts(path: Path) -> dict:
    """Counts from pytest's junit XML; a module that failed to import is a collection error, not a test."""
    if not path.exists():
        return {}
    cases = ET.parse(path).getroot().findall(".//testcase")
    coll = [c for c in cases if c.find("error") is not None and c.find("error").get("message") == "collection failure"]
    tests = [c for c in cases if c not in coll]
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in tests
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = sum(1 for c in tests if c.find("skipped") is not None)
    return {"tests": len(tests), "passed": len(tests) - skipped - len(failed), "skipped": skipped, "failed": failed,
            "collection_errors": [c.get("name") for c in coll]}


def kernel_rows(path: Path) -> list[dict]:
    """One row per (op, shape, dtype, mode): ms per provider, Triton / ext vs eager and torch.compile, % of copy."""
    if not path.exists():
        return []
    by: dict = {}
    with path.open() as f:
        for r in csv.DictReader(f):
            key = (r["op"], r["shape"], r["dtype"], r["mode"])
            by.setdefault(key, {})[r["provider"]] = (float(r["median_ms"]), float(r["pct_copy"]))
    rows = []
    for (op, shape, dtype, mode), p in by.items():
        row = {"op": op, "shape": shape, "dtype": dtype, "mode": mode,
               **{f"{k}_ms": v[0] for k, v in p.items()}}
        for fused in ("triton", "ext"):
            if fused in p:
                ms = p[fused][0]
                row[f"{fused}_pct_copy"] = p[fused][1]
                row[f"{fused}_vs_eager"] = p["torch"][0] / ms if "torch" in p else math.nan
                row[f"{fused}_vs_compile"] = p["torch.compile"][0] / ms if "torch.compile" in p else math.nan
        rows.append(row)
    return rows


def _plot(csv_path: Path, png: Path) -> str:
    """One plot of both kernel parts' rows (each run.py plotted only its own)."""
    sys.path.insert(0, str(HERE))
    import harness

    with csv_path.open() as f:
        harness.plot(list(csv.DictReader(f)), png)
    return png.name


def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def summary_md(res: dict) -> str:
    env, lines = res["env"], []
    lines += [f"# dmd2 device suite{' (dry run, CPU)' if res['dry_run'] else ''}", "",
              f"{env.get('gpu', 'no GPU')} · driver/GPU: {env['nvidia_smi']} · CUDA (torch) {env.get('torch_cuda')} · "
              f"nvcc {env['nvcc']}", "",
              f"torch {env['torch']} · triton {env['triton']} · diffusers {env['diffusers']} · Python {env['python']} · "
              f"{env['cpus']} CPUs · load {env['loadavg']} · commit {env['git_commit']} · {env['date']}", ""]
    lines.append("APIs missing on this machine: " + (", ".join(env["api_missing"]) or "none"))
    lines += [f"Result not read: {k}: {v}" for k, v in res.get("errors", {}).items()]
    lines += ["", "| part | status | exit | wall s | CPU s | box s |", "|---|---|---:|---:|---:|---:|"]
    for p in res["parts"]:
        lines.append(f"| {p['name']} | {p['status']} | {p.get('rc', '')} | {p.get('seconds', '')} | {p.get('cpu_s', '')} | "
                     f"{p.get('box_s', '')} |")
    pt = res.get("pytest", {})
    if pt:
        lines += ["", f"pytest -m '{'gpu' if res['dry_run'] else 'gpu or triton'}': {pt['tests']} tests, {pt['passed']} passed, {pt['skipped']} skipped, "
                      f"{len(pt['failed'])} failed; modules that failed to import: {', '.join(pt['collection_errors']) or 'none'}"
                  + "".join(f"\n- FAILED {n}" for n in pt["failed"][:20])]
    for name, s in res.get("steps", {}).items():
        k = s["kinds"]
        lines += ["", f"step.py --config {s['config']} on {s['device_name']} (ratio {s['ratio']}, {s['cycles']} cycle, "
                      f"build {s['build_s']:.1f} s)", "",
                  "| iteration | s | forward | backward | optimizer | peak MiB |", "|---|---:|---:|---:|---:|---:|"]
        for kind in ("generator_turn", "critic_only", "amortised"):
            v = k[kind]
            lines.append(f"| {kind} | {v['total']:.4f} | {v['forward']:.4f} | {v['backward']:.4f} | "
                         f"{v['optimizer']:.4f} | {_f(v['peak_mem_mb'], '{:.0f}')} |")
    plan, sdxl = res.get("sdxl_plan"), res.get("steps", {}).get("step_sdxl")
    if plan:
        sb = plan["modes"]["shared-base"]
        planned = (sb["total_checkpointed"] - sb["text_encoders_vae"]) / GB
        measured = max(sdxl["kinds"][k]["peak_mem_mb"] for k in ("generator_turn", "critic_only")) * 2**20 / GB \
            if sdxl else math.nan
        lines += ["", f"SDXL shared-base, batch {plan['batch']} at {plan['resolution']} px, gradient checkpointing: "
                      f"planned {sb['total_checkpointed'] / GB:.1f} GB with text encoders + VAE, {planned:.1f} GB "
                      f"without (what step.py loads); measured peak (max_memory_allocated) {_f(measured, '{:.1f}')} GB"]
    krows = res.get("kernels", [])
    if krows:
        lines += ["", "| op | shape | dtype | mode | eager ms | compile ms | triton ms | x eager | x compile | % copy | "
                      "ext ms | x eager | % copy |", "|---|---|---|---|" + "---:|" * 9]
        for r in krows:
            lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['mode']} | {_f(r.get('torch_ms'), '{:.4f}')} | "
                         f"{_f(r.get('torch.compile_ms'), '{:.4f}')} | {_f(r.get('triton_ms'), '{:.4f}')} | "
                         f"{_f(r.get('triton_vs_eager'), '{:.2f}')} | {_f(r.get('triton_vs_compile'), '{:.2f}')} | "
                         f"{_f(r.get('triton_pct_copy'), '{:.0f}')} | {_f(r.get('ext_ms'), '{:.4f}')} | "
                         f"{_f(r.get('ext_vs_eager'), '{:.2f}')} | {_f(r.get('ext_pct_copy'), '{:.0f}')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="results folder (default: $OUT, else a new temporary folder)")
    ap.add_argument("--wheels", default=None, help="folder of .whl files to install when diffusers is missing")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {[p.name for p in PARTS]}")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, < 2 minutes: the plumbing only")
    args = ap.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    unknown = only - {p.name for p in PARTS}
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}; known: {[p.name for p in PARTS]}")
    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="dmd2-device-suite-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dmd2-suite-work-"))  # step JSONs, the wheel site: not results
    site = work / "site"
    dry = args.dry_run
    t_start = time.perf_counter()
    res: dict = {"dry_run": dry, "out": str(out), "parts": [], "full_commands": commands(False, out, work)}
    res["env"] = environment()
    cmds = commands(dry, out, work)
    env = _child_env(site)
    env["TORCH_CUDA_ARCH_LIST"] = env.get("TORCH_CUDA_ARCH_LIST") or _arch()
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    if not dry:
        env["DMD2_REQUIRE_EXT"] = "1"  # on the GPU a failed extension build fails the GPU tests, never skips them
    with (out / "logs.txt").open("a") as log:
        for part in PARTS:
            if only and part.name not in only:
                res["parts"].append({"name": part.name, "status": "not run (--only)"})
                continue
            box = part.dry_box_s if dry else part.box_s
            if box is None:
                res["parts"].append({"name": part.name, "status": "not run (dry run)"})
                continue
            if part.name == "deps":
                t0 = time.perf_counter()
                try:
                    note, version = install_wheels(Path(args.wheels) if args.wheels else None, site, log, box)
                    status, res["env"]["diffusers"] = "ok", version
                except Exception as e:
                    note, status = f"{type(e).__name__}: {e}", "failed"
                res["parts"].append({"name": "deps", "status": status, "note": note, "box_s": box,
                                     "seconds": round(time.perf_counter() - t0, 1)})
                log.write(f"===== deps: {status}: {note}\n")
                continue
            plan = work / "sdxl_plan.json" if part.name == "sdxl_plan" else None
            res["parts"].append(run_part(part, cmds[part.name], box, env, log, plan))
    res["errors"] = {}

    def collect(key, fn):  # a result that cannot be read (a part killed mid-write) is an error to report, not a crash
        try:
            res[key] = fn()
        except Exception as e:
            res["errors"][key] = f"{type(e).__name__}: {e}"

    collect("pytest", lambda: pytest_counts(out / "pytest-gpu.xml"))
    collect("kernels", lambda: kernel_rows(out / "kernels.csv"))
    if res.get("kernels"):
        collect("kernels_plot", lambda: _plot(out / "kernels.csv", out / "kernels.png"))
    collect("steps", lambda: {p: json.loads((work / f"{p}.json").read_text())
                              for p in STEP_CONFIGS if (work / f"{p}.json").exists()})
    if any(p["name"] == "sdxl_plan" and p["status"] == "ok" for p in res["parts"]):
        collect("sdxl_plan", lambda: json.loads((work / "sdxl_plan.json").read_text()))
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "suite.json").write_text(json.dumps(res, indent=2, default=str))
    try:
        md = summary_md(res)
    except Exception as e:
        md = f"# dmd2 device suite\n\nsummary failed ({type(e).__name__}: {e}); every result is in suite.json\n"
    (out / "summary.md").write_text(md)
    shutil.rmtree(work, ignore_errors=True)
    print(md)
    print(f"device suite: {res['seconds']} s; results in {out}")
    ok = all(p["status"] == "ok" or p["status"].startswith("not run") for p in res["parts"]) and not res["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
