"""train.loggers: log.jsonl always; TensorBoard and wandb (offline here) each record the resolved config as
hyperparameters and the logged scalars."""
import json
from pathlib import Path

import pytest

import train_helpers as helpers


def _tb_events(folder: Path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for f in sorted(folder.glob("events.out.tfevents.*")):
        yield from EventFileLoader(str(f)).Load()


def _tb_hparams(folder: Path) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    for ev in _tb_events(folder):
        for v in ev.summary.value:
            if v.metadata.plugin_data.plugin_name == "hparams":
                data = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                if data.HasField("session_start_info"):
                    hp = data.session_start_info.hparams
                    return {k: (x.number_value if x.HasField("number_value") else x.string_value if x.HasField("string_value")
                                else x.bool_value) for k, x in hp.items()}
    return {}


def test_tensorboard_records_the_config_as_hparams(tmp_path):
    out = helpers.run_inprocess(tmp_path / "run", "train.max_steps=2", "train.log_every=1", "model.hidden=8")
    hp = _tb_hparams(out / "tb")
    assert hp["train.max_steps"] == 2 and hp["model.hidden"] == 8 and hp["critic.ratio"] == 2
    assert hp["train.betas"] == "[0.9, 0.999]" and hp["train.resume"] == ""
    # every key of the saved config, no other (its top-level "recipe" names the recipe's module; not a config key)
    saved = json.loads((out / "config.json").read_text())
    assert saved.pop("recipe") == "dmd2.recipes.tiny"
    assert set(hp) == {f"{s}.{k}" for s, sub in saved.items() for k in sub}
    steps = sorted({ev.step for ev in _tb_events(out / "tb") for v in ev.summary.value if v.tag == "loss_fake"})
    assert steps == [1, 2]


def test_jsonl_only(tmp_path):
    out = helpers.run_inprocess(tmp_path / "run", "train.max_steps=2", "train.log_every=1", "model.hidden=8",
                                "train.loggers=jsonl")
    assert [r["step"] for r in helpers.log_records(out)] == [1, 2]
    assert not (out / "tb").exists() and not (out / "wandb").exists()


def test_unknown_logger_is_refused():
    from dmd2.train.config import TrainConfig

    with pytest.raises(ValueError, match=r"train.loggers: unknown logger\(s\) \['mlflow'\]; expected a comma-separated "
                                         r"subset of tensorboard, wandb \(jsonl is always on\)"):
        TrainConfig(loggers="tensorboard,mlflow")


def _wandb_records(path: Path):
    """The protobuf records of an offline run's ``run-ID.wandb`` file: a 7-byte file header, then LevelDB-log
    blocks of 32 KiB holding records with a 7-byte header (crc32, length u16 LE, kind: 1 full, 2 first, 3 middle,
    4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7: pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf + chunk if kind == 4 else chunk)
            yield rec
        buf = chunk if kind == 2 else buf + chunk if kind == 3 else b""


def test_wandb_offline_run_files_hold_config_and_history(tmp_path, monkeypatch):
    pytest.importorskip("wandb")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = helpers.run_inprocess(tmp_path / "run", "train.max_steps=2", "train.log_every=1", "model.hidden=8",
                                "train.loggers=tensorboard,wandb,jsonl")
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (out / "wandb" / "run-id").read_text().strip()
    assert runs[0].name.endswith("-" + run_id)
    records = list(_wandb_records(runs[0] / f"run-{run_id}.wandb"))
    run = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert len(run) == 1 and run[0].run_id == run_id and run[0].display_name == "run"
    config = {u.key: json.loads(u.value_json) for u in run[0].config.update if u.key != "_wandb"}
    saved = json.loads((out / "config.json").read_text())
    assert saved.pop("recipe") == "dmd2.recipes.tiny"  # names the recipe's module; not a config key
    from dmd2.train.loggers import hparams

    assert config == hparams(saved)  # every key of the resolved config, as TensorBoard's hparams
    assert config["train.max_steps"] == 2 and config["model.hidden"] == 8
    history = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    jsonl = helpers.log_records(out)
    assert [h["_step"] for h in history] == [r["step"] for r in jsonl] == [1, 2]
    assert [h["loss_fake"] for h in history] == [r["loss_fake"] for r in jsonl]
    assert (out / "tb").is_dir()
