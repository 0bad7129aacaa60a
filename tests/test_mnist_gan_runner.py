"""The MNIST GAN-ablation runner (benchmarks/mnist_gan.py): it collects per-training-seed figures from run folders
into the documented schema and tabulates mean +- std over training seeds."""
import importlib.util
import json
import statistics
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("mnist_gan", REPO / "benchmarks" / "mnist_gan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_run(root: Path, arm: str, seed: int, fid: float, acc: float) -> None:
    d = root / arm / f"seed-{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"student_1step": {"fid": fid, "fid_std": fid / 10,
                                                                   "label_accuracy": acc}}))


def test_collect_schema_and_table(runner, tmp_path):
    _fake_run(tmp_path, "dmd2", 0, 0.30, 0.96)
    _fake_run(tmp_path, "dmd2", 2, 0.34, 0.95)
    _fake_run(tmp_path, "no_gan", 1, 0.28, 0.97)
    (tmp_path / "dmd2" / "seed-1").mkdir()  # an unfinished run: no metrics.json, not counted
    res = runner.collect(tmp_path)
    d = res["arms"]["dmd2"]
    assert d["seeds"] == [0, 2] and d["fid_by_training_seed"] == [0.30, 0.34]
    assert d["label_accuracy_by_training_seed"] == [0.96, 0.95] and d["seed_kind"] == "training"
    assert res["arms"]["no_gan"]["overrides"] == runner.NO_GAN
    # the shipped teacher's ODE row, per sampling seed, from the JSON shipped beside it
    t = res["arms"]["teacher_ode"]
    assert t["seed_kind"] == "sampling" and len(t["fid_by_training_seed"]) == 3
    w = res["arms"]["weak_teacher_ode"]  # the shipped weak teacher, clearly worse than the shipped one
    assert statistics.fmean(w["fid_by_training_seed"]) > 2 * statistics.fmean(t["fid_by_training_seed"])
    row = next(line for line in runner.table(res).splitlines() if line.startswith("| dmd2 "))
    assert f"{statistics.fmean([0.30, 0.34]):.3f} ± {statistics.stdev([0.30, 0.34]):.3f}" in row


def test_run_refuses_unknown_arm(runner, tmp_path, capsys):
    assert runner.main(["run", "--root", str(tmp_path), "--arms", "dmd2,bogus"]) == 2
    assert "unknown arm(s) ['bogus']" in capsys.readouterr().err


def test_finished_run_is_skipped(runner, tmp_path):
    _fake_run(tmp_path, "dmd2", 0, 0.3, 0.9)
    assert "done already" in runner.run_student(tmp_path, "dmd2", runner.arms(tmp_path)["dmd2"], 0, 1)
