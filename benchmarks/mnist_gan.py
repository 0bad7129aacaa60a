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
    python benchmarks/mnist_gan.py paired --arms long_dmd2,long_no_gan --eval-seeds 0-11
                                    # students vs the teacher's ODE on the same 12 eval seeds -> mnist_gan_paired.json
    python benchmarks/mnist_gan.py docs                           # regenerate the tables in docs/mnist.md, README.md

``run`` is idempotent: a run whose ``metrics.json`` exists is skipped, a run with checkpoints but no metrics resumes
(training continues from the newest complete checkpoint, then evaluation runs).

Results: ``{"arms": {NAME: {"overrides": [...], "fid_by_training_seed": [...], "label_accuracy_by_training_seed":
[...], "eval_fid_std_by_training_seed": [...], "seeds": [...]}}}``.
"""
from __future__ import annotations

import argparse
import json
import math
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
        # the balance sweep from the weak teacher, whose error is large enough that the GAN may need more weight
        **{f"weak_teacher_gan_x{m}": {"kind": "student", "preset": None, "min_seeds": 1,
                                      "overrides": weak + [f"objective.gan_generator_weight={3e-3 * m:g}",
                                                           f"objective.gan_discriminator_weight={1e-2 * m:g}"]}
           for m in (4, 16)},
        # the generator's GAN weight alone x16 (D weight kept): D's weight also scales the GAN loss against the fake
        # score's denoising loss in their shared backbone, so the sweep above changes two balances at once
        "gan_g_x16": {"kind": "student", "preset": None, "min_seeds": 1,
                      "overrides": [f"objective.gan_generator_weight={3e-3 * 16:g}"]},
        "weak_teacher_gan_g_x16": {"kind": "student", "preset": None, "min_seeds": 1,
                                   "overrides": weak + [f"objective.gan_generator_weight={3e-3 * 16:g}"]},
        # the diffusion GAN's noise only where the discriminator separates (sigma <= ~2: grid fraction 0.47 of EDM's
        # Karras grid; half the default draws land above it, where D is near chance)
        "gan_low_noise": {"kind": "student", "preset": None, "min_seeds": 1, "overrides": ["objective.gan_max_frac=0.47"]},
        "weak_teacher_gan_low_noise": {"kind": "student", "preset": None, "min_seeds": 1,
                                       "overrides": weak + ["objective.gan_max_frac=0.47"]},
        # D-input augmentation: every image the diffusion GAN sees (reals and fakes) shifted by up to 2 px per axis,
        # against a discriminator that wins on 4,000 real digits
        "gan_shift2": {"kind": "student", "preset": None, "min_seeds": 3, "overrides": ["objective.gan_shift=2"]},
        "weak_teacher_gan_shift2": {"kind": "student", "preset": None, "min_seeds": 3,
                                    "overrides": weak + ["objective.gan_shift=2"]},
        "gan_shift2_x4": {"kind": "student", "preset": None, "min_seeds": 1,
                          "overrides": ["objective.gan_shift=2", f"objective.gan_generator_weight={3e-3 * 4:g}",
                                        f"objective.gan_discriminator_weight={1e-2 * 4:g}"]},
        # tapped features: the bottleneck (8x8, the default) and one encoder level above it (16x16), one branch each
        "gan_enc16": {"kind": "student", "preset": None, "min_seeds": 1,
                      "overrides": ["gan.layers=model.enc.8x8_block0,model.enc.16x16_block0"]},
    }


def arm_overrides(spec: dict) -> list[str]:
    """What an arm changes from the default command, as recorded in the results: ``--preset P`` then its overrides."""
    return ([f"--preset {spec['preset']}"] if spec.get("preset") else []) + spec["overrides"]


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


def _teacher_json(which: str | None) -> Path:
    """The record beside a teacher's weights: the weak one's, or (None) the shipped one's."""
    if which == "weak":
        return WEAK_TEACHER_ASSET.with_suffix(".json")
    from dmd2.recipes.mnist_teacher import DEFAULT_TEACHER

    return Path(DEFAULT_TEACHER).with_suffix(".json")


