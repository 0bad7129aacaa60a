"""ImageNet-64 recipe: where one training iteration's time goes, and the memory / throughput plan of the paper preset.

``python benchmarks/imagenet64_step.py split [--iters 10] [key=value ...]``
    Builds the recipe (preset ``tiny`` plus overrides) and the trainer, runs 2 warm-up iterations, then times
    ``--iters`` iterations (a multiple of ``critic.ratio`` covers whole TTUR cycles). Network time = every forward of
    an ADM network or the GAN head (forward hooks) + every ``backward()`` call (the graph is all network except a few
    loss ops); optimizer = the AdamW steps; everything else = the rest (noise, times, the DMD2 math, data, clipping,
    EMA, requires_grad toggles, logging bookkeeping).

``python benchmarks/imagenet64_step.py plan [--batch 40] [--world 7]``
    Parameter counts (meta-device build of EDM's ADM), FLOPs of one forward (``FlopCounterMode``), bytes saved for
    backward per sample (measured on CPU under bf16 autocast at batch 1 and 2, distinct storages), then the memory
    and time plan of one 80 GB GPU for the paper preset (see docs/imagenet64.md for the reasoning).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmd2.models.adm import ADMNet, build_edm_adm  # noqa: E402
from dmd2.recipes import imagenet64 as rec  # noqa: E402
from dmd2.train import Trainer  # noqa: E402
from dmd2.train.config import apply_overrides, gan_head  # noqa: E402


class Clock:
    """Accumulates wall time of network forwards (hooks), backward() calls and optimizer steps."""

    def __init__(self):
        self.fwd = self.bwd = self.opt = 0.0
        self._starts: dict[int, float] = {}

    def hook(self, module: torch.nn.Module) -> None:
        def pre(mod, args):
            self._starts[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            self.fwd += time.perf_counter() - self._starts.pop(id(mod))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def wrap_backward(self):
        orig = torch.Tensor.backward
        clock = self

        def backward(t, *a, **k):
            s = time.perf_counter()
            orig(t, *a, **k)
            clock.bwd += time.perf_counter() - s

        torch.Tensor.backward = backward
        return orig

    def wrap_step(self, opt):
        orig = opt.step

        def step(*a, **k):
            s = time.perf_counter()
            out = orig(*a, **k)
            self.opt += time.perf_counter() - s
            return out

        opt.step = step


def split(args) -> dict:
    cfg = apply_overrides(rec.RECIPE.config, {**rec.TINY, "train.progress": False, "train.sample_every": 0})
    cfg = apply_overrides(cfg, args.overrides)
    torch.manual_seed(cfg.train.seed)
    comps = rec.build(cfg)
    trainer = Trainer(cfg, comps, out=tempfile.mkdtemp())
    clock = Clock()
    for net in (comps.teacher, comps.generator, comps.fake_score):
        for m in net.modules():
            if isinstance(m, ADMNet):
                clock.hook(m)
    if comps.gan_head is not None:
        clock.hook(comps.gan_head)
    orig = clock.wrap_backward()
    clock.wrap_step(trainer.opt_gen)
    clock.wrap_step(trainer.opt_critic)
    try:
        for _ in range(2):
            trainer.train_step()
        clock.fwd = clock.bwd = clock.opt = 0.0
        t0 = time.perf_counter()
        for _ in range(args.iters):
            trainer.train_step()
        total = time.perf_counter() - t0
    finally:
        torch.Tensor.backward = orig
    net = clock.fwd + clock.bwd
    res = {"iters": args.iters, "threads": torch.get_num_threads(), "s_per_iter": total / args.iters,
           "network_forward": clock.fwd / total, "network_backward": clock.bwd / total,
           "network_total": net / total, "optimizer": clock.opt / total, "everything_else": (total - net - clock.opt) / total,
           "everything_else_incl_optimizer": (total - net) / total, "overrides": args.overrides}
    return res


def _saved_bytes_per_sample(cfg, batch: int) -> tuple[int, int]:
    """Bytes autograd saves for backward in one forward of the ADM at ``batch`` under CPU bf16 autocast, counting each
    storage once: ``(all, without attention probabilities)``. CPU's math attention kernel saves the probabilities
    ``(B * heads, N, N)``; CUDA's flash / memory-efficient kernels (what SDPA picks there) save only q, k, v, the
    output and a ``(B * heads, N)`` log-sum-exp, so the second number is the GPU's."""
    net = build_edm_adm(cfg)
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t):
        st = t.untyped_storage()
        probs = t.dim() == 3 and t.shape[-1] == t.shape[-2] and t.shape[-1] >= 64
        seen[st.data_ptr()] = (max(seen.get(st.data_ptr(), (0, False))[0], st.nbytes()), probs)
        return t

    x = torch.randn(batch, cfg.img_channels, cfg.img_resolution, cfg.img_resolution, requires_grad=True)
    sigma = torch.full((batch,), 1.0)
    labels = torch.arange(batch) % cfg.label_dim
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x, sigma, labels)
    del y
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    kept = [(n, probs) for ptr, (n, probs) in seen.items() if ptr not in params]
    return sum(n for n, _ in kept), sum(n for n, probs in kept if not probs)


