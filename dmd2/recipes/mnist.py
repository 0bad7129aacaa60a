r"""MNIST, the embedded default: distil the shipped class-conditional EDM teacher into a 1-step (or N-step) student
on two CPU cores, with no download (DMD2, Yin et al. 2024, Sec. 4-5 on a scale a laptop runs).

Networks (all the teacher's architecture, :func:`dmd2.recipes.mnist_teacher.teacher_adm_config`, EDM preconditioning):

* teacher ``D_real``: the shipped EMA weights (``dmd2/assets/mnist_teacher.safetensors``; ``teacher.path`` for another);
* generator ``G`` and fake score ``D_fake``: both initialised from the teacher (paper Sec. 5);
* GAN head ``H`` (:class:`~dmd2.core.GANHead`, section ``gan``: width 64, 2 strided blocks, 8x8 -> 2x2, pooled) on
  ``D_fake``'s bottleneck (``model.enc.8x8_block0``, 32 x 8 x 8), diffusion GAN at an independent noise level
  (Sec. 4.2); with both GAN weights at 0 (the "w/o GAN" ablation) no head is built and no real image is read.

The student's grid: 1 step = ``G(80 z; 80, y)`` (the paper's ImageNet-64 generator input); ``--steps N`` uses the
first ``N`` sigmas of EDM's ``(N+1)``-point Karras grid (4 steps: 80, 17.5, 2.52, 0.170) with backward simulation
(Sec. 4.4). Training follows the paper's recipe: TTUR with 5 critic updates per generator update, GAN weights
3e-3 (G) / 1e-2 (D), AdamW (0.9, 0.999), weight decay 0.01, grad clip 10; the learning rate and batch are scaled to
the small network and the CPU budget (presets below).

Commands (``python -m dmd2.recipes.mnist [COMMAND] [--preset P] [--out DIR] [--steps N] [key=value ...]``):

* ``train`` (default): distil, then (:attr:`Recipe.after_train <dmd2.train.Recipe>`, only when the run reached
  ``train.max_steps``) evaluate into ``OUT/metrics.json`` (top-level keys ``real_train``,
  ``teacher_ode``, ``teacher_1step``, ``student_1step`` and ``student_{N}step`` for ``--steps N > 1``; each with
  ``fid``, ``fid_std``, ``kid``, ``label_accuracy``, ``nfe``, ``seconds`` and ``weights``: which weights were
  evaluated), ``OUT/samples_side_by_side.png`` (rows: real, teacher ODE, teacher 1-step, student; columns: classes
  0-9 twice) and a printed table. Protocol: :mod:`dmd2.eval.fid_mnist` (N = 1,000, 100 per class, seeds 0, 1, 2,
  vs the held-out split). The teacher's rows are read from the JSON shipped next to its checkpoint when present
  (computed once when it was trained), else computed (about 10 minutes on 2 cores).
* ``evaluate [RUN_OR_CKPT]``: the evaluation alone, on the newest checkpoint in ``OUT`` (or of the run folder / the
  checkpoint folder given). ``dmd2.train.load_generator(RUN)`` gives the trained student.
* ``teacher``: train a teacher into ``OUT`` (:mod:`dmd2.recipes.mnist_teacher`; overrides ``teacher.iters=...``),
  then evaluate it and record the figures in ``OUT/teacher.json``.

Presets: default (1,200 iterations = 240 generator updates at batch 32, lr 3e-4, EMA 0.99 per generator update:
about 9-11 minutes of training and 1 minute of evaluation on 2 cores), ``long`` (10,000 iterations, lr 1e-4, EMA
0.995: about 1.2-1.5 hours), ``tiny`` (4 iterations at batch 4, no evaluation: seconds; used by the tests).
Measured figures of each: ``docs/mnist.md``.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import BackwardSimulationSampler, EDMSchedule
from ..data.mnist import load_mnist
from ..models.adm import bottleneck_name
from ..train import Components, IndexedBatches, Recipe, RecipeConfig, Student, TrainResult, main
from ..train.config import gan_head, gan_layers
from .mnist_teacher import (DEFAULT_TEACHER, IMAGE_SHAPE, TeacherConfig, build_teacher, evaluate_teacher, load_teacher,
                            metrics_entry, train_teacher)

__all__ = ["MNISTConfig", "MNISTEvalConfig", "student_sigmas", "build", "student", "evaluate_run",
           "student_sampler", "RECIPE", "PRESETS"]


@dataclass(frozen=True)
class MNISTEvalConfig:
    """Evaluation after training (:mod:`dmd2.eval.fid_mnist`).

    Attributes:
        enabled: evaluate after ``train`` (FID / KID / label accuracy into ``OUT/metrics.json``).
        weights: ``ema`` (the generator's EMA) or ``raw``.
    """

    enabled: bool = True
    weights: str = "ema"

    def __post_init__(self):
        if self.weights not in ("ema", "raw"):
            raise ValueError(f"eval.weights must be 'ema' or 'raw', got {self.weights!r}")


@dataclass(frozen=True)
class MNISTTeacherSection(TeacherConfig):
    """The teacher to distil; the other fields train one (``python -m dmd2.recipes.mnist teacher``).

    Attributes:
        path: the teacher checkpoint to distil (empty: the shipped one).
    """

    path: str = ""


@dataclass(frozen=True)
class MNISTConfig(RecipeConfig):
    teacher: MNISTTeacherSection = field(default_factory=MNISTTeacherSection)
    eval: MNISTEvalConfig = field(default_factory=MNISTEvalConfig)


def student_sigmas(steps: int, schedule: EDMSchedule | None = None) -> list[float]:
    """The student's grid: the first ``steps`` sigmas of the ``(steps + 1)``-point Karras grid (80 ... 0.002), i.e.
    the noise levels an EDM sampler with ``steps + 1`` points visits before its final one. 1 -> [80.0]."""
    schedule = schedule or EDMSchedule()
    return [float(s) for s in schedule.karras_sigmas(steps + 1)[:steps]]


def teacher_path(cfg: MNISTConfig) -> Path:
    return Path(cfg.teacher.path) if cfg.teacher.path else DEFAULT_TEACHER


def _sampler(cfg: MNISTConfig) -> BackwardSimulationSampler:
    schedule = EDMSchedule(sigma_data=cfg.teacher.sigma_data)
    return BackwardSimulationSampler(schedule, cfg.sampler.grid(lambda n: student_sigmas(n, schedule)))


class _TrainSplit:
    """The train split as an indexable dataset of ``(image (1, 32, 32), label)``."""

    def __init__(self):
        self.images, self.labels = load_mnist("train")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def build(cfg: MNISTConfig, info=None) -> Components:
    """Teacher (frozen), generator and fake score (copies of the teacher), GAN head, data, sampler."""
    sampler = _sampler(cfg)
    schedule = sampler.schedule
    teacher = load_teacher(teacher_path(cfg))
    generator = copy.deepcopy(teacher).train().requires_grad_(True)
    fake_score = copy.deepcopy(teacher).train().requires_grad_(True)
    layers = gan_layers(cfg, fake_score, [bottleneck_name(fake_score)])
    head = gan_head(cfg, [fake_score.get_submodule(n).out_channels for n in layers])
    shards = (info.world_size if info is not None else 1) * cfg.train.grad_accum
    real = None if head is None else IndexedBatches(_TrainSplit(), shards=shards, batch=cfg.train.batch_size,
                                                    seed=cfg.train.seed)

    def latents(batch, g, device):
        noise = torch.randn((batch, *IMAGE_SHAPE), generator=g, device=device)
        cond = torch.randint(0, 10, (batch,), generator=g, device=device)
        return noise, cond

    def sample_fn(gen, device):  # OUT/samples/: one row per class 0..9, 8 samples each, the same noise every time
        g = torch.Generator(device=device).manual_seed(0)
        noise = torch.randn((80, *IMAGE_SHAPE), generator=g, device=device)
        return sampler.sample(gen, noise, torch.arange(80, device=device) // 8, generator=g)

    return Components(generator=generator, fake_score=fake_score, teacher=teacher, schedule=schedule,
                      sampler=sampler, latents=latents, real_data=real, gan_head=head,
                      gan_layers=layers,
                      sample_fn=sample_fn, sample_rows=[f"class {c}" for c in range(10)])


def student(cfg: MNISTConfig, state_dict: dict[str, torch.Tensor]) -> Student:
    """The trained student of a run with config ``cfg`` (:attr:`Recipe.generator <dmd2.train.Recipe>`): the teacher's
    network with ``state_dict`` loaded (strict), on the run's grid; ``G(noise (B, 1, 32, 32), labels (B,))``."""
    net = build_teacher(0.0, cfg.teacher.sigma_data)
    net.load_state_dict(state_dict, strict=True)
    return Student(net, _sampler(cfg), IMAGE_SHAPE, 10)


# ------------------------------------------------------------------------------------------------- evaluation
def student_sampler(generator: torch.nn.Module, sampler: BackwardSimulationSampler, steps: int | None = None,
                    chunk: int = 500):
    """A sampler for :func:`~dmd2.eval.fid_mnist.evaluate_sampler` (:func:`~dmd2.eval.samplers.seeded_sampler`): the
    student's first ``steps`` grid steps (all by default) from ``z ~ N(0, I)``, prior noise then re-noise noise drawn
    from ``torch.Generator().manual_seed(seed)``."""
    from ..eval.samplers import seeded_sampler

    return seeded_sampler(lambda z, y, g: sampler.sample(generator, z, y, generator=g, steps=steps), IMAGE_SHAPE, chunk)


def _teacher_rows(cfg: MNISTConfig) -> dict:
    meta = teacher_path(cfg).with_suffix(".json")
    if meta.is_file():
        rows = json.loads(meta.read_text()).get("metrics", {})
        if "teacher_ode" in rows and "teacher_1step" in rows:
            return {k: {**rows[k], "source": f"shipped with the teacher ({meta.name})"}
                    for k in ("teacher_ode", "teacher_1step")}
    rows = evaluate_teacher(teacher_path(cfg))
    return {k: {**v, "source": "computed in this run"} for k, v in rows.items()}


def format_table(metrics: dict) -> str:
    """The printed table: one row per sampler."""
    lines = [f"{'sampler':<16}{'FID':>18}{'KID':>12}{'label acc':>11}{'NFE':>5}{'seconds':>9}  weights"]
    for name, r in metrics.items():
        if not isinstance(r, dict) or "fid" not in r:
            continue
        lines.append(f"{name:<16}{r['fid']:>10.4f} ± {r['fid_std']:<6.4f}{r['kid']:>12.5f}{r['label_accuracy']:>11.3f}"
                     f"{r['nfe']:>5}{r['seconds']:>9.1f}  {r['weights']}")
    return "\n".join(lines)


def evaluate_run(cfg: MNISTConfig, ckpt: str | Path | None = None) -> dict:
    """Write ``OUT/metrics.json`` and ``OUT/samples_side_by_side.png`` for the newest (or given) checkpoint; print the
    table; return the metrics."""
    from ..eval.fid_mnist import dataset_sampler, evaluate_sampler
    from ..eval.samplers import heun_sampler
    from ..train import load_generator
    from ..train.monitor import save_png

    out = Path(cfg.train.out)
    G = load_generator(ckpt if ckpt is not None else out, weights="ema" if cfg.eval.weights == "ema" else "generator",
                       recipe=RECIPE)
    ckpt, gen, sampler = G.checkpoint, G.denoiser, G.sampler
    label = f"student {'EMA' if G.weights == 'ema' else 'raw'} ({ckpt.name})"
    metrics: dict = {}
    steps = [1] + ([sampler.num_steps] if sampler.num_steps > 1 else [])
    stages = 2 + len(steps)
    start = time.perf_counter()

    def progress(i: int, what: str) -> None:
        print(f"evaluate [{i}/{stages}] {what} ({time.perf_counter() - start:.0f} s so far)", flush=True)

    t = time.perf_counter()
    progress(1, "real train split: FID / KID / label accuracy, 3 seeds x 1,000 samples")
    metrics["real_train"] = metrics_entry(evaluate_sampler(dataset_sampler(*load_mnist("train"))), 0,
                                          time.perf_counter() - t, "data (train split)")
    progress(2, "teacher rows (read from its record when shipped)")
    metrics.update(_teacher_rows(cfg))
    for i, n in enumerate(steps):
        progress(3 + i, f"student, {n} step{'s' if n > 1 else ''}, 3 seeds x 1,000 samples")
        t = time.perf_counter()
        ev = evaluate_sampler(student_sampler(gen, sampler, n))
        metrics[f"student_{n}step"] = {**metrics_entry(ev, n, time.perf_counter() - t, label),
                                       "sigmas": sampler.timesteps[:n]}
    metrics["meta"] = {"checkpoint": str(ckpt), "teacher": str(teacher_path(cfg)), "iterations": int(ckpt.name.split("-")[-1]),
                       "protocol": "dmd2.eval.fid_mnist: N=1000 (100/class), seeds (0,1,2), vs held-out; mean, std (ddof=1)"}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))

    # side by side: the same classes (0..9, twice) from each sampler, seed 0
    labels = torch.arange(20) % 10
    real = dataset_sampler(*load_mnist("train"))(labels, 0)
    teacher = load_teacher(teacher_path(cfg))
    rows = [real, heun_sampler(teacher, IMAGE_SHAPE, 18)(labels, 0), heun_sampler(teacher, IMAGE_SHAPE, 1)(labels, 0)]
    rows += [student_sampler(gen, sampler, n)(labels, 0) for n in steps]
    names = ["real train", "teacher_ode", "teacher_1step", *(f"student_{n}step" for n in steps)]
    save_png(torch.cat(rows), out / "samples_side_by_side.png", nrow=20, row_labels=names)
    print(f"evaluate: done in {time.perf_counter() - start:.0f} s; rows of samples_side_by_side.png: {', '.join(names)}")
    print(format_table(metrics))
    return metrics