def _teacher_ode(root: Path, spec: dict, paired_file: Path | None = None) -> dict | None:
    """A teacher arm's row: its ODE FID per sampling seed. The shipped teacher's comes from ``paired_file`` (the
    `paired` pass: 12 sampling seeds) when that exists, else from its teacher.json (seeds 0, 1, 2)."""
    if spec["teacher"] is None and paired_file is not None and paired_file.is_file():
        p = json.loads(paired_file.read_text())
        src = paired_file.relative_to(REPO) if paired_file.is_relative_to(REPO) else paired_file
        acc = _teacher_metrics(Path(_teacher_json(None)))["teacher_ode"]["per_seed"]["label_accuracy"]
        return {"fid_by_training_seed": p["teacher_ode"], "label_accuracy_by_training_seed": acc,
                "label_accuracy_seeds": [0, 1, 2],
                "seeds": p["eval_seeds"], "seed_kind": "sampling", "source": f"{src} (teacher_ode)"}
    meta = _teacher_json(spec["teacher"])
    metrics = _teacher_metrics(meta)
    if metrics is None:
        return None
    row = metrics["teacher_ode"]
    return {"fid_by_training_seed": row["per_seed"]["fid"],
            "label_accuracy_by_training_seed": row["per_seed"]["label_accuracy"],
            "seeds": row["seeds"], "seed_kind": "sampling", "source": str(meta.relative_to(REPO) if meta.is_relative_to(REPO) else meta)}


def collect(root: Path, paired_file: Path | None = None) -> dict:
    result: dict = {"protocol": "dmd2.eval.fid_mnist: N=1000 (100/class), eval seeds (0,1,2) vs the held-out split; "
                                "student rows: per training seed, the mean over eval seeds of student_1step",
                    "arms": {}}
    for name, spec in arms(root).items():
        if spec["kind"] == "teacher":
            row = _teacher_ode(root, spec, paired_file)
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
            result["arms"][name] = {"overrides": arm_overrides(spec),
                                    "seeds": seeds, "seed_kind": "training", "fid_by_training_seed": fid,
                                    "label_accuracy_by_training_seed": acc, "eval_fid_std_by_training_seed": fid_std}
    return result


PAIRED = REPO / "docs" / "results" / "mnist_gan_paired.json"


def _fid_per_seed(cache: Path, sample_fn, seeds: list[int]) -> list[float]:
    """FID per evaluation seed (N = 1,000 each, the `evaluate` protocol for one seed) of ``sample_fn()``'s sampler,
    cached per seed in ``cache`` (JSON ``{seed: fid}``) so an interrupted pass resumes."""
    from dmd2.eval.fid_mnist import evaluate_sampler

    done = {int(k): v for k, v in json.loads(cache.read_text()).items()} if cache.is_file() else {}
    sampler = None
    for seed in seeds:
        if seed in done:
            continue
        sampler = sampler or sample_fn()
        done[seed] = evaluate_sampler(sampler, seeds=(seed,)).fid[0]
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({str(k): done[k] for k in sorted(done)}, indent=1) + "\n")
    return [done[s] for s in seeds]


def paired(root: Path, names: list[str], eval_seeds: list[int], threads: int) -> dict:
    """Each arm's students (final EMA, 1 step) and the shipped teacher's 35-NFE ODE on the SAME evaluation seeds
    (same labels, same seeded noise), one FID per seed: a paired comparison whose per-seed sampling noise is shared."""
    import torch

    from dmd2.eval.samplers import heun_sampler
    from dmd2.recipes import mnist
    from dmd2.recipes.mnist_teacher import DEFAULT_TEACHER, load_teacher
    from dmd2.train import load_generator

    torch.set_num_threads(threads)
    teacher = _fid_per_seed(root / "paired" / "teacher_ode.json",
                            lambda: heun_sampler(load_teacher(DEFAULT_TEACHER), mnist.IMAGE_SHAPE, 18), eval_seeds)
    out = {"protocol": "dmd2.eval.fid_mnist, one evaluation seed per FID (N=1000, 100/class); students: final EMA "
                       "checkpoint, 1 step; teacher: the shipped one, EDM Heun 18 steps (35 NFE)",
           "eval_seeds": eval_seeds, "teacher_ode": teacher, "arms": {}}
    for name in names:
        students = {}
        for d in sorted((root / name).glob("seed-*"), key=lambda p: int(p.name.split("-")[1])):
            if not (d / "metrics.json").is_file():
                continue  # still training

            def sampler(d=d):
                g = load_generator(d, weights="ema", recipe=mnist.RECIPE)
                return mnist.student_sampler(g.denoiser, g.sampler, 1)

            students[d.name.split("-")[1]] = _fid_per_seed(d / "paired.json", sampler, eval_seeds)
        out["arms"][name] = {"fid_by_training_seed_and_eval_seed": students}
    return out


