"""What each kernel backend declares, as data: the ops it implements, where, for which dtypes, with which gradients.

The dispatch (:func:`dmd2.kernels.resolve`) reads these tables: a backend may register only the ops it declares,
``impl="auto"`` picks from :data:`AUTO_ORDER` among the backends that declare the op for the tensors' device, and
``tests/kernels/test_contracts.py`` checks every registered implementation against its declaration.

Acceptance rules shared by every backend and op (checked by :mod:`dmd2.kernels.reference`'s ``check_*`` functions,
which the Triton backend calls, and again by the extension's C++ binding):

* data tensors (``x``, ``x0``, ``pred``, the predictions) are ``(B, ...)`` with ``B >= 1`` and no zero-sized
  dimension, of dtype float32, bfloat16 or float16; float64 and integer tensors are refused with ``ValueError``
  (every backend computes in float32, so a float64 input would silently lose precision);
* per-sample coefficients (``alpha``, ``sigma``, ``weight``) are ``(B,)`` tensors of any floating dtype;
* outputs take the dtype of the first data tensor (``philox_normal``: float32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DTYPES", "Contract", "OPS", "CONTRACTS", "LACKS", "AUTO_ORDER", "contract"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Contract:
    """One backend's declaration for one op.

    devices: device types it has kernels for (whether it can run in this process is ``availability``'s answer:
        Triton on CPU needs ``TRITON_INTERPRET=1``, the extension needs a build).
    dtypes: dtypes of the data tensors it accepts; any other is refused with ``ValueError``.
    grads: the tensor arguments that receive a gradient through the op's differentiable output (``()``: none).
    """

    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    grads: tuple[str, ...]

    @property
    def differentiable(self) -> bool:
        return bool(self.grads)


# op -> the tensor arguments that receive a gradient (the same in every backend that implements the op):
# noise_add's x_t in x0 / alpha / sigma; fused_dm's and dm_loss's surrogate loss in x only (the predictions are
# targets); denoise_loss's per-sample loss in pred only; dm_grad's g in all three inputs.
_GRADS = {
    "philox_normal": (),
    "noise_add": ("x0", "alpha", "sigma"),
    "fused_dm": ("x",),
    "denoise_loss": ("pred",),
    "dm_grad": ("x", "real_x0", "fake_x0"),
    "dm_loss": ("x",),
}
OPS = tuple(_GRADS)
_EVERYWHERE = ("cpu", "cuda")


def _declare(ops) -> dict[str, Contract]:
    return {
        op: Contract(_EVERYWHERE, (torch.float32,) if op == "philox_normal" else DTYPES, _GRADS[op]) for op in ops
    }


# impl -> op -> Contract
CONTRACTS: dict[str, dict[str, Contract]] = {
    "torch": _declare(OPS),
    "triton": _declare(OPS),
    "ext": _declare(("noise_add", "dm_grad", "dm_loss")),
}

# impl -> op -> why the backend does not implement it (every op a backend lacks is named here)
_NOT_IN_CSRC = "not written in csrc; the Triton kernels and the reference implement it"
LACKS: dict[str, dict[str, str]] = {
    "torch": {},
    "triton": {},
    "ext": {"philox_normal": _NOT_IN_CSRC, "fused_dm": _NOT_IN_CSRC, "denoise_loss": _NOT_IN_CSRC},
}

# impl="auto": the first of these that declares the op for the device and can run, else the reference ("torch").
# On CUDA Triton before the extension (tried only when Triton cannot run; its build policy is cuda.auto_status);
# on CPU the reference alone (Triton there is an interpreter, and the extension would compile on first use).
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "ext"), "cpu": ()}


def contract(op: str, impl: str) -> Contract | None:
    """``impl``'s declaration for ``op``, or ``None`` where it lacks the op (:data:`LACKS` says why)."""
    return CONTRACTS.get(impl, {}).get(op)

