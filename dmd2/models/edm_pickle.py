r"""Read EDM's network pickles (``edm-imagenet-64x64-cond-adm.pkl``, ...) without running code from the file.

EDM (Karras et al. 2022) publishes networks as pickles of a dict ``{'ema': net, 'loss_fn': ..., 'augment_pipe': ...,
'dataset_kwargs': ...}``. Its modules are pickled by ``torch_utils.persistence``: each one reduces to
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = {'type': 'class', 'version': 6,
'module_src': <the whole Python source of the defining module>, 'class_name': ..., 'state': <the module __dict__>}``,
and the real reconstructor ``exec``-s ``module_src``. Tensors reduce to ``torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, requires_grad, hooks)`` (parameters through ``torch._utils._rebuild_parameter``), and each
storage to ``torch.storage._load_from_bytes(blob)`` - a ``torch.save`` blob that torch reads with
``torch.load(weights_only=False)``. A plain ``pickle.load`` therefore runs arbitrary code in three places: any global
the file names, the embedded module source, and the inner storage pickles.

:class:`SafeEDMUnpickler` admits only the globals listed in :data:`ALLOWED_GLOBALS`, each replaced by a stand-in:

* ``torch_utils.persistence._reconstruct_persistent_obj`` -> a :class:`PersistentObject` record of ``class_name`` and
  ``state``; ``module_src`` is never executed (only its SHA-256 is kept);
* ``torch.storage._load_from_bytes`` -> ``torch.load(io.BytesIO(blob), weights_only=True)``, which must yield a storage;
* tensor / parameter rebuilders -> bounds-checked ``Tensor.set_`` on that storage;
* ``torch.nn`` containers, ``dnnlib.util.EasyDict``, ``collections.OrderedDict``, ``set``/``frozenset``, numpy
  scalars and dtypes, ``_codecs.encode`` (protocol-2 bytes) -> inert records or plain values.

Any other global raises :class:`EDMPickleRefused` (a ``ValueError``) naming it, before anything is called. Stand-in
classes are created afresh for each load, so a hostile file cannot alter them for later loads.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = [
    "EDMPickleRefused",
    "PersistentObject",
    "TorchModuleRecord",
    "SafeEDMUnpickler",
    "ALLOWED_GLOBALS",
    "load_edm_pickle",
    "module_state_dict",
    "edm_network_state_dict",
    "convert_edm_pickle",
    "adm_config_from_edm_kwargs",
    "check_edm_kwargs",
    "EDM_KWARG_RANGES",
    "MAX_STORAGE_BYTES",
    "load_edm_adm",
    "check_state_dict_matches",
]


class EDMPickleRefused(ValueError):
    """The pickle was refused: it names a global outside the allow-list, or its content is not what EDM writes."""


@dataclass
class PersistentObject:
    """What ``torch_utils.persistence`` would have rebuilt, as data: the class name and the object's ``__dict__``.

    ``module_sha256`` identifies the embedded (never executed) module source.
    """

    class_name: str
    state: dict
    module_sha256: str = ""
    version: Any = None


class TorchModuleRecord:
    """A plain ``torch.nn`` container (``ModuleDict``, ...) as data: ``class_name`` and ``state`` (its ``__dict__``).

    Each load makes its own subclass per container name (so tampering with one cannot leak into later loads)."""

    class_name = "torch.nn.Module"
    source = "<stream>"

    def __init__(self):
        self.state = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise _refuse(self.source, f"state of {self.class_name} must be a dict, got {type(state).__name__}")
        self.state = dict(state)


_NUMERIC_DTYPES = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}

_PERSISTENCE_RECONSTRUCT = ("torch_utils.persistence", "_reconstruct_persistent_obj")
_TORCH_CONTAINERS = ("ModuleDict", "ModuleList", "Sequential", "ParameterDict", "ParameterList")

#: (module, name) pairs the unpickler accepts; every other global is refused.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [
        _PERSISTENCE_RECONSTRUCT,
        ("torch.storage", "_load_from_bytes"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("__builtin__", "set"),
        ("__builtin__", "frozenset"),
        ("_codecs", "encode"),
        ("dnnlib.util", "EasyDict"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    ]
    + [("torch.nn.modules.container", n) for n in _TORCH_CONTAINERS]
)


def _refuse(source: str, why: str) -> EDMPickleRefused:
    return EDMPickleRefused(f"refused to load EDM pickle {source}: {why}")


def _check_int_tuple(v: Any, what: str, source: str) -> tuple[int, ...]:
    if not isinstance(v, (tuple, list)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise _refuse(source, f"tensor {what} must be a tuple of ints, got {v!r}")
    return tuple(v)


#: default cap on the bytes of all tensor storages of one pickle (EDM's ImageNet-64 ADM holds 1.2 GB)
MAX_STORAGE_BYTES = 16 * 2**30


def _pickle_end(f: io.BytesIO) -> None:
    """Advance ``f`` past one pickle without running it (``pickletools.genops`` only decodes opcodes)."""
    import pickletools

    for op, _, _ in pickletools.genops(f):
        if op.name == "STOP":
            return


def _storage_bytes(blob: bytes, source: str) -> int:
    """The bytes a ``torch.save`` storage blob will allocate, checked against what the blob holds, before
    ``torch.load`` allocates anything.

    Zip format: every entry STORED (``torch.save`` never compresses; a DEFLATE entry can expand a thousandfold) with
    its declared size equal to its compressed size, all of them within the blob. Legacy format (what
    ``Storage.__reduce__`` writes): five pickles, then one storage record ``int64 numel`` + ``numel * itemsize``
    bytes, which must fill the rest of the blob exactly.
    """
    import zipfile

    f = io.BytesIO(blob)
    if zipfile.is_zipfile(f):
        with zipfile.ZipFile(f) as z:
            infos = z.infolist()
        for i in infos:
            if i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size:
                raise _refuse(source, f"a storage blob's zip entry {i.filename!r} is compressed (declares "
                                      f"{i.file_size} bytes from {i.compress_size}); torch.save writes stored entries")
        total = sum(i.file_size for i in infos)
        if total > len(blob):
            raise _refuse(source, f"a storage blob's zip entries declare {total} bytes but the blob has {len(blob)}")
        return total
    f.seek(0)
    try:
        for _ in range(5):  # magic number, protocol version, system info, the object, the storage keys
            _pickle_end(f)
    except Exception as e:
        raise _refuse(source, f"a storage blob is neither a zip nor a legacy torch.save stream ({e})") from None
    rest = len(blob) - f.tell()
    if rest == 0:
        return 0
    numel = int.from_bytes(f.read(8), "little") if rest >= 8 else -1
    data = rest - 8
    if numel < 0 or not any(numel * k == data for k in (1, 2, 4, 8)) or (numel == 0 and data != 0):
        raise _refuse(source, f"a storage blob declares {numel} elements but holds {max(data, 0)} data bytes")
    return data


def _make_standins(source: str, max_bytes: int = MAX_STORAGE_BYTES) -> dict[tuple[str, str], Any]:
    """Fresh stand-ins for one load (classes included, so attribute tampering cannot outlive it); the storages of
    one load may total at most ``max_bytes``."""
    used = [0]

    def reconstruct_persistent_obj(meta):
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise _refuse(source, f"persistence meta must be a dict with type 'class', got {type(meta).__name__}")
        name, state, src = meta.get("class_name"), meta.get("state"), meta.get("module_src", "")
        if not isinstance(name, str) or not isinstance(src, str):
            raise _refuse(source, "persistence meta needs string 'class_name' and 'module_src'")
        if state is None:
            state = {}
        if not isinstance(state, dict):
            raise _refuse(source, f"persistence state of {name} must be a dict, got {type(state).__name__}")
        # meta['module_src'] is deliberately NOT executed: the record is data only.
        return PersistentObject(name, dict(state), hashlib.sha256(src.encode("utf-8", "replace")).hexdigest(),
                                meta.get("version"))

    def load_from_bytes(blob):
        if not isinstance(blob, (bytes, bytearray)):
            raise _refuse(source, f"storage payload must be bytes, got {type(blob).__name__}")
        used[0] += _storage_bytes(bytes(blob), source)
        if used[0] > max_bytes:
            raise _refuse(source, f"its tensor storages exceed {max_bytes} bytes in total (max_bytes); "
                                  f"not a network this loader expects")
        try:
            storage = torch.load(io.BytesIO(bytes(blob)), weights_only=True, map_location="cpu")
        except Exception as e:  # weights_only refuses any non-tensor global inside the blob
            raise _refuse(source, f"a tensor storage blob was refused by torch.load(weights_only=True): {e}") from e
        if not isinstance(storage, torch.TypedStorage):
            raise _refuse(source, f"a storage blob decoded to {type(storage).__name__}, expected a torch storage")
        return storage

    def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                          metadata=None):
        if not isinstance(storage, torch.TypedStorage):
            raise _refuse(source, f"tensor storage must come from _load_from_bytes, got {type(storage).__name__}")
        size = _check_int_tuple(size, "size", source)
        stride = _check_int_tuple(stride, "stride", source)
        if not isinstance(storage_offset, int) or storage_offset < 0 or len(size) != len(stride):
            raise _refuse(source, f"bad tensor layout offset={storage_offset!r} size={size} stride={stride}")
        if backward_hooks or metadata:
            raise _refuse(source, "tensors with backward hooks or extra metadata are not expected in EDM pickles")
        if any(s < 0 for s in size) or any(s < 0 for s in stride):
            raise _refuse(source, f"negative tensor size/stride {size} {stride}")
        with warnings.catch_warnings():  # TypedStorage is what torch's own pickles hold; silence its deprecation
            warnings.simplefilter("ignore", UserWarning)
            numel, dtype = storage.size(), storage.dtype
            if math.prod(size) > 0:
                last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
                if last >= numel:
                    raise _refuse(source, f"tensor {size} at offset {storage_offset} exceeds its storage of {numel}")
            return torch.empty(0, dtype=dtype).set_(storage, storage_offset, size, stride)

    def rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
        if not isinstance(data, torch.Tensor):
            raise _refuse(source, f"parameter data must be a tensor, got {type(data).__name__}")
        if backward_hooks:
            raise _refuse(source, "parameters with backward hooks are not expected in EDM pickles")
        return data

    def codecs_encode(text, encoding="utf-8"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise _refuse(source, "_codecs.encode is only accepted for protocol-2 bytes (str, 'latin1')")
        return text.encode("latin1")

    class NumpyDType:
        """Inert record of ``numpy.dtype(*args)`` and its BUILD state."""

        def __init__(self, *args):
            self.args = args
            self.state = None

        def __setstate__(self, state):
            self.state = state

    def numpy_scalar(dtype, data=None):
        if not isinstance(dtype, NumpyDType) or not isinstance(data, (bytes, bytearray)):
            raise _refuse(source, "numpy scalar must be (dtype, bytes)")
        code = dtype.args[0] if dtype.args else None
        if code not in _NUMERIC_DTYPES:
            raise _refuse(source, f"numpy scalar of dtype {code!r} is not a plain number")
        order = dtype.state[1] if isinstance(dtype.state, tuple) and len(dtype.state) > 1 else "<"
        dt = np.dtype(code).newbyteorder(">" if order == ">" else "<")
        if len(data) != dt.itemsize:
            raise _refuse(source, f"numpy scalar of dtype {code} needs {dt.itemsize} bytes, got {len(data)}")
        return np.frombuffer(bytes(data), dtype=dt)[0].item()

    class EasyDict(dict):
        def __setstate__(self, state):
            if state:
                raise _refuse(source, "EasyDict with instance attributes is not expected")

    containers = {
        ("torch.nn.modules.container", n): type(
            n, (TorchModuleRecord,), {"class_name": f"torch.nn.modules.container.{n}", "source": source}
        )
        for n in _TORCH_CONTAINERS
    }
    standins: dict[tuple[str, str], Any] = {
        _PERSISTENCE_RECONSTRUCT: reconstruct_persistent_obj,
        ("torch.storage", "_load_from_bytes"): load_from_bytes,
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("__builtin__", "set"): set,
        ("__builtin__", "frozenset"): frozenset,
        ("_codecs", "encode"): codecs_encode,
        ("dnnlib.util", "EasyDict"): EasyDict,
        ("numpy", "dtype"): NumpyDType,
        ("numpy.core.multiarray", "scalar"): numpy_scalar,
        ("numpy._core.multiarray", "scalar"): numpy_scalar,
        **containers,
    }
    assert set(standins) == ALLOWED_GLOBALS
    return standins


class SafeEDMUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS` (to stand-ins) and refuses the rest."""

    def __init__(self, file: BinaryIO, source: str = "<stream>", max_bytes: int = MAX_STORAGE_BYTES):
        super().__init__(file)
        self.source = source
        self._standins = _make_standins(source, max_bytes)

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key not in self._standins:
            raise _refuse(
                self.source,
                f"it references the global '{module}.{name}', which is not among the allowed EDM globals "
                f"(an unpickler that resolved it could run code from the file)",
            )
        return self._standins[key]

    def persistent_load(self, pid: Any) -> Any:
        raise _refuse(self.source, "persistent ids are not used by EDM pickles")