def paired_summary(res: dict) -> list[str]:
    """Per arm: the per-eval-seed difference (mean over training seeds minus the teacher), its mean, its standard
    error over eval seeds, and in how many seeds the students are lower."""
    teacher, lines = res["teacher_ode"], []
    n = len(teacher)
    tm, ts = _mean_std(teacher)
    lines.append(f"`teacher_ode`: {tm:.3f} ± {ts:.3f} over {n} evaluation seeds (std of one seed's FID); a 3-seed "
                 f"mean, as `evaluate` reports, has std ≈ {ts / math.sqrt(3):.3f}")
    for name, r in res["arms"].items():
        per = r["fid_by_training_seed_and_eval_seed"]
        if not per:
            continue
        student = [statistics.fmean(v[i] for v in per.values()) for i in range(n)]
        diff = [a - b for a, b in zip(student, teacher)]
        dm, ds = _mean_std(diff)
        se = ds / math.sqrt(n)
        lower = sum(d < 0 for d in diff)
        sm, _ = _mean_std(student)
        by_seed = [statistics.fmean(a - b for a, b in zip(v, teacher)) for v in per.values()]
        spread = f", std over training seeds {statistics.stdev(by_seed):.3f}" if len(by_seed) > 1 else ""
        lines.append(f"`{name}` ({len(per)} training seeds) minus `teacher_ode`, paired over {n} evaluation seeds: "
                     f"{dm:+.3f} ± {se:.3f} (standard error; {f'{dm / se:+.1f} se' if se > 0 else 'no spread'}), students lower in {lower} of {n} "
                     f"seeds (students {sm:.3f}, teacher {tm:.3f}); per training seed "
                     f"{', '.join(f'{d:+.3f}' for d in by_seed)}{spread}")
    means = {name: [statistics.fmean(v[i] for v in r["fid_by_training_seed_and_eval_seed"].values()) for i in range(n)]
             for name, r in res["arms"].items() if r["fid_by_training_seed_and_eval_seed"]}
    names = list(means)
    for other in names[1:]:  # the first arm against each other one, on the same evaluation seeds
        diff = [a - b for a, b in zip(means[names[0]], means[other])]
        dm, ds = _mean_std(diff)
        lines.append(f"`{names[0]}` minus `{other}` (means over their training seeds), paired over {n} evaluation "
                     f"seeds: {dm:+.3f} ± {ds / math.sqrt(n):.3f} (standard error), lower in "
                     f"{sum(d < 0 for d in diff)} of {n} seeds; training-seed spread: see the table")
    return lines


def _code_list(items: list[str]) -> str:
    """Markdown: each item as code, space-separated; ``(none)`` for an empty list."""
    return " ".join(f"`{o}`" for o in items) or "(none)"


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
        ov = _code_list(r["overrides"])
        lines.append(f"| {name} | {ov} | {len(r['fid_by_training_seed'])} {r['seed_kind']} | {m:.3f} ± {s:.3f} | "
                     f"{a:.3f} | {evs} |")
    return "\n".join(lines)


#: what each arm is, for the generated tables
DESCRIPTION = {
    "teacher_ode": "shipped teacher, EDM Heun 18 steps (35 NFE)",
    "dmd2": "DMD2 (TTUR + GAN), default preset",
    "no_gan": "DMD2 w/o GAN",
    "gan_from_critic_pass": "DMD2, GAN features from the critic's DM pass",
    "weak_teacher_ode": "weak teacher, EDM Heun 18 steps (35 NFE)",
    "weak_teacher_dmd2": "DMD2 from the weak teacher",
    "weak_teacher_no_gan": "DMD2 w/o GAN from the weak teacher",
    "long_dmd2": "DMD2, `--preset long` (10,000 iterations)",
    "long_no_gan": "DMD2 w/o GAN, `--preset long`",
    "gan_x4": "GAN weights x4", "gan_x16": "GAN weights x16", "gan_x64": "GAN weights x64",
    "gan_enc16": "GAN head on the bottleneck + the 16x16 encoder level",
    "weak_teacher_gan_x4": "from the weak teacher, GAN weights x4",
    "weak_teacher_gan_x16": "from the weak teacher, GAN weights x16",
    "gan_low_noise": "diffusion-GAN noise sigma <= 2 only",
    "gan_g_x16": "generator GAN weight x16, D weight kept",
    "weak_teacher_gan_g_x16": "from the weak teacher, generator GAN weight x16, D weight kept",
    "weak_teacher_gan_low_noise": "from the weak teacher, GAN noise sigma <= 2 only",
    "gan_shift2": "DMD2, the GAN's images shifted by up to 2 px",
    "weak_teacher_gan_shift2": "from the weak teacher, the GAN's images shifted by up to 2 px",
    "gan_shift2_x4": "GAN's images shifted by up to 2 px, GAN weights x4",
}
#: the paper's figure for the same comparison (ImageNet-64, Inception FID; compare directions, not values)
PAPER = {
    "dmd2": "1.51 (Table 3: TTUR + GAN)", "no_gan": "2.61 (Table 3: w/o GAN)",
    "teacher_ode": "2.32 (EDM teacher, ODE)", "long_dmd2": "1.28 (Table 1: longer training)",
}
MAIN_ARMS = ["teacher_ode", "dmd2", "no_gan", "gan_from_critic_pass", "weak_teacher_ode", "weak_teacher_dmd2",
             "weak_teacher_no_gan", "long_dmd2", "long_no_gan"]
