"""Wire arrays (numpy, FP32 / FP16 / BF16 bit patterns) to torch tensors and back.

BF16 travels as tagged ``uint16`` bit patterns (:data:`common.codec.BF16`): reinterpreted, never
converted through FP32, on the way in and out.
"""

from __future__ import annotations

import numpy as np
import torch

from common.codec import BF16, CodecError, datatype_of, is_bf16

#: wire datatypes a state or conditioning tensor may use
FLOAT_DATATYPES = ("FP32", "FP16", "BF16")


def wire_datatype(arr: np.ndarray) -> str:
    """``FP32`` / ``FP16`` / ``BF16``, or the array's dtype name when it is none of them."""
    try:
        return datatype_of(arr)
    except CodecError:
        return str(arr.dtype)


def to_torch(arr: np.ndarray) -> torch.Tensor:
    """A CPU tensor over ``arr`` (no copy when it is writable; BF16 reinterpreted)."""
    if not arr.flags.writeable:
        arr = arr.copy()  # torch warns on read-only memory; JSON-decoded arrays are writable
    if is_bf16(arr):
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def to_wire(v: torch.Tensor, datatype: str) -> np.ndarray:
    """``v`` as a numpy array in wire ``datatype`` (``FP32``, ``FP16`` or ``BF16``)."""
    if datatype == "BF16":
        return v.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(BF16)
    dtype = torch.float16 if datatype == "FP16" else torch.float32
    return v.to(dtype).cpu().numpy()


def finite(arr: np.ndarray) -> bool:
    """Whether every value of a float wire array is finite."""
    if is_bf16(arr):
        # exponent bits all ones = Inf or NaN
        return not bool(((arr.view(np.uint16) & 0x7F80) == 0x7F80).any())
    return bool(np.isfinite(arr).all())
