"""Open Inference Protocol v2 (KServe v2 / Triton HTTP) tensors: JSON and the binary extension.

A binary-extension body is a JSON header followed by the raw tensor bytes, in the order the header
lists the tensors; the ``Inference-Header-Content-Length`` HTTP header gives the JSON's length and
each binary tensor carries ``parameters.binary_data_size``. Decoding never allocates from what a
header declares alone: every size is checked against the bytes actually received first, and
binary tensors are views of the body (no copy).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

#: BF16 on the wire: numpy has no bfloat16, so a BF16 tensor is carried as its raw 16-bit
#: patterns in a ``uint16`` array whose dtype is tagged (dtype metadata) so that it encodes back
#: as BF16; :func:`bf16_to_float32` / :func:`float32_to_bf16` convert (round to nearest even).
BF16 = np.dtype("<u2", metadata={"datatype": "BF16"})

DATATYPES: dict[str, np.dtype] = {
    "FP32": np.dtype("<f4"),
    "BF16": BF16,
    "FP64": np.dtype("<f8"),
    "FP16": np.dtype("<f2"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# BF16 is told apart by its dtype's metadata (a plain uint16 array has no v2 datatype here)
_NAMES = {dt: name for name, dt in DATATYPES.items() if name != "BF16"}
#: entries in each of the header caches (encoded request headers, decoded request layouts);
#: a cache that fills up is emptied: a client cycles through a few shapes, not hundreds
LAYOUT_CACHE_SIZE = 256


class CodecError(ValueError):
    """A malformed request or response; the message names the field and what to fix."""


@dataclass
class InferMessage:
    """A decoded infer request or response.

    ``tensors``: name → array (binary ones are read-only views of the body).
    ``outputs``: for requests, the requested outputs as name → wants binary (empty = all, default).
    """

    tensors: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    outputs: dict[str, bool] = field(default_factory=dict)
    binary_output: bool = False  # request-level parameters.binary_data_output


def is_bf16(arr: np.ndarray) -> bool:
    """Whether ``arr`` holds BF16 bit patterns (tagged ``uint16``, see :data:`BF16`)."""
    meta = arr.dtype.metadata
    return meta is not None and meta.get("datatype") == "BF16"


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """BF16 bit patterns (``uint16 [...]``) as ``float32 [...]`` (exact: BF16 is FP32's top half)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """``float32 [...]`` rounded to nearest even BF16, as tagged bit patterns (:data:`BF16`).

    NaN stays NaN (its quiet bit is kept); values past BF16's range round to Inf, as torch does.
    """
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16
    nan = np.isnan(values)
    out = np.where(nan, (u >> 16) | np.uint32(0x40), rounded).astype(np.uint16)
    return out.view(BF16)


def datatype_of(arr: np.ndarray) -> str:
    """The v2 datatype name of ``arr``'s dtype."""
    if is_bf16(arr):
        return "BF16"
    try:
        return _NAMES[arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype]
    except KeyError:
        raise CodecError(f"dtype {arr.dtype} has no v2 datatype") from None


def _raw(arr: np.ndarray) -> np.ndarray:
    """``arr``'s bytes in C order, ``uint8 [nbytes]`` (a view when ``arr`` is contiguous)."""
    return np.ascontiguousarray(arr).view(np.uint8).reshape(-1)


def _tensor_entries(tensors: dict[str, np.ndarray], binary: bool | set[str]) -> tuple[list, list]:
    entries, chunks = [], []
    for name, arr in tensors.items():
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(arr),
            "shape": list(arr.shape),
        }
        if binary is True or (isinstance(binary, set) and name in binary):
            buf = _raw(arr)
            entry["parameters"] = {"binary_data_size": int(buf.nbytes)}
            chunks.append(buf)
        else:
            flat = bf16_to_float32(arr) if is_bf16(arr) else arr
            entry["data"] = flat.reshape(-1).tolist()
        entries.append(entry)
    return entries, chunks


