"""The whole DMD2 training iteration, timed: generator turn, critic-only iteration and the amortised iteration,
with a per-phase breakdown and the inventory of network passes.

``python benchmarks/step.py --config NAME [--device cpu|cuda] [--iters N] [--warmup N] [--threads N]
[--set key=value ...] [--csv PATH] [--json PATH] [--tree PATH]``

Configs (``--set`` overrides any config key of the recipe; ``bench.*`` keys are this script's own):

* ``tiny-imagenet``: the ImageNet-64 recipe's ADM at model_channels 32, channel_mult (1, 2), channel_mult_emb 4,
  num_blocks 1, attention at 8x8, label_dim 10, 16x16, batch 8, fp32; GAN head width 64 on the 8x8 bottleneck,
  weights 3e-3 / 1e-2, TTUR ratio 5 (random teacher, synthetic data).
* ``sdxl-tiny``: the SDXL recipe's ``tiny`` preset (tiny SDXL-shaped components written to a temporary folder).
* ``imagenet64``: the ImageNet-64 paper preset's 296M ADM with random weights, batch 40, bf16 (a GPU config).
* ``sdxl``: the SDXL base UNet configuration (``dmd2/assets/sdxl_base_unet_config.json``; ``bench.unet_config=PATH``
  for another) in the ``shared-base`` memory mode at 1024 px, batch 2, bf16, gradient checkpointing, random weights
  built on the meta device and materialised; prompt embeddings and real latents are random tensors (no text encoder,
  no VAE: the iteration's networks are what is timed). A GPU config.

What is measured: ``--warmup`` TTUR cycles, then ``--iters`` cycles (one cycle = ``critic.ratio`` iterations: one
generator turn and ``ratio - 1`` critic-only iterations). Medians per iteration kind; amortised =
``(generator turn + (ratio - 1) critic-only) / ratio``. Time is process CPU time (``time.process_time``) on CPU and
wall time with ``torch.cuda.synchronize`` at phase boundaries on CUDA. Phases (outermost only, nothing counted
twice): ``forward`` (calls of the generator, fake score, teacher and GAN head modules; a pass that ends early at a
feature tap counts too), ``backward`` (``Tensor.backward``, recomputation under checkpointing included),
``optimizer`` (AdamW steps), ``clipping``, ``data`` (the recipe's latents / real-data callables, text encoding and
VAE included where the recipe does them), ``other`` (the rest: noise, times, the DMD2 math, EMA, bookkeeping).
On CUDA, ``torch.cuda.max_memory_allocated`` per phase and per iteration kind.

Pass inventory: per network, passes that returned (``full``) and passes that ended early at the GAN feature tap
(``stopped``), with their batch sizes, in one iteration of each kind.

``--tree PATH`` imports ``dmd2`` from another checkout (e.g. the main branch), so one script times both;
``--compare A B --rounds R`` runs this script in subprocesses alternating trees A and B (A, B, A, B, ...), prints
the medians of the per-run amortised times, their ratio B/A and the load average (``--set-b`` overrides for B only).
Results are appended to ``benchmarks/results/step-<device>.csv`` (``--csv`` to change; with ``--compare`` every run
appends its rows, ``tree`` naming the checkout).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = ("tiny-imagenet", "sdxl-tiny", "imagenet64", "sdxl")
PHASES = ("forward", "backward", "optimizer", "clipping", "data", "other")
FIELDS = ["date", "device", "torch", "tree", "config", "overrides", "threads", "kind", "total_s"] + \
         [f"{p}_s" for p in PHASES] + ["peak_mem_mb", "passes", "loadavg", "note"]


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=CONFIGS, default="tiny-imagenet")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    ap.add_argument("--iters", type=int, default=3, help="timed TTUR cycles")
    ap.add_argument("--warmup", type=int, default=1, help="untimed TTUR cycles first")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--set-b", dest="sets_b", action="append", default=[], metavar="KEY=VALUE",
                    help="with --compare: overrides for tree B only")
    ap.add_argument("--csv", default=None, help="CSV to append to (default benchmarks/results/step-<device>.csv; "
                                                "'-' for none)")
    ap.add_argument("--json", default=None, help="write the result as JSON here")
    ap.add_argument("--tree", default=None, help="import dmd2 from this checkout")
    ap.add_argument("--compare", nargs=2, metavar=("TREE_A", "TREE_B"), default=None)
    ap.add_argument("--rounds", type=int, default=4, help="with --compare: runs per tree")
    args = ap.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        ap.error("--iters must be >= 1 and --warmup >= 0")
    return args


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


# ------------------------------------------------------------------------------------------------ measurement
class Clock:
    """Outermost-phase timer: ``with clock.phase(name)`` adds the elapsed time to ``name`` unless another phase is
    already open (so a forward inside a backward's recomputation counts as backward)."""

    def __init__(self, cuda: bool):
        import torch

        self.torch, self.cuda = torch, cuda
        self.open = None
        self.times = {p: 0.0 for p in PHASES}
        self.peaks = {p: 0.0 for p in PHASES}

    def now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    def _peak_and_reset(self) -> float:
        if not self.cuda:
            return float("nan")
        peak = self.torch.cuda.max_memory_allocated() / 2**20
        self.torch.cuda.reset_peak_memory_stats()
        return peak

    def phase(self, name: str):
        clock = self

        class _Phase:
            def __enter__(self):
                self.outer = clock.open is None
                if self.outer:
                    clock.open = name
                    self.start = clock.now()
                    clock.peaks["other"] = max(clock.peaks["other"], clock._peak_and_reset())

            def __exit__(self, *exc):
                if self.outer:
                    clock.times[name] += clock.now() - self.start
                    clock.peaks[name] = max(clock.peaks[name], clock._peak_and_reset())
                    clock.open = None
                return False

        return _Phase()

    def reset(self) -> None:
        self.times = {p: 0.0 for p in PHASES}
        self.peaks = {p: 0.0 for p in PHASES}
        self._peak_and_reset()


def instrument(trainer, clock: Clock, passes: list):
    """Wrap the trainer's networks, backward, optimizers, clipping and data callables with ``clock`` phases; record
    each network call in ``passes`` as ``(network, batch, full)``. Returns an undo function."""
    import torch

    undo = []
    nets = {"generator": trainer.gen, "fake_score": trainer.fake, "teacher": trainer.teacher, "gan_head": trainer.head}
    seen = set()
    for name, net in nets.items():
        if not isinstance(net, torch.nn.Module) or id(net) in seen:
            continue
        seen.add(id(net))
        inner = net.forward

        def forward(*a, _inner=inner, _name=name, **k):
            first = a[0] if a else None
            batch = first.shape[0] if isinstance(first, torch.Tensor) else (first[0].shape[0] if first else 0)
            full = False
            try:
                with clock.phase("forward"):
                    out = _inner(*a, **k)
                full = True
                return out
            finally:
                passes.append((_name, int(batch), full))

        net.forward = forward
        undo.append(lambda net=net: net.__dict__.pop("forward", None))

    orig_backward = torch.Tensor.backward

    def backward(t, *a, **k):
        with clock.phase("backward"):
            return orig_backward(t, *a, **k)

    torch.Tensor.backward = backward
    undo.append(lambda: setattr(torch.Tensor, "backward", orig_backward))

    def wrap_attr(obj, attr, phase):
        orig = getattr(obj, attr)

        def wrapped(*a, **k):
            with clock.phase(phase):
                return orig(*a, **k)

        setattr(obj, attr, wrapped)
        undo.append(lambda: setattr(obj, attr, orig))

    wrap_attr(trainer.opt_gen, "step", "optimizer")
    wrap_attr(trainer.opt_critic, "step", "optimizer")
    wrap_attr(trainer, "_clip", "clipping")
    wrap_attr(trainer.c, "latents", "data")
    if trainer.c.real_data is not None:
        wrap_attr(trainer.c, "real_data", "data")

    def restore():
        for u in reversed(undo):
            u()

    return restore


def inventory(passes) -> str:
    """``"generator 1 full (B8); fake_score 2 full (B8, B8) + 1 stopped (B16); ..."``."""
    parts = []
    for name in dict.fromkeys(n for n, _, _ in passes):
        full = [b for n, b, f in passes if n == name and f]
        stop = [b for n, b, f in passes if n == name and not f]
        s = f"{name} {len(full)} full ({', '.join(f'B{b}' for b in full)})" if full else f"{name} 0 full"
        if stop:
            s += f" + {len(stop)} stopped ({', '.join(f'B{b}' for b in stop)})"
        parts.append(s)
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------ configs
def _tiny_imagenet(device, sets, out):
    from dmd2.recipes import imagenet64 as rec
    from dmd2.train.config import apply_overrides

    over = {**rec.TINY, "model.model_channels": 32, "model.channel_mult": (1, 2), "model.channel_mult_emb": 4,
            "model.num_blocks": 1, "model.attn_resolutions": (8,), "model.label_dim": 10, "model.img_resolution": 16,
            "train.batch_size": 8, "train.mixed_precision": "no", "gan.hidden": 64, "gan.depth": 2,
            "objective.gan_generator_weight": 3e-3, "objective.gan_discriminator_weight": 1e-2, "critic.ratio": 5,
            "train.sample_every": 0, "train.progress": False, "train.device": device}
    cfg = apply_overrides(apply_overrides(rec.RECIPE.config, over), sets)
    return cfg, rec.build(cfg)


def _imagenet64(device, sets, out):
    from dmd2.recipes import imagenet64 as rec
    from dmd2.train.config import apply_overrides

    over = {"teacher.random": True, "data.synthetic": 80, "train.batch_size": 40, "train.mixed_precision": "bf16",
            "train.sample_every": 0, "train.progress": False, "train.device": device}
    cfg = apply_overrides(apply_overrides(rec.RECIPE.config, over), sets)
    return cfg, rec.build(cfg)


def _sdxl_tiny(device, sets, out):
    from dmd2.recipes import sdxl as rec
    from dmd2.train.config import apply_overrides

    over = {**rec.PRESETS["tiny"], "train.out": str(out), "train.sample_every": 0, "train.progress": False,
            "train.device": device}
    cfg = apply_overrides(apply_overrides(rec.RECIPE.config, over), sets)
    return cfg, rec.build(cfg)


def _sdxl(device, sets, out):
    """SDXL base UNet (random weights, materialised from the meta device), shared-base mode, random conditioning."""
    import torch
    from diffusers import UNet2DConditionModel

    from dmd2.core import BackwardSimulationSampler, CFGDenoiser
    from dmd2.models.sdxl import DiffusersVPSchedule, build_networks, time_ids
    from dmd2.recipes import sdxl as rec
    from dmd2.train import Components
    from dmd2.train.config import apply_overrides, gan_head
    from dmd2.train.randomness import derive_seed

    unet_config = HERE.parent / "dmd2" / "assets" / "sdxl_base_unet_config.json"
    own = {k: v for k, v in (s.split("=", 1) for s in sets) if k.startswith("bench.")}
    sets = [s for s in sets if not s.startswith("bench.")]
    unet_config = Path(own.pop("bench.unet_config", unet_config))
    if own:
        raise ValueError(f"unknown bench.* keys {sorted(own)}; known: bench.unet_config")
    over = {"model.memory_mode": "shared-base", "model.resolution": 1024, "train.batch_size": 2,
            "train.mixed_precision": "bf16", "train.grad_checkpointing": True, "train.ema_decay": None,
            "train.sample_every": 0, "train.progress": False, "train.device": device, "model.path": ""}
    cfg = apply_overrides(apply_overrides(rec.RECIPE.config, over), sets)
    m, dev = cfg.model, torch.device(device)
    ucfg = {k: v for k, v in json.loads(unet_config.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**ucfg)
    unet.to_empty(device=dev)
    torch.manual_seed(cfg.train.seed)
    with torch.no_grad():
        for mod in unet.modules():
            if mod is not unet and hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
    schedule = DiffusersVPSchedule()
    nets = build_networks(unet, schedule, "epsilon", m.memory_mode, m.lora_rank, m.lora_alpha, m.lora_targets,
                          rec.DTYPES[m.frozen_dtype]).to(dev)
    shape = (ucfg["in_channels"], m.resolution // 8, m.resolution // 8)  # the SDXL VAE's 8x down-sampling
    text_dim, pooled = ucfg["cross_attention_dim"], ucfg["projection_class_embeddings_input_dim"] - 6 * ucfg["addition_time_embed_dim"]

    def cond(batch, g):
        return {"encoder_hidden_states": torch.randn((batch, 77, text_dim), generator=g, device=dev),
                "text_embeds": torch.randn((batch, pooled), generator=g, device=dev),
                "time_ids": time_ids(m.resolution, m.resolution, batch, device=dev)}

    uncond = {"encoder_hidden_states": torch.zeros((1, 77, text_dim), device=dev),
              "text_embeds": torch.zeros((1, pooled), device=dev), "time_ids": time_ids(m.resolution, m.resolution, 1, device=dev)}
    teacher = CFGDenoiser(nets.teacher, m.guidance_scale, uncond)
    sampler = BackwardSimulationSampler(schedule, cfg.sampler.grid(rec.grid))

    def latents(batch, g, d):
        return torch.randn((batch, *shape), generator=g, device=d), cond(batch, g)

    def real_data(step, shard, batch, d):
        g = torch.Generator(device=d).manual_seed(derive_seed(7, step, shard))
        return torch.randn((batch, *shape), generator=g, device=d), cond(batch, g)

    head = gan_head(cfg, [ucfg["block_out_channels"][-1]])  # the run's gan section (None without GAN weights)
    return cfg, Components(generator=nets.generator, fake_score=nets.fake_score, teacher=teacher, schedule=schedule,
                           sampler=sampler, latents=latents, real_data=real_data, gan_head=head,
                           gan_layers=["gan_tap"] if head is not None else [])


BUILDERS = {"tiny-imagenet": _tiny_imagenet, "sdxl-tiny": _sdxl_tiny, "imagenet64": _imagenet64, "sdxl": _sdxl}


# ------------------------------------------------------------------------------------------------ one run
def measure(args) -> dict:
    import torch

    from dmd2.train import Trainer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device == "cuda"
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        cfg, comps = BUILDERS[args.config](device, args.sets, out)
        torch.manual_seed(cfg.train.seed)
        trainer = Trainer(cfg, comps, out=Path(out) / "run")
        build_s = time.perf_counter() - t0
        clock, passes = Clock(cuda), []
        restore = instrument(trainer, clock, passes)
        ratio = cfg.critic.ratio
        results = {"generator_turn": [], "critic_only": []}
        inv, peaks = {}, {"generator_turn": 0.0, "critic_only": 0.0}
        try:
            t1 = time.perf_counter()
            for _ in range(args.warmup * ratio):
                trainer.train_step()
            warm_s = time.perf_counter() - t1
            for _ in range(args.iters * ratio):
                kind = "generator_turn" if trainer.step % ratio == 0 else "critic_only"
                clock.reset()
                passes.clear()
                start = clock.now()
                trainer.train_step()
                total = clock.now() - start
                other_peak = clock._peak_and_reset()
                phases = dict(clock.times)
                phases["other"] = total - sum(v for k, v in phases.items() if k != "other")
                mem = max([v for v in clock.peaks.values() if v == v] + [other_peak]) if cuda else float("nan")
                results[kind].append({"total": total, **phases, "peak_mem_mb": mem,
                                      "phase_peak_mem_mb": {**clock.peaks, "other": max(clock.peaks["other"], other_peak)}})
                inv[kind] = inventory(passes)
                peaks[kind] = max(peaks[kind], mem) if cuda else mem
        finally:
            restore()
    summary = {}
    for kind, rows in results.items():
        summary[kind] = {k: statistics.median(r[k] for r in rows) for k in ("total", *PHASES)}
        summary[kind]["peak_mem_mb"] = peaks[kind]
        if cuda:
            summary[kind]["phase_peak_mem_mb"] = {p: max(r["phase_peak_mem_mb"][p] for r in rows) for p in PHASES}
    g, c = summary["generator_turn"], summary["critic_only"]
    summary["amortised"] = {k: (g[k] + (ratio - 1) * c[k]) / ratio for k in ("total", *PHASES)}
    summary["amortised"]["peak_mem_mb"] = max(g["peak_mem_mb"], c["peak_mem_mb"]) if cuda else float("nan")
    import dmd2

    return {"config": args.config, "device": device, "device_name": torch.cuda.get_device_name() if cuda else f"cpu-{platform.machine()}",
            "torch": torch.__version__, "tree": str(Path(dmd2.__file__).resolve().parents[1]), "overrides": args.sets,
            "threads": torch.get_num_threads(), "ratio": ratio, "cycles": args.iters, "build_s": build_s,
            "warmup_s": warm_s, "kinds": summary, "passes": inv, "loadavg": _loadavg()}


def write_csv(res: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for kind, v in res["kinds"].items():
            w.writerow({"date": stamp, "device": res["device_name"], "torch": res["torch"], "tree": res["tree"],
                        "config": res["config"], "overrides": " ".join(res["overrides"]), "threads": res["threads"],
                        "kind": kind, "total_s": f"{v['total']:.5f}", **{f"{p}_s": f"{v[p]:.5f}" for p in PHASES},
                        "peak_mem_mb": f"{v['peak_mem_mb']:.1f}", "passes": res["passes"].get(kind, ""),
                        "loadavg": res["loadavg"], "note": f"ratio {res['ratio']}, {res['cycles']} cycles, build {res['build_s']:.1f} s, "
                                                           f"warm-up {res['warmup_s']:.1f} s"})


def table(res: dict) -> str:
    lines = [f"{res['config']} on {res['device_name']} (torch {res['torch']}, {res['threads']} threads, tree {res['tree']}, "
             f"load {res['loadavg']})",
             "| kind | total s | " + " | ".join(PHASES) + " | peak MiB |", "|---" * (len(PHASES) + 3) + "|"]
    for kind, v in res["kinds"].items():
        lines.append(f"| {kind} | {v['total']:.4f} | " + " | ".join(f"{v[p]:.4f}" for p in PHASES) + f" | {v['peak_mem_mb']:.0f} |")
    for kind, s in res["passes"].items():
        lines.append(f"passes, {kind}: {s}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ A/B
def compare(args, argv) -> dict:
    """Alternate subprocess runs of trees A and B; medians of their amortised (and per-kind) totals."""
    base = [a for a in argv]
    # drop --compare/--rounds/--set-b/--json/--csv from the child command line
    child, skip = [], 0
    for i, a in enumerate(base):
        if skip:
            skip -= 1
            continue
        if a in ("--compare",):
            skip = 2
            continue
        if a in ("--rounds", "--set-b", "--json", "--csv", "--tree"):
            skip = 1
            continue
        child.append(a)
    load0 = _loadavg()
    runs = {"A": [], "B": []}
    for r in range(args.rounds):
        for label, tree in zip("AB", args.compare):
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                path = f.name
            extra = [x for s in args.sets_b for x in ("--set", s)] if label == "B" else []
            cmd = [sys.executable, str(Path(__file__).resolve()), *child, *extra, "--tree", tree, "--json", path,
                   *(["--csv", args.csv] if args.csv else [])]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            res = json.loads(Path(path).read_text())
            os.unlink(path)
            runs[label].append(res)
            print(f"round {r} {label}: amortised {res['kinds']['amortised']['total']:.4f} s "
                  f"(generator turn {res['kinds']['generator_turn']['total']:.4f}, critic-only "
                  f"{res['kinds']['critic_only']['total']:.4f}; build {res['build_s']:.1f} s, warm-up cycles "
                  f"{res['warmup_s']:.1f} s wall)", flush=True)
    out = {"trees": dict(zip("AB", args.compare)), "sets": args.sets, "sets_b": args.sets_b, "rounds": args.rounds,
           "loadavg_start": load0, "loadavg_end": _loadavg(), "medians": {}, "passes": {},
           "runs": {label: [{"amortised": r["kinds"]["amortised"]["total"], "build_s": r["build_s"],
                             "warmup_s": r["warmup_s"]} for r in runs[label]] for label in "AB"}}
    for label in "AB":
        out["medians"][label] = {k: {p: statistics.median(r["kinds"][k][p] for r in runs[label]) for p in ("total", *PHASES)}
                                 for k in ("generator_turn", "critic_only", "amortised")}
        out["passes"][label] = runs[label][-1]["passes"]
    out["ratio_B_over_A"] = {k: out["medians"]["B"][k]["total"] / out["medians"]["A"][k]["total"]
                             for k in ("generator_turn", "critic_only", "amortised")}
    lines = [f"A = {args.compare[0]}, B = {args.compare[1]} {' '.join(args.sets_b)}; {args.rounds} rounds A,B,...; "
             f"load average {load0} -> {out['loadavg_end']}",
             "| kind | A s | B s | B/A | " + " | ".join(f"B {p}" for p in PHASES) + " |", "|---" * (len(PHASES) + 4) + "|"]
    for k in ("generator_turn", "critic_only", "amortised"):
        a, b = out["medians"]["A"][k], out["medians"]["B"][k]
        lines.append(f"| {k} | {a['total']:.4f} | {b['total']:.4f} | {b['total'] / a['total']:.3f} | "
                     + " | ".join(f"{b[p]:.4f}" for p in PHASES) + " |")
    for label in "AB":
        for k, s in out["passes"][label].items():
            lines.append(f"passes {label}, {k}: {s}")
    out["table"] = "\n".join(lines)
    return out


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if args.compare:
        res = compare(args, argv)
        print(res["table"])
    else:
        if args.tree:
            sys.path.insert(0, str(Path(args.tree).resolve()))
        else:
            sys.path.insert(0, str(HERE.parent))
        res = measure(args)
        print(table(res))
        if args.csv != "-":
            write_csv(res, Path(args.csv) if args.csv else HERE / "results" / f"step-{res['device_name'].replace(' ', '-')}.csv")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
