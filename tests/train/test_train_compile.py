"""train.compile: the networks' blocks run through torch.compile and train as the eager run does (to compiled-kernel
rounding), with the GAN feature passes still stopping at the tap."""
import pytest
import torch

from dmd2.recipes import imagenet64
from dmd2.train import Trainer, resolve_config

pytestmark = pytest.mark.slow

OVERRIDES = ["train.batch_size=2", "critic.ratio=2", "train.progress=false", "train.sample_every=0",
             "train.ema_decay=null", "model.model_channels=16", "gan.hidden=16"]


def _run(tmp_path, flag):
    cfg = resolve_config(imagenet64.RECIPE, "tiny", OVERRIDES + [f"train.compile={flag}"], out=str(tmp_path / str(flag)))
    torch.manual_seed(0)
    comps = imagenet64.RECIPE.build(cfg)
    tr = Trainer(cfg, comps, out=tmp_path / str(flag))
    decoder = {"calls": 0}
    for name, m in tr.fake.model.dec.items():
        m.register_forward_pre_hook(lambda *a: decoder.__setitem__("calls", decoder["calls"] + 1))
    for _ in range(3):  # generator turns at 0 and 2
        tr.train_step()
    return tr.state_dict()[0], decoder["calls"], tr


def test_compiled_training_matches_eager(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    eager, eager_dec, _ = _run(tmp_path, False)
    torch._dynamo.utils.counters.clear()
    compiled, compiled_dec, tr = _run(tmp_path, True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0       # something was compiled
    assert all(hasattr(b.forward, "_torchdynamo_orig_callable") or hasattr(b.forward, "__wrapped__")
               for b in imagenet64._blocks(tr.fake))
    assert compiled_dec == eager_dec                                          # the same decoder runs (stops intact)
    for net in ("generator", "fake_score", "gan_head"):
        for k, v in eager[net].items():
            torch.testing.assert_close(compiled[net][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{net}.{k}: {m}")
