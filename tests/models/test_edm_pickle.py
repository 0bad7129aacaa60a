"""Safe EDM pickle loading: a benign pickle in EDM's format converts and loads; hostile payloads never run.

The pickles are written here by an EDM-style pickler: every module reduces to
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = {type, version, module_src, class_name,
state}`` (as EDM's ``persistent_class.__reduce__`` does), tensors through torch's own reducers
(``_rebuild_parameter`` / ``_rebuild_tensor_v2`` / ``torch.storage._load_from_bytes``), the ``enc``/``dec``
containers as ``torch.nn.ModuleDict``, EDM's numpy init constants as numpy scalars. Positive controls show that a
plain unpickle of the same bytes does run each payload, so the sentinel checks are meaningful.
"""
import io
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from dmd2.core.denoisers import EDMPrecond
from dmd2.models import convert_edm
from dmd2.models.adm import ADMConfig, ADMNet, EDMConv2d, EDMGroupNorm, EDMLinear, PositionalEmbedding, UNetBlock
from dmd2.models.edm_pickle import (
    ALLOWED_GLOBALS,
    EDMPickleRefused,
    PersistentObject,
    adm_config_from_edm_kwargs,
    convert_edm_pickle,
    edm_network_state_dict,
    load_edm_adm,
    load_edm_pickle,
)

CFG = ADMConfig(img_resolution=16, img_channels=3, label_dim=5, model_channels=32, channel_mult=(1, 2),
                channel_mult_emb=2, num_blocks=1, attn_resolutions=(8,), dropout=0.0)
EDM_MODEL_KWARGS = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=5, augment_dim=0,
                        model_channels=32, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1,
                        attn_resolutions=[8], dropout=0.0)
EDM_CLASS = {ADMNet: "DhariwalUNet", UNetBlock: "UNetBlock", EDMConv2d: "Conv2d", EDMLinear: "Linear",
             EDMGroupNorm: "GroupNorm", PositionalEmbedding: "PositionalEmbedding", EDMPrecond: "EDMPrecond"}


class FakeEDMLoss:  # EDM's loss_fn is a persistent plain object
    def __init__(self):
        self.P_mean, self.P_std, self.sigma_data = -1.2, 1.2, 0.5


def benign_module_src() -> str:
    names = sorted(set(EDM_CLASS.values()) | {"EDMLoss"})
    return "import math\n" + "".join(f"class {n}:\n    pass\n" for n in names)


@pytest.fixture
def persistence(monkeypatch):
    """A stand-in ``torch_utils.persistence`` that behaves like EDM's on load: it exec-s ``module_src``."""
    pkg = types.ModuleType("torch_utils")
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        module = types.ModuleType("_imported_module_test")
        exec(meta["module_src"], module.__dict__)  # what EDM does; used only by the positive controls
        obj = module.__dict__[meta["class_name"]].__new__(module.__dict__[meta["class_name"]])
        obj.__dict__.update(meta["state"])
        return obj

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    return mod


class EDMStylePickler(pickle.Pickler):
    def __init__(self, f, persistence, module_src):
        super().__init__(f, protocol=4)  # EDM: pickle.dump(data, f) with Python's default protocol
        self.persistence = persistence
        self.module_src = module_src

    def reducer_override(self, obj):
        if isinstance(obj, FakeEDMLoss):
            name, state = "EDMLoss", dict(obj.__dict__)
        elif type(obj) in EDM_CLASS:
            name = EDM_CLASS[type(obj)]
            state = {k: v for k, v in obj.__dict__.items() if k != "config"}
        else:
            return NotImplemented
        if name == "DhariwalUNet":
            state["_init_kwargs"] = dict(EDM_MODEL_KWARGS)
        elif name == "EDMPrecond":
            state["_init_kwargs"] = dict(img_resolution=16, img_channels=3, label_dim=5, sigma_data=0.5,
                                         model_type="DhariwalUNet", model_channels=32)
        else:  # EDM's layers record numpy init constants, e.g. init_weight=np.sqrt(1/3)
            state["_init_kwargs"] = dict(init_mode="kaiming_uniform", init_weight=np.sqrt(1 / 3))
        state["_init_args"] = ()
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=name, state=state)
        return (self.persistence._reconstruct_persistent_obj, (meta,))


def tiny_precond(seed: int = 0) -> EDMPrecond:
    torch.manual_seed(seed)
    net = ADMNet(CFG)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return EDMPrecond(net, sigma_data=0.5, label_dim=5).eval()