def evaluate_command(cfg: MNISTConfig, args: list[str]) -> int:
    """``evaluate [RUN_OR_CKPT]``: evaluate the newest checkpoint in OUT (or of RUN, or CKPT itself)."""
    if len(args) > 1:
        raise ValueError("usage: evaluate [RUN_OR_CHECKPOINT_DIR]")
    evaluate_run(cfg, args[0] if args else None)
    return 0


def after_train(cfg: MNISTConfig, result: TrainResult) -> None:
    """After a completed ``train``: the evaluation (:func:`evaluate_run`) of its last checkpoint, when ``eval.enabled``."""
    if cfg.eval.enabled:
        evaluate_run(cfg, result.checkpoint)


def teacher_command(cfg: MNISTConfig, args: list[str]) -> int:
    """``teacher``: train a teacher into OUT (``teacher.*`` overrides), evaluate it, record the figures."""
    if args:
        raise ValueError(f"teacher takes no positional arguments, got {args}")
    tcfg = TeacherConfig(**{k: getattr(cfg.teacher, k) for k in TeacherConfig.__dataclass_fields__})
    out = Path(cfg.train.out)
    info = train_teacher(tcfg, out, resume=cfg.train.resume != "",
                         command="python -m dmd2.recipes.mnist " + " ".join(sys.argv[1:]))
    info["metrics"] = evaluate_teacher(out / "teacher.safetensors")
    (out / "teacher.json").write_text(json.dumps(info, indent=1))
    print(format_table(info["metrics"]))
    return 0