def plan(args) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    cfg = rec.ModelConfig().adm()
    meta = build_edm_adm(cfg, device="meta")
    p = sum(t.numel() for t in meta.parameters())
    head = gan_head(rec.RECIPE.config, [meta.model.bottleneck_channels])  # the paper preset's head (official)
    ph = sum(t.numel() for t in head.parameters())
    x = torch.randn(1, 3, 64, 64, device="meta")
    with FlopCounterMode(display=False) as fc:
        meta(x, torch.ones(1, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"))
    flops = fc.get_total_flops()
    (a1_cpu, a1), (a2_cpu, a2) = _saved_bytes_per_sample(cfg, 1), _saved_bytes_per_sample(cfg, 2)
    per_sample = a2 - a1  # the batch-proportional part (GPU attention kernels)
    fixed = a1 - per_sample  # ~ the bf16 copies of the weights that autocast caches once per autocast region
    b, gib = args.batch, 2**30
    mem = {
        "teacher_fp32": 4 * p, "generator_weights_grads_adamw": 16 * p, "fake_score_weights_grads_adamw": 16 * p,
        "gan_head_weights_grads_adamw": 16 * ph, "generator_ema_fp32": 4 * p,
        "ddp_grad_buckets_generator_and_fake": 8 * p, "autocast_bf16_weight_cache_fake_score": fixed,
        "activations_critic_phase_3_fake_forwards": 3 * b * per_sample,
    }
    total = sum(mem.values())
    # forward passes (in units of one ADM forward F) per sample per iteration: critic every iteration = G fwd + 3 fake
    # fwd+bwd (bwd ~ 2F); generator every 5th = G fwd+bwd (3F) + teacher (F) + fake no-grad (F) + fake fwd with an
    # input-only backward (~2F)
    f_per_iter = 1 + 3 * 3 + (3 + 1 + 1 + 2) / 5
    iter_flops = f_per_iter * flops * b
    return {
        "params_per_adm": p, "gan_head_params": ph, "forward_flops_per_sample": flops,
        "saved_bytes_per_sample_gpu_attention": per_sample, "saved_bytes_per_sample_cpu_math_attention": a2_cpu - a1_cpu,
        "saved_bytes_fixed": fixed, "activations_one_forward_at_batch_GiB": b * per_sample / gib,
        "memory_GiB": {k: round(v / gib, 2) for k, v in mem.items()}, "memory_total_GiB": round(total / gib, 2),
        "forwards_per_sample_per_iter": f_per_iter, "flops_per_iter_per_gpu": iter_flops,
        "s_per_iter_at": {f"{int(t)}_TFLOPs_effective": round(iter_flops / (t * 1e12), 3) for t in (200, 300, 400)},
        "paper_s_per_iter": 53 * 3600 / 200_000,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["split", "plan"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the tiny preset (split)")
    args = ap.parse_intermixed_args(argv)
    print(json.dumps(split(args) if args.what == "split" else plan(args), indent=2))


if __name__ == "__main__":
    main()
