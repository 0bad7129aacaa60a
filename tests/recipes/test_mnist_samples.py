"""A tiny MNIST run writes sample grids during training: OUT/samples/step-*.png (one labelled row per class, the
generator's own samples) and the same grid as a TensorBoard image; the run ends with its summary."""
import numpy as np
import pytest
import torch
from PIL import Image

from dmd2.recipes import mnist
from dmd2.train import main, resolve_config
from dmd2.train.checkpoint import checkpoint_path, read_checkpoint
from dmd2.train.monitor import image_grid


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist") / "run"
    assert main(mnist.RECIPE, ["--preset", "tiny", "--out", str(out), "train.progress=false"]) == 0
    return out


def test_samples_are_the_generators_rows_by_class(tiny_run):
    assert sorted(p.name for p in (tiny_run / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    png = np.asarray(Image.open(tiny_run / "samples" / "step-00000004.png").convert("RGB"))
    # rebuild: the checkpoint's generator through the recipe's sample_fn (classes 0..9 = rows, 8 columns)
    cfg = resolve_config(mnist.RECIPE, "tiny", out=str(tiny_run))
    c = mnist.build(cfg)
    weights, _, _ = read_checkpoint(checkpoint_path(tiny_run, 4))
    c.generator.load_state_dict(weights["generator"])
    with torch.no_grad():
        imgs = c.sample_fn(c.generator.eval(), torch.device("cpu"))
    assert imgs.shape == (80, 1, 32, 32) and c.sample_rows == [f"class {k}" for k in range(10)]
    expected = image_grid(imgs, nrow=8, row_labels=c.sample_rows)
    assert png.shape == expected.shape == (10 * 33 + 1, expected.shape[1], 3)
    assert np.abs(png.astype(int) - expected).max() <= 1  # the PNG is that grid
    margin = png.shape[1] - (8 * 33 + 1)
    assert margin > 20
    for r in range(10):  # every row has its label text (dark pixels) in the white margin
        band = png[1 + 33 * r: 33 * (r + 1), :margin]
        assert (band < 128).any()
    assert (png[:, :margin] >= 128).mean() > 0.7


def test_samples_in_tensorboard(tiny_run):
    import io

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    shots = {}
    for f in sorted((tiny_run / "tb").glob("events.out.tfevents.*")):
        for ev in EventFileLoader(str(f)).Load():
            for v in ev.summary.value:
                if v.tag == "samples":  # the loader stores images as a tensor [width, height, PNG bytes]
                    encoded = v.tensor.string_val[2] if v.HasField("tensor") else v.image.encoded_image_string
                    shots[ev.step] = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    assert sorted(shots) == [2, 4]
    png = np.asarray(Image.open(tiny_run / "samples" / "step-00000004.png").convert("RGB"))
    assert np.array_equal(shots[4], png)


def test_row_labels_must_match_rows():
    with pytest.raises(ValueError, match="3 row labels for 2 rows"):
        image_grid(torch.zeros(4, 1, 8, 8), nrow=2, row_labels=["a", "b", "c"])


def test_train_ends_with_one_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(mnist.RECIPE, ["--preset", "tiny", "--out", str(out), "train.sample_every=0"]) == 0
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    ckpt = checkpoint_path(out, 4)
    assert lines[-6:] == [
        f"mnist: done. Run folder {out} (config.json, log.jsonl, tb/)",
        f"  checkpoint: {ckpt}",
        "  next:",
        f"    python -m dmd2.recipes.mnist evaluate {ckpt} --config {out / 'config.json'}   # -> {out / 'metrics.json'}",
        f"    ls {out / 'samples'}   # sample grids during training, one row per class",
        f"    python -m dmd2.recipes.mnist --config {out / 'config.json'} --resume auto train.max_steps=N   # train on"]
    # the progress bar draws its 100% state once
    assert cap.err.count("4/4") == 1
