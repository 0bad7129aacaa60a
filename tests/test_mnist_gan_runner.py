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


def _arm(fids):
    return {"overrides": [], "seed_kind": "training", "fid_by_training_seed": fids,
            "label_accuracy_by_training_seed": [0.9] * len(fids)}


def test_beats_is_a_gap_larger_than_the_combined_std(runner):
    res = {"arms": {"a": _arm([0.20, 0.22, 0.24]), "b": _arm([0.30, 0.32, 0.34]), "c": _arm([0.25, 0.27, 0.29]),
                    "d": _arm([0.3])}}
    assert runner.beats(res, "a", "b")[0] is True  # gap 0.10 > hypot(0.02, 0.02) = 0.028
    assert runner.beats(res, "a", "c")[0] is True and runner.beats(res, "c", "b")[0] is True  # gap 0.05 > 0.028
    res["arms"]["c"] = _arm([0.21, 0.25, 0.29])  # std 0.04: gap 0.03 < hypot(0.02, 0.04)
    assert runner.beats(res, "a", "c")[0] is False and runner.beats(res, "b", "a")[0] is False
    assert runner.beats(res, "a", "d")[0] is None and runner.beats(res, "a", "missing")[0] is None


def test_goal_b_needs_the_gan_arm_to_beat_the_teacher_and_the_no_gan_arm_not_to(runner):
    res = {"arms": {"weak_teacher_ode": _arm([1.3, 1.4, 1.5]), "weak_teacher_dmd2": _arm([0.9, 1.0, 1.1]),
                    "weak_teacher_no_gan": _arm([1.3, 1.4, 1.5])}}
    assert "(b) from the weak teacher, DMD2 beats the teacher's ODE while w/o GAN does not: **reached**" in \
        runner.goals(res)[1]
    res["arms"]["weak_teacher_no_gan"] = _arm([0.9, 1.0, 1.1])
    assert "**not reached**" in runner.goals(res)[1]
    assert "(a) DMD2 beats w/o GAN beyond the combined std: not measured yet" in runner.goals(res)[0]


def test_docs_rewrites_only_the_generated_block(runner, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{runner.BEGIN}\nold table\n{runner.END}\nhand-written verdict\n")
    res = {"arms": {"dmd2": _arm([0.30, 0.34]), "no_gan": _arm([0.28])}}
    runner.write_block(doc, runner.docs_block(res, runner.arms(tmp_path), sweep=True))
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("\nhand-written verdict\n") and "old table" not in text
    assert "| `dmd2` | DMD2 (TTUR + GAN), default preset | (none) | 2 training (of 3) | 0.320 ± 0.028 |" in text
    assert "| `weak_teacher_dmd2` |" in text and "not run yet" in text
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="expected one"):
        runner.write_block(tmp_path / "bare.md", "x")


def test_paired_summary_differences_per_eval_seed(runner):
    res = {"teacher_ode": [0.20, 0.18, 0.22, 0.16],
           "arms": {"long_dmd2": {"fid_by_training_seed_and_eval_seed": {"0": [0.15, 0.17, 0.19, 0.13],
                                                                        "1": [0.17, 0.15, 0.21, 0.15]}},
                    "long_no_gan": {"fid_by_training_seed_and_eval_seed": {}}}}
    lines = runner.paired_summary(res)
    assert len(lines) == 2  # the teacher line and one arm (an arm without finished seeds is left out)
    # students' mean per seed 0.16, 0.16, 0.20, 0.14 -> differences -0.04, -0.02, -0.02, -0.02
    diff = [-0.04, -0.02, -0.02, -0.02]
    se = statistics.stdev(diff) / 2
    assert f"{statistics.fmean(diff):+.3f} ± {se:.3f}" in lines[1]
    assert "lower in 4 of 4 seeds" in lines[1] and "(2 training seeds)" in lines[1]
    assert f"{statistics.stdev(res['teacher_ode']):.3f} over 4 evaluation seeds" in lines[0]


def test_fid_per_seed_is_cached_per_seed(runner, tmp_path, monkeypatch):
    import types

    calls = []

    def fake_eval(sampler, seeds):
        calls.append(seeds)
        return types.SimpleNamespace(fid=(float(seeds[0]) / 10,))

    import dmd2.eval.fid_mnist as fm
    monkeypatch.setattr(fm, "evaluate_sampler", fake_eval)
    cache = tmp_path / "c.json"
    assert runner._fid_per_seed(cache, lambda: object(), [0, 1]) == [0.0, 0.1]
    assert runner._fid_per_seed(cache, lambda: object(), [0, 1, 2]) == [0.0, 0.1, 0.2]
    assert calls == [(0,), (1,), (2,)]  # seeds 0 and 1 were read back, not evaluated again


def test_collect_takes_the_teachers_sampling_seeds_from_the_paired_pass(runner, tmp_path):
    paired = tmp_path / "paired.json"
    paired.write_text(json.dumps({"eval_seeds": [0, 1, 2, 3], "teacher_ode": [0.17, 0.19, 0.15, 0.16], "arms": {}}))
    res = runner.collect(tmp_path, paired)
    t = res["arms"]["teacher_ode"]
    assert t["fid_by_training_seed"] == [0.17, 0.19, 0.15, 0.16] and t["seeds"] == [0, 1, 2, 3]
    assert t["seed_kind"] == "sampling" and "paired.json" in t["source"]
    assert len(res["arms"]["weak_teacher_ode"]["fid_by_training_seed"]) == 3  # still its teacher.json
    assert len(runner.collect(tmp_path)["arms"]["teacher_ode"]["fid_by_training_seed"]) == 3  # no paired file


def test_paired_summary_reports_each_training_seed(runner):
    res = {"teacher_ode": [0.2, 0.2], "arms": {"a": {"fid_by_training_seed_and_eval_seed": {"0": [0.1, 0.1],
                                                                                           "1": [0.15, 0.15]}}}}
    line = runner.paired_summary(res)[1]
    assert "per training seed -0.100, -0.050" in line and f"std over training seeds {statistics.stdev([-0.1, -0.05]):.3f}" in line


def test_paired_summary_compares_the_first_arm_with_the_others(runner):
    res = {"teacher_ode": [0.2, 0.3, 0.2],
           "arms": {"a": {"fid_by_training_seed_and_eval_seed": {"0": [0.1, 0.2, 0.1]}},
                    "b": {"fid_by_training_seed_and_eval_seed": {"0": [0.2, 0.2, 0.2], "1": [0.2, 0.4, 0.2]}}}}
    last = runner.paired_summary(res)[-1]
    # b's per-seed means 0.2, 0.3, 0.2 -> a minus b: -0.1, -0.1, -0.1
    assert last.startswith("`a` minus `b`") and "-0.100 ± 0.000" in last and "lower in 3 of 3 seeds" in last