SWEEP_ARMS = ["dmd2", "gan_x4", "gan_x16", "gan_x64", "gan_g_x16", "gan_enc16", "gan_low_noise", "gan_shift2",
              "gan_shift2_x4", "weak_teacher_dmd2", "weak_teacher_gan_x4", "weak_teacher_gan_x16",
              "weak_teacher_gan_g_x16", "weak_teacher_gan_low_noise", "weak_teacher_gan_shift2"]
BEGIN = ("<!-- mnist_gan:begin (generated by `python benchmarks/mnist_gan.py docs` from docs/results/mnist_gan.json; "
         "edit the script, not this block) -->")
END = "<!-- mnist_gan:end -->"


def beats(result: dict, a: str, b: str) -> tuple[bool | None, str]:
    """Does arm ``a`` have a lower mean FID than arm ``b`` by more than their combined std ``sqrt(s_a^2 + s_b^2)``
    (std over training seeds; over sampling seeds for a teacher arm)? None while either arm has < 2 seeds."""
    ra, rb = result["arms"].get(a), result["arms"].get(b)
    if not ra or not rb or len(ra["fid_by_training_seed"]) < 2 or len(rb["fid_by_training_seed"]) < 2:
        return None, f"`{a}` vs `{b}`: not measured yet (needs >= 2 seeds of each)"
    (ma, sa), (mb, sb) = _mean_std(ra["fid_by_training_seed"]), _mean_std(rb["fid_by_training_seed"])
    comb = math.hypot(sa, sb)
    return mb - ma > comb, (f"`{a}` {ma:.3f} ± {sa:.3f} vs `{b}` {mb:.3f} ± {sb:.3f}: {a} lower by {mb - ma:+.3f}, "
                            f"combined std {comb:.3f}")


def goals(result: dict) -> list[str]:
    """The issue's three goals, each with its verdict from the figures."""
    def verdict(ok):
        return "not measured yet" if ok is None else ("**reached**" if ok else "**not reached**")

    a_ok, a_txt = beats(result, "dmd2", "no_gan")
    b1_ok, b1_txt = beats(result, "weak_teacher_dmd2", "weak_teacher_ode")
    b2_ok, b2_txt = beats(result, "weak_teacher_no_gan", "weak_teacher_ode")
    b_ok = None if b1_ok is None or b2_ok is None else (b1_ok and not b2_ok)
    c_ok, c_txt = beats(result, "long_dmd2", "teacher_ode")
    l_ok, l_txt = beats(result, "long_dmd2", "long_no_gan")
    return [f"(a) DMD2 beats w/o GAN beyond the combined std: {verdict(a_ok)} ({a_txt}).",
            f"(b) from the weak teacher, DMD2 beats the teacher's ODE while w/o GAN does not: {verdict(b_ok)} "
            f"({b1_txt}; {b2_txt}).",
            f"(c) the long-preset student beats the shipped teacher's ODE: {verdict(c_ok)} ({c_txt}).",
            f"(not a goal of the issue) at the long budget, DMD2 beats w/o GAN beyond the combined std: "
            f"{verdict(l_ok)} ({l_txt})."]