def load_edm_pickle(path_or_file: str | os.PathLike | BinaryIO, max_bytes: int = MAX_STORAGE_BYTES) -> Any:
    """Unpickle an EDM ``.pkl`` safely; modules come back as :class:`PersistentObject` / :class:`TorchModuleRecord`.

    Each storage blob is bounds-checked before it is decoded (:func:`_storage_bytes`: nothing expands beyond the
    bytes it occupies), and all storages together may hold at most ``max_bytes``.
    Raises :class:`EDMPickleRefused` (a ``ValueError``) for any disallowed global or bound, and ``FileNotFoundError``
    for a missing path.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        path = os.fspath(path_or_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"EDM pickle not found: {path}")
        with open(path, "rb") as f:
            return SafeEDMUnpickler(f, source=repr(path), max_bytes=max_bytes).load()
    return SafeEDMUnpickler(path_or_file, max_bytes=max_bytes).load()


def _module_state(obj: Any, where: str) -> dict:
    if isinstance(obj, (PersistentObject, TorchModuleRecord)):
        state = getattr(obj, "state", None) or {}
    else:
        raise ValueError(f"{where}: expected a pickled torch module, got {type(obj).__name__}")
    if not isinstance(state.get("_parameters"), dict) or not isinstance(state.get("_modules"), dict):
        name = getattr(obj, "class_name", "?")
        raise ValueError(f"{where}: {name} has no _parameters/_modules; it is not a torch.nn.Module")
    return state


def _checked_tensor(t: Any, name: str, kind: str) -> torch.Tensor:
    """A plain CPU tensor lying inside its storage, detached (re-checked after unpickling: a pickle's BUILD opcode
    can re-target a tensor through ``Tensor.__setstate__``)."""
    if type(t) is not torch.Tensor or t.layout != torch.strided or t.device.type != "cpu":
        raise ValueError(f"{name}: {kind} is {type(t).__name__}, expected a plain CPU tensor")
    if t.numel():
        if min(t.stride()) < 0:
            raise ValueError(f"{name}: negative strides")
        extent = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
        if extent * t.element_size() > t.untyped_storage().nbytes():
            raise ValueError(f"{name}: {kind} extends beyond its storage")
    return t.detach()


def module_state_dict(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten a reconstructed module record like ``nn.Module.state_dict()``: parameters, then persistent buffers,
    then children (in their stored order), dotted names."""
    out: dict[str, torch.Tensor] = {}
    state = _module_state(obj, prefix.rstrip(".") or "<root>")
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for kind, items in (("parameter", state["_parameters"]), ("buffer", state.get("_buffers") or {})):
        for name, t in items.items():
            if t is None or (kind == "buffer" and name in non_persistent):
                continue
            out[prefix + name] = _checked_tensor(t, f"{prefix}{name}", kind)
    for name, child in state["_modules"].items():
        if child is not None:
            out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(type(v).__name__)