def edm_pickle_bytes(persistence, ema=None, module_src=None, **extra) -> bytes:
    data = dict(ema=tiny_precond() if ema is None else ema, loss_fn=FakeEDMLoss(), augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="x.zip", use_labels=True),
                **extra)
    f = io.BytesIO()
    EDMStylePickler(f, persistence, module_src or benign_module_src()).dump(data)
    return f.getvalue()


class System:
    """``os.system(cmd)`` on unpickling (the classic payload)."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def touch(path) -> str:
    return f"touch {path}"


# ------------------------------------------------------------------------------------------------- benign round trip


def test_benign_edm_pickle_converts_and_loads(persistence, tmp_path):
    precond = tiny_precond()
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(edm_pickle_bytes(persistence, ema=precond))
    out = tmp_path / "net.safetensors"
    meta = convert_edm_pickle(pkl, out)
    assert meta["class_name"] == "EDMPrecond" and meta["model_class_name"] == "DhariwalUNet"
    assert float(meta["sigma_data"]) == 0.5
    sd = load_file(out)
    ref = precond.state_dict()
    assert sorted(sd) == sorted(ref) and all(k.startswith("model.") for k in sd)  # safetensors sorts names
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k
    with safe_open(out, framework="pt") as f:
        assert f.metadata()["key"] == "ema"
    assert adm_config_from_edm_kwargs(EDM_MODEL_KWARGS) == CFG
    x = torch.randn(2, 3, 16, 16)
    sigma, labels = torch.tensor([0.5, 3.0]), torch.tensor([1, 4])
    expected = precond(x, sigma, labels)
    for src in (pkl, out):
        net = load_edm_adm(src)
        assert isinstance(net, EDMPrecond) and net.model.config == CFG
        torch.testing.assert_close(net(x, sigma, labels), expected, rtol=0, atol=0)


def test_reconstruction_is_data_only(persistence):
    data = load_edm_pickle(io.BytesIO(edm_pickle_bytes(persistence)))
    assert set(data) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}
    ema = data["ema"]
    assert isinstance(ema, PersistentObject) and ema.class_name == "EDMPrecond" and len(ema.module_sha256) == 64
    conv = ema.state["_modules"]["model"].state["_modules"]["enc"].state["_modules"]["16x16_conv"]
    assert conv.class_name == "Conv2d"
    assert conv.state["_init_kwargs"]["init_weight"] == pytest.approx(np.sqrt(1 / 3))  # numpy scalar decoded
    assert type(conv.state["_init_kwargs"]["init_weight"]) is float
    assert data["loss_fn"].class_name == "EDMLoss" and data["loss_fn"].state["P_std"] == 1.2


def test_cli_converts_and_verifies(persistence, tmp_path, capsys):
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(edm_pickle_bytes(persistence))
    assert convert_edm.main([str(pkl), str(tmp_path / "o.safetensors")]) == 0
    assert "verified against ADMNet" in capsys.readouterr().out
    hostile = tmp_path / "bad.pkl"
    hostile.write_bytes(pickle.dumps({"ema": System(touch(tmp_path / "s"))}))
    assert convert_edm.main([str(hostile), str(tmp_path / "b.safetensors")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "b.safetensors").exists()


def test_mismatched_network_is_reported(persistence, tmp_path):
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(edm_pickle_bytes(persistence))
    with pytest.raises(ValueError, match="missing|unexpected|shape"):
        load_edm_adm(pkl, config=ADMConfig(**{**CFG.to_dict(), "num_blocks": 2}))


def test_missing_file_and_key(persistence, tmp_path):
    with pytest.raises(FileNotFoundError):
        load_edm_pickle(tmp_path / "nope.pkl")
    with pytest.raises(ValueError, match="'generator'"):
        edm_network_state_dict(io.BytesIO(edm_pickle_bytes(persistence)), key="generator")


# -------------------------------------------------------------------------------------------------- hostile payloads


def test_top_level_payload_refused_and_not_run(tmp_path):
    sentinel = tmp_path / "ran"
    payload = pickle.dumps({"ema": System(touch(sentinel))})
    pickle.loads(payload)  # positive control: a plain unpickle runs it
    assert sentinel.exists()
    sentinel.unlink()
    with pytest.raises(EDMPickleRefused, match=r"refused.*'posix\.system'|refused.*'os\.system'") as e:
        load_edm_pickle(io.BytesIO(payload))
    assert isinstance(e.value, ValueError)
    assert not sentinel.exists()


def test_payload_nested_in_module_state_refused(persistence, tmp_path):
    sentinel = tmp_path / "ran"
    ema = tiny_precond()
    ema.model.enc["16x16_conv"].note = System(touch(sentinel))  # deep inside the ema network's state
    payload = edm_pickle_bytes(persistence, ema=ema)
    with pytest.raises(EDMPickleRefused, match="system"):
        load_edm_pickle(io.BytesIO(payload))
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "module, name",
    [("builtins", "exec"), ("builtins", "eval"), ("builtins", "getattr"), ("builtins", "__import__"),
     ("os", "system"), ("subprocess", "Popen"), ("torch", "load"), ("torch.serialization", "load"),
     ("torch._utils", "_rebuild_from_type_v2"), ("torch_utils.persistence", "_src_to_module"),
     ("dnnlib.util", "call_func_by_name"), ("copyreg", "_reconstructor"), ("numpy", "load"),
     ("pickle", "loads"), ("torch.nn.modules.module", "Module")],
)
def test_any_other_global_is_refused(module, name):
    payload = f"c{module}\n{name}\n(S'x'\ntR.".encode()  # protocol 0: GLOBAL, MARK, STRING, TUPLE, REDUCE
    with pytest.raises(EDMPickleRefused, match=f"'{module}.{name}'"):
        load_edm_pickle(io.BytesIO(payload))
    assert (module, name) not in ALLOWED_GLOBALS


def test_persistent_ids_refused():
    with pytest.raises(EDMPickleRefused, match="persistent id"):
        load_edm_pickle(io.BytesIO(b"P1\n."))


class HostileStorage:
    """A 'storage' whose ``_load_from_bytes`` blob is a torch.save pickle holding a payload."""

    def __init__(self, blob):
        self.blob = blob

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.blob,))


@pytest.mark.parametrize("zipfile_format", [False, True])
def test_payload_inside_storage_bytes_refused_and_not_run(persistence, tmp_path, zipfile_format):
    sentinel = tmp_path / "ran"
    b = io.BytesIO()
    torch.save(System(touch(sentinel)), b, _use_new_zipfile_serialization=zipfile_format)
    blob = b.getvalue()
    torch.storage._load_from_bytes(blob)  # positive control: torch's own reducer target runs it
    assert sentinel.exists()
    sentinel.unlink()
    ema = tiny_precond()
    ema.model.register_buffer("extra", torch.zeros(1))
    ema.model._buffers["extra"] = HostileStorage(blob)  # where a tensor's storage would be
    payload = edm_pickle_bytes(persistence, ema=ema)
    with pytest.raises(EDMPickleRefused, match="storage blob was refused by torch.load\\(weights_only=True\\)"):
        load_edm_pickle(io.BytesIO(payload))
    assert not sentinel.exists()


def test_module_src_is_never_executed(persistence, tmp_path):
    sentinel = tmp_path / "ran"
    src = benign_module_src() + f"open({str(sentinel)!r}, 'w').write('module source ran')\n"
    payload = edm_pickle_bytes(persistence, module_src=src)
    pickle.loads(payload)  # positive control: EDM-style reconstruction exec-s the source
    assert sentinel.exists()
    sentinel.unlink()
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(payload)
    convert_edm_pickle(pkl, tmp_path / "net.safetensors")  # converts fine ...
    net = load_edm_adm(pkl)
    assert net.model.config == CFG
    assert not sentinel.exists()  # ... without ever running the embedded source


class OutOfBounds:
    def __reduce__(self):
        from collections import OrderedDict

        return (torch._utils._rebuild_tensor_v2, (torch.zeros(4).storage(), 2, (100,), (1,), False, OrderedDict()))


def test_tensor_outside_its_storage_refused(persistence):
    ema = tiny_precond()
    ema.model._buffers["extra"] = OutOfBounds()
    with pytest.raises(EDMPickleRefused, match="exceeds its storage"):
        load_edm_pickle(io.BytesIO(edm_pickle_bytes(persistence, ema=ema)))


def test_protocol2_pickles_load(persistence):
    """Protocol 2 writes bytes via ``_codecs.encode`` and sets via ``builtins.set``; both are accepted."""

    class Protocol2Pickler(EDMStylePickler):
        def __init__(self, f):
            pickle.Pickler.__init__(self, f, protocol=2)
            self.persistence, self.module_src = persistence, benign_module_src()

    f = io.BytesIO()
    Protocol2Pickler(f).dump({"ema": tiny_precond(), "s": {1, 2}})
    sd, _ = edm_network_state_dict(io.BytesIO(f.getvalue()))
    ref = tiny_precond().state_dict()
    assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert load_edm_pickle(io.BytesIO(f.getvalue()))["s"] == {1, 2}


def test_labels_one_hot_passthrough(persistence, tmp_path):
    """The loaded denoiser takes integer labels (one-hot inside EDMPrecond) like the original."""
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(edm_pickle_bytes(persistence))
    net = load_edm_adm(pkl)
    x, s = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(net(x, s, torch.tensor([2, 3])), net(x, s, F.one_hot(torch.tensor([2, 3]), 5).float()))


class Retarget:
    """BUILD on a rebuilt tensor: ``Tensor.__setstate__`` would re-point it (legacy 4-tuple state) past its storage."""

    def __init__(self, storage):
        self.storage = storage

    def __reduce__(self):
        from collections import OrderedDict

        t = (torch._utils._rebuild_tensor_v2, (self.storage, 0, (2,), (1,), False, OrderedDict()))
        return t + ((self.storage, 0, (1000,), (1,)),)


def test_tensor_retargeted_by_setstate_is_caught(persistence):
    ema = tiny_precond()
    ema.model._buffers["extra"] = Retarget(torch.zeros(4).storage())
    try:
        sd, _ = edm_network_state_dict(io.BytesIO(edm_pickle_bytes(persistence, ema=ema)))
    except ValueError as e:  # refused while unpickling, or caught by the post-load check
        assert "storage" in str(e)
    else:  # torch may have grown the storage instead: then the tensor must still lie within it
        t = sd["model.extra"]
        assert t.untyped_storage().nbytes() >= t.numel() * t.element_size()


def test_non_tensor_parameter_entries_refused(persistence):
    ema = tiny_precond()
    ema.model._parameters["bogus"] = "not a tensor"
    with pytest.raises(ValueError, match="model.bogus: parameter is str, expected a plain CPU tensor"):
        edm_network_state_dict(io.BytesIO(edm_pickle_bytes(persistence, ema=ema)))


# ------------------------------------------------------------------------------------------ bounds before allocation


def _storage_blob(n: int, zipfile_format: bool) -> bytes:
    b = io.BytesIO()
    torch.save(torch.zeros(n).untyped_storage(), b, _use_new_zipfile_serialization=zipfile_format)
    return b.getvalue()


def _deflated(blob: bytes) -> bytes:
    """The same zip entries, DEFLATE-compressed (a zip bomb when the data are zeros)."""
    import zipfile

    src, out = zipfile.ZipFile(io.BytesIO(blob)), io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info.filename))
    return out.getvalue()


def test_compressed_storage_blob_refused_before_decoding(persistence):
    bomb = _deflated(_storage_blob(2**22, zipfile_format=True))  # 16 MiB of zeros in ~16 KiB
    assert len(bomb) < 2**16
    assert torch.load(io.BytesIO(bomb), weights_only=True).nbytes() == 2**24  # positive control: torch expands it
    ema = tiny_precond()
    ema.model._buffers["extra"] = HostileStorage(bomb)
    with pytest.raises(EDMPickleRefused, match=r"zip entry '.*' is compressed \(declares \d+ bytes from \d+\)"):
        load_edm_pickle(io.BytesIO(edm_pickle_bytes(persistence, ema=ema)))


def test_legacy_storage_blob_declaring_more_than_it_holds_refused(persistence):
    blob = bytearray(_storage_blob(16, zipfile_format=False))  # what Storage.__reduce__ writes
    blob[-16 * 4 - 8: -16 * 4] = (2**40).to_bytes(8, "little")  # numel: 2**40 float32 = 4 TiB
    ema = tiny_precond()
    ema.model._buffers["extra"] = HostileStorage(bytes(blob))
    with pytest.raises(EDMPickleRefused, match=r"declares 1099511627776 elements but holds 64 data bytes"):
        load_edm_pickle(io.BytesIO(edm_pickle_bytes(persistence, ema=ema)))


def test_total_storage_cap(persistence):
    payload = edm_pickle_bytes(persistence)
    total = sum(t.numel() * t.element_size() for t in tiny_precond().state_dict().values())
    assert isinstance(load_edm_pickle(io.BytesIO(payload), max_bytes=total), dict)  # exactly the network fits
    with pytest.raises(EDMPickleRefused, match=f"exceed {total - 1} bytes in total"):
        load_edm_pickle(io.BytesIO(payload), max_bytes=total - 1)


@pytest.mark.parametrize("key,value", [("num_blocks", 200000), ("model_channels", 10**6), ("channel_mult", [1] * 50),
                                       ("img_resolution", 2**20)])
def test_constructor_kwargs_outside_ranges_refused_before_building(persistence, tmp_path, capsys, monkeypatch, key, value):
    monkeypatch.setitem(EDM_MODEL_KWARGS, key, value)
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(edm_pickle_bytes(persistence))
    assert convert_edm.main([str(pkl), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: EDM DhariwalUNet kwarg {key}=") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()