def _parts(doc: dict[str, Any], chunks: list) -> tuple[list, dict[str, str]]:
    """The body as ``[JSON header, tensor bytes...]`` (views, no copy) and its HTTP headers."""
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return [header], {"Content-Type": JSON_CONTENT_TYPE}
    return _binary_parts(header, chunks)


def _binary_parts(header: bytes, chunks: list) -> tuple[list, dict[str, str]]:
    parts = [header, *(memoryview(c) for c in chunks)]
    return parts, {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(header))}


def _joined(parts: list) -> bytes:
    return parts[0] if len(parts) == 1 else b"".join(parts)


#: (inputs' names, dtypes and shapes, outputs) → the JSON header of a binary request
_REQUEST_HEADERS: dict[tuple, bytes] = {}


def encode_request(
    inputs: dict[str, np.ndarray],
    outputs: list[str] | None = None,
    binary: bool = True,
    parameters: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Body and HTTP headers of an infer request; binary outputs are asked for when ``binary``.

    A binary request without parameters or id reuses the JSON header of the last request with
    the same names, dtypes, shapes and outputs (a caller sends a few shapes over and over).
    """
    key = None
    if binary and parameters is None and request_id is None:
        key = (
            tuple((k, a.dtype.str, is_bf16(a), a.shape) for k, a in inputs.items()),
            None if outputs is None else tuple(outputs),
        )
        header = _REQUEST_HEADERS.get(key)
        if header is not None:
            parts, headers = _binary_parts(header, [_raw(a) for a in inputs.values()])
            return _joined(parts), headers
    entries, chunks = _tensor_entries(inputs, binary)
    doc: dict[str, Any] = {"inputs": entries}
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    if outputs is not None:
        # a JSON request names its outputs only: a server without the binary extension must
        # not meet its parameters (JSON outputs are the protocol's default)
        doc["outputs"] = [
            {"name": n, "parameters": {"binary_data": True}} if binary else {"name": n}
            for n in outputs
        ]
    elif binary:
        doc.setdefault("parameters", {})["binary_data_output"] = True
    parts, headers = _parts(doc, chunks)
    if key is not None and chunks:
        if len(_REQUEST_HEADERS) >= LAYOUT_CACHE_SIZE:
            _REQUEST_HEADERS.clear()
        _REQUEST_HEADERS[key] = parts[0]
    return _joined(parts), headers


def response_parts(
    outputs: dict[str, np.ndarray],
    model_name: str,
    model_version: str,
    binary: bool | set[str] = False,
    request_id: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> tuple[list, dict[str, str]]:
    """An infer response as body parts (JSON header, then each binary tensor as a view of its
    array) and HTTP headers: a server can write them one after the other instead of joining
    them, which saves a copy of every binary output."""
    entries, chunks = _tensor_entries(outputs, binary)
    doc: dict[str, Any] = {
        "model_name": model_name,
        "model_version": model_version,
        "outputs": entries,
    }
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    return _parts(doc, chunks)


def encode_response(*args: Any, **kwargs: Any) -> tuple[bytes, dict[str, str]]:
    """Body and HTTP headers of an infer response: :func:`response_parts` (same arguments),
    joined into one ``bytes``."""
    parts, headers = response_parts(*args, **kwargs)
    return _joined(parts), headers


def _header_length(value: str | None, body_len: int) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise CodecError(f"{HEADER_LENGTH} must be an integer, got {value!r}") from None
    if not 0 < n <= body_len:
        raise CodecError(f"{HEADER_LENGTH} is {n} but the body has {body_len} bytes")
    return n


def _shape(entry: dict[str, Any], name: str) -> tuple[int, ...]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CodecError(
            f"tensor {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}"
        )
    return tuple(shape)


#: a header's tensors as (name, dtype, shape, element count, byte offset in the body)
_Slots = tuple[tuple[str, np.dtype, tuple[int, ...], int, int], ...]


@dataclass(frozen=True)
class _Layout:
    """What :func:`decode` derives from one binary-only request header: everything but the
    tensors' bytes. A client sends the same header for every request of one shape (same
    names, shapes and outputs), so a hit skips the JSON parse and the checks."""

    slots: _Slots
    end: int  # the body length this header fits: header + every tensor's bytes
    parameters: dict[str, Any]  # scalar values only, so a shallow copy is a full one
    model_name: str | None
    model_version: str | None
    outputs: dict[str, bool]
    binary_output: bool

    def message(self, body: bytes) -> InferMessage:
        tensors = {
            name: np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape)
            for name, dtype, shape, count, offset in self.slots
        }
        return InferMessage(
            tensors,
            dict(self.parameters),
            None,  # a header with a request id is never cached
            self.model_name,
            self.model_version,
            dict(self.outputs),
            self.binary_output,
        )


#: request headers seen lately → their layout; bounded: emptied when full
_LAYOUTS: dict[bytes, _Layout] = {}


def decode(body: bytes, header_length: str | None, kind: str = "inputs") -> InferMessage:
    """Decode an infer request (``kind="inputs"``) or response (``kind="outputs"``) body.

    A request whose header arrived before (byte for byte) with only binary tensors is decoded
    from that header's cached layout: the same checks' outcome, without parsing it again.
    Responses are not cached: their parameters (timings) differ every time.

    Raises:
        CodecError: malformed JSON, missing fields, unknown datatype, or sizes that do not match
            the bytes received.
    """
    n = _header_length(header_length, len(body))
    head = body if n is None else bytes(body[:n])
    if n is not None and kind == "inputs":
        layout = _LAYOUTS.get(head)
        if layout is not None and layout.end == len(body):
            return layout.message(body)
    try:
        doc = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"body is not valid JSON ({exc}); send an OIP v2 infer document") from None
    if not isinstance(doc, dict):
        raise CodecError("the infer document must be a JSON object")
    entries = doc.get(kind)
    if not isinstance(entries, list):
        raise CodecError(f"the infer document needs an '{kind}' list")
    if kind == "inputs":  # requests are held to the schema; answers are read leniently
        _check_schema_types(doc, kind)
    offset = 0 if n is None else n
    tensors: dict[str, np.ndarray] = {}
    slots: list[tuple[str, np.dtype, tuple[int, ...], int, int]] = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise CodecError(f"every entry of '{kind}' needs a string 'name'")
        name = entry["name"]
        if name in tensors:
            raise CodecError(f"tensor {name!r} appears twice")
        dtype = DATATYPES.get(entry.get("datatype"))
        if dtype is None:
            raise CodecError(
                f"tensor {name!r}: unknown datatype {entry.get('datatype')!r}; "
                f"use one of {', '.join(DATATYPES)}"
            )
        shape = _shape(entry, name)
        count = math.prod(shape)
        params = entry.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if n is None:
                raise CodecError(
                    f"tensor {name!r} has binary_data_size but the request has no "
                    f"{HEADER_LENGTH} header"
                )
            if not isinstance(size, int) or size < 0 or size != count * dtype.itemsize:
                raise CodecError(
                    f"tensor {name!r}: binary_data_size {size!r} does not match shape "
                    f"{list(shape)} of {entry['datatype']} ({count * dtype.itemsize} bytes)"
                )
            if offset + size > len(body):
                raise CodecError(
                    f"tensor {name!r}: needs {size} bytes at offset {offset}, "
                    f"but the body has only {len(body) - offset} left"
                )
            tensors[name] = np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(
                shape
            )
            slots.append((name, dtype, shape, count, offset))
            offset += size
        else:
            data = entry.get("data")
            if data is None:
                raise CodecError(f"tensor {name!r} has neither 'data' nor binary_data_size")
            arr = _json_array(data, dtype, name)
            if arr.size != count:
                raise CodecError(
                    f"tensor {name!r}: {arr.size} values for shape {list(shape)} ({count} expected)"
                )
            tensors[name] = arr.reshape(shape)
    if n is not None and offset != len(body):
        raise CodecError(f"body has {len(body) - offset} bytes after the last binary tensor")
    outputs, binary_output = {}, False
    params = doc.get("parameters") or {}
    if isinstance(params, dict):
        binary_output = bool(params.get("binary_data_output", False))
    for out in doc.get("outputs") or [] if kind == "inputs" else []:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise CodecError("every entry of 'outputs' needs a string 'name'")
        p = out.get("parameters") or {}
        outputs[out["name"]] = (
            bool(p.get("binary_data", binary_output)) if isinstance(p, dict) else binary_output
        )
    msg = InferMessage(
        tensors=tensors,
        parameters=params if isinstance(params, dict) else {},
        id=doc.get("id"),
        model_name=doc.get("model_name"),
        model_version=doc.get("model_version"),
        outputs=outputs,
        binary_output=binary_output,
    )
    if n is not None and kind == "inputs" and len(slots) == len(tensors):
        _remember(head, msg, tuple(slots), offset)
    return msg


def _check_schema_types(doc: dict[str, Any], kind: str) -> None:
    """Refuse what the OIP REST schema forbids and a lenient read would let through: an ``id``
    that is not a string (it is echoed in the response, where the schema wants a string),
    ``parameters`` that are not an object (here or on a tensor or requested output), an
    ``outputs`` that is not a list of objects."""
    if "id" in doc and not isinstance(doc["id"], str):
        raise CodecError(f"'id' must be a string, got {doc['id']!r}")
    if "parameters" in doc and not isinstance(doc["parameters"], dict):
        raise CodecError("'parameters' must be a JSON object")
    lists = [kind] + (["outputs"] if kind == "inputs" and "outputs" in doc else [])
    for key in lists:
        if not isinstance(doc[key], list):
            raise CodecError(f"'{key}' must be a list")
        for entry in doc[key]:
            if isinstance(entry, dict) and not isinstance(entry.get("parameters", {}), dict):
                raise CodecError(f"'parameters' of {entry.get('name')!r} must be a JSON object")


def _remember(head: bytes, msg: InferMessage, slots: _Slots, end: int) -> None:
    """Cache a decoded binary-only request header's layout, unless it carries a request id or a
    parameter that is a container (a shallow copy per hit would share it between requests)."""
    scalars = (str, int, float, bool, type(None))
    if not all(isinstance(v, scalars) for v in msg.parameters.values()):
        return
    if msg.id is not None:  # ids differ per request: such headers never repeat
        return
    if len(_LAYOUTS) >= LAYOUT_CACHE_SIZE:
        _LAYOUTS.clear()  # bounded; steady clients refill it with their few shapes at once
    _LAYOUTS[head] = _Layout(
        slots,
        end,
        dict(msg.parameters),
        msg.model_name,
        msg.model_version,
        dict(msg.outputs),
        msg.binary_output,
    )


def _json_array(data: Any, dtype: np.dtype, name: str) -> np.ndarray:
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise CodecError(f"tensor {name!r}: 'data' is not a regular array") from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise CodecError(f"tensor {name!r}: 'data' must hold numbers")
    if dtype is BF16:  # JSON BF16 values are numbers: round them to BF16 bit patterns
        return float32_to_bf16(arr.astype(np.float32).reshape(-1))
    if dtype.kind in "iu" and arr.dtype.kind == "f":
        raise CodecError(f"tensor {name!r}: integer datatype but 'data' holds floats")
    return arr.astype(dtype, copy=False).reshape(-1)


def decode_request(body: bytes, header_length: str | None) -> InferMessage:
    """Decode an infer request body (see :func:`decode`)."""
    return decode(body, header_length, "inputs")


def decode_response(body: bytes, header_length: str | None) -> InferMessage:
    """Decode an infer response body (see :func:`decode`)."""
    return decode(body, header_length, "outputs")


def wants_binary(msg: InferMessage, name: str) -> bool:
    """Whether a request asked for output ``name`` in binary."""
    return msg.outputs.get(name, msg.binary_output)