def _init_kwargs(obj: Any) -> dict | None:
    kw = obj.state.get("_init_kwargs") if isinstance(obj, PersistentObject) else None
    if not isinstance(kw, dict):
        return None
    try:
        return _jsonable(kw)
    except TypeError:
        return None


def edm_network_state_dict(path_or_file, key: str = "ema") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of network ``key`` of an EDM pickle, with EDM's names (``model.map_layer0.weight``).

    ``metadata`` (strings, for safetensors) records the class names, ``sigma_data`` and, when the pickle kept them, the
    constructor kwargs of the wrapper and of the inner ``model`` (JSON).
    """
    data = load_edm_pickle(path_or_file)
    if not isinstance(data, dict) or key not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"EDM pickle: expected a dict with key {key!r}, found {keys}")
    net = data[key]
    sd = module_state_dict(net)
    meta = {"format": "edm-pickle", "key": key, "class_name": getattr(net, "class_name", "")}
    sigma_data = net.state.get("sigma_data") if isinstance(net, PersistentObject) else None
    if isinstance(sigma_data, (int, float)):
        meta["sigma_data"] = repr(float(sigma_data))
    kw = _init_kwargs(net)
    if kw is not None:
        meta["init_kwargs"] = json.dumps(kw, sort_keys=True)
    inner = net.state["_modules"].get("model") if isinstance(net, PersistentObject) else None
    if isinstance(inner, PersistentObject):
        meta["model_class_name"] = inner.class_name
        kw = _init_kwargs(inner)
        if kw is not None:
            if inner.class_name == "DhariwalUNet":
                check_edm_kwargs(kw)
            meta["model_init_kwargs"] = json.dumps(kw, sort_keys=True)
    return sd, meta


def convert_edm_pickle(in_path, out_path, key: str = "ema") -> dict[str, str]:
    """Write network ``key`` of an EDM pickle to ``out_path`` (safetensors, EDM names); returns the metadata."""
    from safetensors.torch import save_file

    sd, meta = edm_network_state_dict(in_path, key)
    tensors = {}
    for name, t in sd.items():
        t = t.detach().contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger storage: store just its elements
        tensors[name] = t
    save_file(tensors, os.fspath(out_path), metadata=meta)
    return meta


#: inclusive bounds on the integer ``DhariwalUNet`` kwargs a pickle may record, checked before a network is built;
#: EDM's released ImageNet-64 ADM (``dmd2/models/manifests/edm_imagenet64_adm.json``: resolution 64, 1,000 labels,
#: 192 channels, mults (1, 2, 3, 4), 3 blocks) lies well inside. ``channel_mult`` / ``attn_resolutions``: at most
#: 8 entries, each mult in [1, 16].
EDM_KWARG_RANGES = {"img_resolution": (1, 1024), "in_channels": (1, 64), "out_channels": (1, 64),
                    "label_dim": (0, 100_000), "augment_dim": (0, 64), "model_channels": (1, 1024),
                    "channel_mult_emb": (1, 16), "num_blocks": (1, 16), "channels_per_head": (1, 1024)}


def check_edm_kwargs(model_kwargs: dict) -> None:
    """``ValueError`` naming the first constructor kwarg outside :data:`EDM_KWARG_RANGES` (a hostile or corrupt
    pickle could otherwise make the builder allocate without bound)."""
    for k, (lo, hi) in EDM_KWARG_RANGES.items():
        v = model_kwargs.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi):
            raise ValueError(f"EDM DhariwalUNet kwarg {k}={v!r} is outside [{lo}, {hi}]; refusing to build it")
    for k in ("channel_mult", "attn_resolutions"):
        v = model_kwargs.get(k)
        if v is None:
            continue
        if not isinstance(v, (list, tuple)) or len(v) > 8 or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise ValueError(f"EDM DhariwalUNet kwarg {k}={v!r}: expected at most 8 integers; refusing to build it")
        if k == "channel_mult" and not all(1 <= i <= 16 for i in v):
            raise ValueError(f"EDM DhariwalUNet kwarg channel_mult={v!r}: each entry must lie in [1, 16]")


def adm_config_from_edm_kwargs(model_kwargs: dict):
    """:class:`~dmd2.models.adm.ADMConfig` from EDM ``DhariwalUNet`` constructor kwargs (``in_channels`` /
    ``out_channels`` -> ``img_channels``; omitted ones take DhariwalUNet's defaults, which are ADMConfig's)."""
    from .adm import ADMConfig

    check_edm_kwargs(model_kwargs)
    kw = dict(model_kwargs)
    cin, cout = kw.pop("in_channels", None), kw.pop("out_channels", None)
    if cin is not None or cout is not None:
        if cin != cout:
            raise ValueError(f"ADM: in_channels ({cin}) != out_channels ({cout}) is not supported")
        kw["img_channels"] = cin
    return ADMConfig.from_dict(kw)


def load_edm_adm(path, config=None, sigma_data: float | None = None, key: str = "ema", device="cpu"):
    """``EDMPrecond(ADMNet)`` loaded from an EDM ``.pkl`` (read safely) or a converted ``.safetensors``.

    ``config`` / ``sigma_data`` default to what the file records (the pickle's ``DhariwalUNet`` kwargs); names and
    shapes must match exactly (``strict`` load), otherwise ValueError lists the differences.
    """
    from .adm import EDM_IMAGENET64_SIGMA_DATA, build_edm_adm

    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not os.path.isfile(path):
            raise FileNotFoundError(f"safetensors file not found: {path}")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(path)
    else:
        sd, meta = edm_network_state_dict(path, key)
    if config is None:
        if "model_init_kwargs" not in meta:
            raise ValueError(f"{path}: the file records no DhariwalUNet kwargs; pass config=ADMConfig(...)")
        if meta.get("model_class_name") not in (None, "DhariwalUNet"):
            raise ValueError(f"{path}: the network is {meta['model_class_name']}, not an ADM (DhariwalUNet)")
        config = adm_config_from_edm_kwargs(json.loads(meta["model_init_kwargs"]))
    if sigma_data is None:
        sigma_data = float(meta.get("sigma_data", EDM_IMAGENET64_SIGMA_DATA))
    net = build_edm_adm(config, sigma_data=sigma_data, device="meta")
    check_state_dict_matches(net, sd)
    net.load_state_dict(sd, strict=True, assign=True)
    return net.to(device)


def check_state_dict_matches(net: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """ValueError listing missing / unexpected / mis-shaped names of ``sd`` against ``net.state_dict()``."""
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    shapes = sorted(f"{k}: file {theirs[k]} vs net {ours[k]}" for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    if missing or unexpected or shapes:
        raise ValueError(
            f"state dict does not match the network: missing {missing[:10]} ({len(missing)}), unexpected "
            f"{unexpected[:10]} ({len(unexpected)}), shape mismatches {shapes[:10]} ({len(shapes)})"
        )