def docs_table(result: dict, names: list[str], arms_spec: dict) -> str:
    lines = ["| arm | what | override(s) | seeds | 1-step FID, mean ± std over seeds | per seed | label acc. "
             "| eval-seed std | paper |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        r = result["arms"].get(name)
        need = arms_spec[name]["min_seeds"]
        ov = _code_list(r["overrides"] if r else arm_overrides(arms_spec[name]))
        if r is None:
            lines.append(f"| `{name}` | {DESCRIPTION.get(name, '')} | {ov} | 0 of {need} | not run yet | | | | "
                         f"{PAPER.get(name, '')} |")
            continue
        fid = r["fid_by_training_seed"]
        m, s = _mean_std(fid)
        acc = statistics.fmean(r["label_accuracy_by_training_seed"])
        ev = r.get("eval_fid_std_by_training_seed")
        n = f"{len(fid)} {r['seed_kind']}" + (f" (of {need})" if len(fid) < need else "")
        std = f"{s:.3f}" if len(fid) > 1 else "-"
        evs = f"{statistics.fmean(ev):.3f}" if ev else "-"
        lines.append(f"| `{name}` | {DESCRIPTION.get(name, '')} | {ov} | {n} | {m:.3f} ± {std} | "
                     f"{', '.join(f'{v:.3f}' for v in fid)} | {acc:.3f} | {evs} | {PAPER.get(name, '')} |")
    return "\n".join(lines)


def docs_block(result: dict, arms_spec: dict, sweep: bool, paired_result: dict | None = None) -> str:
    parts = [BEGIN, "", docs_table(result, MAIN_ARMS, arms_spec), ""]
    if sweep:
        parts += ["GAN balance (generator weight 3e-3 x m, discriminator weight 1e-2 x m; tapped features):", "",
                  docs_table(result, SWEEP_ARMS, arms_spec), ""]
    parts += [f"- {g}" for g in goals(result)]
    if paired_result is not None:
        parts += ["", f"Paired over evaluation seeds (`paired`, docs/results/{PAIRED.name}: the same labels and seeded "
                      "noise for students and teacher, one FID per seed):", ""]
        parts += [f"- {line}." for line in paired_summary(paired_result)]
    parts += ["", "Seeds: training seeds (`train.seed`) for student rows, each the mean over evaluation seeds 0, 1, 2 "
              "of FID at N = 1,000 (the eval-seed std column is that spread, averaged over training seeds); sampling "
              "seeds for teacher rows. Combined std: sqrt(std_a^2 + std_b^2).", END]
    return "\n".join(parts)


def write_block(path: Path, block: str) -> None:
    """Replace the text between :data:`BEGIN` and :data:`END` in ``path`` (both must be there, once)."""
    text = path.read_text(encoding="utf-8")
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"{path}: expected one {BEGIN!r} ... {END!r} block, found {text.count(BEGIN)} / "
                         f"{text.count(END)}")
    head, rest = text.split(BEGIN)
    path.write_text(head + block + rest.split(END, 1)[1], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["list", "run", "weak-teacher", "collect", "table", "docs", "paired"])
    p.add_argument("--root", default=str(REPO / "runs" / "mnist_gan"), help="where the run folders live")
    p.add_argument("--arms", default="dmd2,no_gan", help="comma-separated arm names (see `list`)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one process each)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per run")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--eval-seeds", default="0-11", help="`paired`: evaluation seeds, FIRST-LAST or comma-separated")
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
    if a.command == "paired":
        names = [n for n in a.arms.split(",") if n]
        bad = [n for n in names if n not in known or known[n]["kind"] != "student"]
        if bad:
            print(f"error: `paired` takes student arms, got {bad}", file=sys.stderr)
            return 2
        lo, _, hi = a.eval_seeds.partition("-")
        seeds = list(range(int(lo), int(hi) + 1)) if hi else [int(v) for v in a.eval_seeds.split(",")]
        res = paired(root, names, seeds, a.threads)
        PAIRED.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {PAIRED}")
        print("\n".join(paired_summary(res)))
        return 0
    if a.command == "collect":
        res = collect(root, PAIRED)
        Path(a.results).parent.mkdir(parents=True, exist_ok=True)
        Path(a.results).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {a.results}: arms {', '.join(res['arms'])}")
        return 0
    res = json.loads(Path(a.results).read_text())
    if a.command == "docs":
        pr = json.loads(PAIRED.read_text()) if PAIRED.is_file() else None
        for path, sweep in ((REPO / "docs" / "mnist.md", True), (REPO / "README.md", False)):
            write_block(path, docs_block(res, known, sweep, pr))
            print(f"wrote the generated block of {path}")
        return 0
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
