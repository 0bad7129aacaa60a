r"""What the GAN term buys on MNIST: ablations over *training* seeds (DMD2 Sec. 4.2, Table 3 at our scale).

Each (arm, training seed) is one run folder ``ROOT/ARM/seed-S`` trained by ``python -m dmd2.recipes.mnist`` in its own
process (``OMP_NUM_THREADS=1`` by default, so two runs share a 2-core machine), resumed with ``--resume auto`` when a
previous attempt was interrupted, and evaluated as ``evaluate`` does (``OUT/metrics.json``: N = 1,000, eval seeds
0, 1, 2). Teacher arms evaluate a teacher's 35-NFE ODE sampler (EDM Heun, 18 steps) and report its per-*sampling*-seed
FIDs (a teacher has no training seed here).

Commands::

    python benchmarks/mnist_gan.py list                           # arms, their overrides, what is done
    python benchmarks/mnist_gan.py run --arms dmd2,no_gan --seeds 0,1,2 --jobs 2
    python benchmarks/mnist_gan.py weak-teacher                   # train + evaluate the weak teacher (once)
    python benchmarks/mnist_gan.py collect                        # -> docs/results/mnist_gan.json
    python benchmarks/mnist_gan.py table                          # markdown table from that JSON (stdout)

``run`` is idempotent: a run whose ``metrics.json`` exists is skipped, a run with checkpoints but no metrics resumes
(training continues from the newest complete checkpoint, then evaluation runs).

Results: ``{"arms": {NAME: {"overrides": [...], "fid_by_training_seed": [...], "label_accuracy_by_training_seed":
[...], "eval_fid_std_by_training_seed": [...], "seeds": [...]}}}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results" / "mnist_gan.json"
NO_GAN = ["objective.gan_generator_weight=0", "objective.gan_discriminator_weight=0"]
#: the weak teacher: the shipped teacher's own recipe (``mnist teacher``) stopped at 1,000 of its 8,000 iterations,
#: with a shorter EMA (0.99) so the average is not dominated by the initialisation; its ODE FID is recorded
WEAK_TEACHER = ["teacher.iters=1000", "teacher.ema_decay=0.99", "teacher.checkpoint_every=500"]
#: the shipped result of `weak-teacher` (Heun-18 ODE FID 1.41 +- 0.12, label accuracy 0.784: 8x the shipped teacher's
#: 0.171), with its teacher.json beside it; `weak-teacher` retrains it into ROOT/weak_teacher to reproduce it
WEAK_TEACHER_ASSET = REPO / "dmd2" / "assets" / "mnist_teacher_weak.safetensors"


def weak_teacher_dir(root: Path) -> Path:
    return root / "weak_teacher"


def arms(root: Path) -> dict[str, dict]:
    """Arm name -> ``{"kind": "student"|"teacher", "preset": ..., "overrides": [...], "min_seeds": n}``."""
    weak = [f"teacher.path={WEAK_TEACHER_ASSET.relative_to(REPO)}"]
    return {
        "dmd2": {"kind": "student", "preset": None, "overrides": [], "min_seeds": 3},
        "no_gan": {"kind": "student", "preset": None, "overrides": NO_GAN, "min_seeds": 3},
        "teacher_ode": {"kind": "teacher", "teacher": None, "overrides": [], "min_seeds": 3},
        "weak_teacher_ode": {"kind": "teacher", "teacher": "weak", "overrides": weak, "min_seeds": 3},
        "weak_teacher_dmd2": {"kind": "student", "preset": None, "overrides": weak, "min_seeds": 3},
        "weak_teacher_no_gan": {"kind": "student", "preset": None, "overrides": weak + NO_GAN, "min_seeds": 3},
        "gan_from_critic_pass": {"kind": "student", "preset": None,
                                 "overrides": ["objective.gan_from_critic_pass=true"], "min_seeds": 3},
        "long_dmd2": {"kind": "student", "preset": "long", "overrides": [], "min_seeds": 3},
        "long_no_gan": {"kind": "student", "preset": "long", "overrides": NO_GAN, "min_seeds": 2},
        # GAN balance sweep (1 seed each, then 3 for the best two): generator weight 3e-3 x m, D weight 1e-2 x m
        **{f"gan_x{m}": {"kind": "student", "preset": None, "min_seeds": 1,
                         "overrides": [f"objective.gan_generator_weight={3e-3 * m:g}",
                                       f"objective.gan_discriminator_weight={1e-2 * m:g}"]}
           for m in (4, 16, 64)},
        # tapped features: the bottleneck (8x8, the default) and one encoder level above it (16x16), one branch each
        "gan_enc16": {"kind": "student", "preset": None, "min_seeds": 1,
                      "overrides": ["gan.layers=model.enc.8x8_block0,model.enc.16x16_block0"]},
    }


def run_dir(root: Path, arm: str, seed: int) -> Path:
    return root / arm / f"seed-{seed}"


def _env(threads: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _mnist(args: list[str], log: Path, threads: int) -> int:
    cmd = [sys.executable, "-m", "dmd2.recipes.mnist", *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        return subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(threads), cwd=REPO,
                               stdin=subprocess.DEVNULL)


def run_student(root: Path, arm: str, spec: dict, seed: int, threads: int) -> str:
    out = run_dir(root, arm, seed)
    if (out / "metrics.json").is_file():
        return f"{arm} seed {seed}: done already"
    preset = ["--preset", spec["preset"]] if spec["preset"] else []
    t0 = time.time()
    rc = _mnist([*preset, "--out", str(out), "--resume", "auto", f"train.seed={seed}", *spec["overrides"]],
                out / "run.log", threads)
    if rc == 0 and not (out / "metrics.json").is_file():  # trained earlier, evaluation interrupted
        rc = _mnist(["evaluate", *preset, "--out", str(out), *spec["overrides"]], out / "run.log", threads)
    return f"{arm} seed {seed}: rc {rc} in {time.time() - t0:.0f} s ({out})"


def train_weak_teacher(root: Path, threads: int) -> int:
    out = weak_teacher_dir(root)
    if _teacher_metrics(out / "teacher.json") is not None:
        print(f"weak teacher: done already ({out})")
        return 0
    resume = ["--resume", "auto"] if (out / "state.pt").is_file() else []
    return _mnist(["teacher", "--out", str(out), *resume, *WEAK_TEACHER], out / "run.log", threads)


def _teacher_metrics(meta: Path) -> dict | None:
    """The evaluated rows of a ``teacher.json`` (None while training or evaluation has not finished)."""
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("metrics")


def _teacher_ode(root: Path, spec: dict) -> dict | None:
    if spec["teacher"] == "weak":
        meta = WEAK_TEACHER_ASSET.with_suffix(".json")
    else:
        from dmd2.recipes.mnist_teacher import DEFAULT_TEACHER

        meta = Path(DEFAULT_TEACHER).with_suffix(".json")
    metrics = _teacher_metrics(meta)
    if metrics is None:
        return None
    row = metrics["teacher_ode"]
    return {"fid_by_training_seed": row["per_seed"]["fid"],
            "label_accuracy_by_training_seed": row["per_seed"]["label_accuracy"],
            "seeds": row["seeds"], "seed_kind": "sampling", "source": str(meta.relative_to(REPO) if meta.is_relative_to(REPO) else meta)}


def collect(root: Path) -> dict:
    result: dict = {"protocol": "dmd2.eval.fid_mnist: N=1000 (100/class), eval seeds (0,1,2) vs the held-out split; "
                                "student rows: per training seed, the mean over eval seeds of student_1step",
                    "arms": {}}
    for name, spec in arms(root).items():
        if spec["kind"] == "teacher":
            row = _teacher_ode(root, spec)
            if row is not None:
                result["arms"][name] = {"overrides": spec["overrides"], **row}
            continue
        seeds, fid, acc, fid_std = [], [], [], []
        for d in sorted((root / name).glob("seed-*"), key=lambda p: int(p.name.split("-")[1])):
            m = d / "metrics.json"
            if not m.is_file():
                continue
            s = json.loads(m.read_text())["student_1step"]
            seeds.append(int(d.name.split("-")[1]))
            fid.append(s["fid"])
            acc.append(s["label_accuracy"])
            fid_std.append(s["fid_std"])
        if seeds:
            result["arms"][name] = {"overrides": ([f"--preset {spec['preset']}"] if spec["preset"] else []) + spec["overrides"],
                                    "seeds": seeds, "seed_kind": "training", "fid_by_training_seed": fid,
                                    "label_accuracy_by_training_seed": acc, "eval_fid_std_by_training_seed": fid_std}
    return result


def _mean_std(v: list[float]) -> tuple[float, float]:
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else float("nan"))


def table(result: dict) -> str:
    lines = ["| arm | overrides | seeds | 1-step FID (mean ± std over seeds) | label accuracy | eval-seed std (mean) |",
             "|---|---|---|---|---|---|"]
    for name, r in result["arms"].items():
        m, s = _mean_std(r["fid_by_training_seed"])
        a, _ = _mean_std(r["label_accuracy_by_training_seed"])
        ev = r.get("eval_fid_std_by_training_seed")
        evs = f"{statistics.fmean(ev):.3f}" if ev else "-"
        ov = " ".join(f"`{o}`" for o in r["overrides"]) or "(none)"
        lines.append(f"| {name} | {ov} | {len(r['fid_by_training_seed'])} {r['seed_kind']} | {m:.3f} ± {s:.3f} | "
                     f"{a:.3f} | {evs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["list", "run", "weak-teacher", "collect", "table"])
    p.add_argument("--root", default=str(REPO / "runs" / "mnist_gan"), help="where the run folders live")
    p.add_argument("--arms", default="dmd2,no_gan", help="comma-separated arm names (see `list`)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one process each)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per run")
    p.add_argument("--results", default=str(RESULTS))
    a = p.parse_args(argv)
    root = Path(a.root)
    known = arms(root)
    if a.command == "list":
        for name, spec in known.items():
            done = sorted(d.name for d in (root / name).glob("seed-*") if (d / "metrics.json").is_file())
            print(f"{name:<22} {spec['kind']:<8} preset={spec.get('preset')!s:<5} {' '.join(spec['overrides'])}  done: {done}")
        return 0
    if a.command == "weak-teacher":
        return train_weak_teacher(root, a.threads)
    if a.command == "run":
        names = [n for n in a.arms.split(",") if n]
        bad = [n for n in names if n not in known]
        if bad:
            print(f"error: unknown arm(s) {bad}; valid: {', '.join(known)}", file=sys.stderr)
            return 2
        seeds = [int(s) for s in a.seeds.split(",") if s]
        jobs = [(n, s) for n in names for s in seeds if known[n]["kind"] == "student"]
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            for msg in pool.map(lambda js: run_student(root, js[0], known[js[0]], js[1], a.threads), jobs):
                print(msg, flush=True)
        for n in names:
            if known[n]["kind"] == "teacher":  # its figures come with its teacher.json (`collect` reads them)
                print(f"{n}: a teacher arm, read by `collect` from its teacher.json (the weak one: `weak-teacher`)")
        return 0
    if a.command == "collect":
        res = collect(root)
        Path(a.results).parent.mkdir(parents=True, exist_ok=True)
        Path(a.results).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {a.results}: arms {', '.join(res['arms'])}")
        return 0
    res = json.loads(Path(a.results).read_text())
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
