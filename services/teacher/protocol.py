"""The infer call on the wire: bounded body reading, input validation, response encoding.

Shared by the uvicorn app and the Ray Serve deployment. Every refusal is a :class:`ProtocolError`
carrying the HTTP status, a metrics ``kind`` and a message that says what to fix.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request

from common.codec import HEADER_LENGTH, CodecError, decode_request, response_parts, wants_binary
from services.teacher.batcher import ForwardResult

INPUTS = ("x", "t")
OPTIONAL_INPUTS = ("c",)  # conditioning: accepted (rows checked) and ignored by the toy teachers
OUTPUT = "v"


class ProtocolError(Exception):
    """A request refused with ``status``; ``kind`` labels the error counter."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


@dataclass
class InferRequest:
    """A validated infer request: ``x [B, *S]`` and ``t [B]`` float32, finite.

    ``extra``: what a conditioned model needs besides (``conditioned.Conditioned``); ``None``
    for the toy models.
    """

    x: np.ndarray
    t: np.ndarray
    binary_output: bool
    id: str | None
    extra: Any = None

    @property
    def protocol(self) -> str:
        return "binary" if self.binary_output else "json"


def check_declared_length(declared: str | None, limit: int) -> None:
    """Refuse a ``Content-Length`` header that is not an integer (400) or over ``limit`` (413)."""
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise ProtocolError(
            400, "decode", f"Content-Length {declared!r} is not an integer"
        ) from None
    if size > limit:
        raise ProtocolError(
            413,
            "too_large",
            f"body of {size} bytes exceeds the limit of "
            f"{limit} bytes; send fewer states per request or raise --max-body-mb",
        )


async def collect_body(chunks: AsyncIterator[bytes], limit: int) -> bytearray:
    """Join ``chunks`` into one ``bytearray``, refusing (413) once more than ``limit`` arrived.

    The running total bounds chunked uploads (no ``Content-Length``). A ``bytearray`` so binary
    tensors decode into *writable* numpy views that torch can wrap without a copy (a ``bytes``
    body would give read-only arrays).
    """
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise ProtocolError(
                413,
                "too_large",
                f"body exceeds the limit of {limit} bytes; send "
                "fewer states per request or raise --max-body-mb",
            )
        parts.append(chunk)
    return bytearray(parts[0]) if len(parts) == 1 else bytearray().join(parts)


async def read_body(request: Request, limit: int) -> bytearray:
    """The body of a Starlette ``request``, refusing (413) more than ``limit`` bytes before
    (``Content-Length``) and while reading (see :func:`collect_body`)."""
    check_declared_length(request.headers.get("content-length"), limit)
    return await collect_body(request.stream(), limit)


def check_times(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``t [B]`` (or ``[B, 1]``) for states ``x [B, ...]``, flattened to ``[B]``; a 400 naming
    the mismatch otherwise (and for an empty batch)."""
    if not (t.ndim == 1 or (t.ndim == 2 and t.shape[1] == 1)):
        raise ProtocolError(
            400, "input", f"input 't' must have shape [B] (or [B, 1]), got {list(t.shape)}"
        )
    t = t.reshape(-1)
    if len(t) != len(x):
        raise ProtocolError(
            400, "input", f"x has {len(x)} rows but t has {len(t)}; send one time per state"
        )
    if len(x) == 0:
        raise ProtocolError(400, "input", "empty batch: x has 0 rows")
    return t


def parse_infer(body: bytearray, header_length: str | None, data_dim: int) -> InferRequest:
    """Decode and validate an infer body for a model with state dimension ``data_dim``."""
    if not body:
        raise ProtocolError(
            400,
            "decode",
            "empty body; send an OIP v2 infer document with inputs x [B, D] and t [B] (FP32)",
        )
    try:
        msg = decode_request(body, header_length)
    except CodecError as exc:
        raise ProtocolError(400, "decode", str(exc)) from None
    names = set(msg.tensors)
    unknown = sorted(names - set(INPUTS) - set(OPTIONAL_INPUTS))
    if unknown:
        raise ProtocolError(
            400,
            "input",
            f"unknown input(s) {unknown}; this model takes "
            f"x [B, {data_dim}] and t [B] (FP32), optionally c [B, ...]",
        )
    for name in INPUTS:
        if name not in names:
            raise ProtocolError(
                400,
                "input",
                f"missing input {name!r}; this model takes x [B, {data_dim}] and t [B] (FP32)",
            )
    bad_out = sorted(set(msg.outputs) - {OUTPUT})
    if bad_out:
        raise ProtocolError(400, "input", f"unknown output(s) {bad_out}; this model returns 'v'")
    x, t = msg.tensors["x"], msg.tensors["t"]
    for name, arr in (("x", x), ("t", t)):
        if arr.dtype != np.float32:
            raise ProtocolError(
                400,
                "input",
                f"input {name!r} must be FP32, got {_datatype(arr)}; convert it before sending",
            )
    if x.ndim != 2 or x.shape[1] != data_dim:
        raise ProtocolError(
            400, "input", f"input 'x' must have shape [B, {data_dim}], got {list(x.shape)}"
        )
    t = check_times(x, t)
    c = msg.tensors.get("c")
    if c is not None and (c.ndim == 0 or len(c) != len(x)):
        raise ProtocolError(
            400, "input", f"input 'c' must have {len(x)} rows, got shape {list(c.shape)}"
        )
    if not np.isfinite(x).all() or not np.isfinite(t).all():
        raise ProtocolError(400, "input", "x or t holds NaN or Inf; send finite values")
    return InferRequest(x, t, wants_binary(msg, OUTPUT), msg.id)


def _datatype(arr: np.ndarray) -> str:
    from common.codec import datatype_of

    try:
        return datatype_of(arr)
    except CodecError:
        return str(arr.dtype)


def timing_parameters(res: ForwardResult) -> dict[str, float | int | str]:
    """Response ``parameters``: server-side queue and compute time (ms), batch it ran in."""
    return {
        "queue_ms": round(res.queue_s * 1e3, 4),
        "compute_ms": round(res.compute_s * 1e3, 4),
        "batch_size": res.batch_states,
        "batch_requests": res.batch_requests,
        "version": str(res.version),
        "digest": res.digest,
    }


def encode_infer(
    req: InferRequest, res: ForwardResult, model_name: str
) -> tuple[list, dict[str, str]]:
    """Body parts and headers answering ``req`` with ``res`` (binary ``v`` when the request
    asked): the JSON header, then ``v``'s bytes as a view of the forward's output."""
    return response_parts(
        {OUTPUT: res.v},
        model_name,
        str(res.version),
        binary=req.binary_output,
        request_id=req.id,
        parameters=timing_parameters(res),
    )


__all__ = [
    "HEADER_LENGTH",
    "InferRequest",
    "ProtocolError",
    "check_declared_length",
    "collect_body",
    "encode_infer",
    "parse_infer",
    "read_body",
]
