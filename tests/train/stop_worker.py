"""torchrun worker (2 ranks, gloo) for the ImageNet-64 tiny preset under DDP or FSDP2 (``DMD2_TEST_MODE``):

* N iterations once with features-only (stopped) GAN passes and once with full ones: are the local parameters equal
  bit for bit, and did they move from the initial values?
* a lone feature pass (the only forward of the fake score before its backward, rank-dependent input): are the
  gradients after the stopped pass those after the full pass (DDP all-reduces only for a reducer prepared at the
  end of a forward)?
* the wrapper state (FSDP2: every state's training state, the root's in-flight marker, which groups are unsharded;
  DDP: its forward-sync flag) after a no-grad stopped pass equals that after a no-grad full pass.
"""
import os
import tempfile

import torch

from dmd2.core.gan import FeatureHooks
from dmd2.recipes import imagenet64
from dmd2.train import Trainer, resolve_config
from dmd2.train.distributed import exit_process, init_distributed

N = 4
MODE = os.environ["DMD2_TEST_MODE"]
OVERRIDES = [f"train.distributed={MODE}", "train.batch_size=2", "critic.ratio=2", "train.progress=false",
             "train.sample_every=0", "train.device=cpu", "train.ema_decay=null",
             "objective.critic_min_frac=0.02", "objective.critic_max_frac=0.98"]
_run = FeatureHooks.run


def _full(self, fn, *args, features_only=False, **kwargs):
    return _run(self, fn, *args, **kwargs)


def local_params(trainer):
    out = {}
    for name, m in (("generator", trainer.gen), ("fake_score", trainer.fake), ("gan_head", trainer.head)):
        for n, p in m.named_parameters():
            out[f"{name}.{n}"] = (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
    return out


def run(info, out, steps):
    cfg = resolve_config(imagenet64.RECIPE, "tiny", OVERRIDES, out=out)
    torch.manual_seed(0)
    tr = Trainer(cfg, imagenet64.RECIPE.build(cfg, info), info=info, out=out)
    for _ in range(steps):
        tr.train_step()
    return local_params(tr)


def wrapper_state(module):
    from torch.distributed.fsdp import FSDPModule

    if MODE == "ddp":
        return module.require_forward_param_sync
    states = []
    for m in module.modules():
        if isinstance(m, FSDPModule):
            st = m._get_fsdp_state()
            states.append((st._training_state.name, st._state_ctx.iter_forward_root is not None,
                           [g.is_unsharded for g in st._fsdp_param_groups]))
    return states


def lone_pass(info, out, stop):
    """Gradients of the fake score after one feature pass + backward, and the wrapper state after a no-grad pass."""
    cfg = resolve_config(imagenet64.RECIPE, "tiny", OVERRIDES, out=out)
    torch.manual_seed(0)
    tr = Trainer(cfg, imagenet64.RECIPE.build(cfg, info), info=info, out=out)
    obj = tr.objective_for(critic=True)
    tr.critic_trainable.set(True)
    g = torch.Generator().manual_seed(10 + info.rank)
    x, t, labels = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, generator=g) + 0.5, torch.tensor([1, 2])
    _, feats = obj.features.run(obj._fake, x, t, labels, 1, features_only=stop)
    obj._head(feats).square().sum().backward()
    grads = {n: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).clone()
             for n, p in tr.fake_w.named_parameters() if p.grad is not None}
    with torch.no_grad():
        obj.features.run(obj._fake, x, t, labels, 1, features_only=stop)
    return grads, wrapper_state(tr.fake_w)


def main():
    info = init_distributed(MODE, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        start = run(info, tmp, 0)
        stopped = run(info, tmp, N)
        g_stop, s_stop = lone_pass(info, tmp, True)
        FeatureHooks.run = _full
        full = run(info, tmp, N)
        g_full, s_full = lone_pass(info, tmp, False)
    equal = stopped.keys() == full.keys() and all(torch.equal(stopped[k], full[k]) for k in stopped)
    moved = any(not torch.equal(start[k], stopped[k]) for k in start if k.startswith("gan_head"))
    lone = bool(g_full) and g_stop.keys() == g_full.keys() and all(torch.equal(g_stop[k], g_full[k]) for k in g_full)
    print(f"RESULT rank={info.rank} equal={equal} moved={moved} lone={lone} state={s_stop == s_full}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process(0)