PRESETS = {
    "default": {},
    # the long preset keeps lr 1e-4 (what its measured run used: docs/mnist.md); the default's 3e-4 buys speed
    "long": {"train.max_steps": 10000, "train.checkpoint_every": 1000, "train.ema_decay": 0.995,
             "train.lr_generator": 1e-4, "train.lr_critic": 1e-4},
    "tiny": {"train.max_steps": 4, "train.batch_size": 4, "train.checkpoint_every": 4, "train.log_every": 2,
             "train.sample_every": 2, "eval.enabled": False},
}

DEFAULTS = {
    "train.max_steps": 1200, "train.batch_size": 32, "train.lr_generator": 3e-4, "train.lr_critic": 3e-4,
    "train.warmup_steps": 0, "train.ema_decay": 0.99, "train.checkpoint_every": 300, "train.log_every": 25,
    "train.sample_every": 300,
    "train.device": "cpu", "critic.ratio": 5,
    "objective.gan_generator_weight": 3e-3, "objective.gan_discriminator_weight": 1e-2,
    "gan.hidden": 64, "gan.depth": 2,
}


def _default_config() -> MNISTConfig:
    from ..train import apply_overrides

    return apply_overrides(MNISTConfig(), DEFAULTS)


def next_steps(cfg: MNISTConfig, ckpt: Path) -> list[str]:
    """The summary's commands: evaluate this run (again); where the sample grids are."""
    out = Path(cfg.train.out)
    return [f"python -m dmd2.recipes.mnist evaluate {ckpt} --config {out / 'config.json'}   # -> {out / 'metrics.json'}",
            f"ls {out / 'samples'}   # sample grids during training, one row per class"]


RECIPE = Recipe(name="mnist", config=_default_config(), build=build, presets=PRESETS,
                commands={"evaluate": evaluate_command, "teacher": teacher_command}, next_steps=next_steps,
                generator=student, after_train=after_train)

if __name__ == "__main__":
    from dmd2.train.distributed import exit_process

    exit_process(main(RECIPE))
