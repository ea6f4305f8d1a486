"""The infer call of a conditioned (diffusers) model: inputs, ``cond_id`` and guidance.

On the wire (OIP v2, JSON or binary tensors):

- inputs ``x [B, C, H, W]`` (FP32, FP16 or BF16; ``v`` comes back in the same datatype),
  ``t [B]`` (FP32, our convention: ``t`` in [0, 1], 1 = noise), and the conditioning inputs named
  after the model's arguments (``encoder_hidden_states [B, L, E]``, ``pooled_projections [B, P]``;
  ``GET /v2/models/{name}`` lists them). A conditioning tensor has ``B`` rows (one per state) or
  ``1`` row (shared by every state of the request).
- request ``parameters``: ``cond_id`` (string): with conditioning tensors, the server keeps them
  under that id; without, it uses the ones it kept (unknown id: 422, resend the tensors with it).
  ``guidance_scale`` (number): classifier-free guidance with the server's unconditional
  embedding, ``v = v_u + s (v_c - v_u)``, computed in one forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from common.codec import CodecError, decode_request, wants_binary
from services.teacher.cond_cache import CondCache
from services.teacher.protocol import OUTPUT, InferRequest, ProtocolError, check_times
from services.teacher.tensors import FLOAT_DATATYPES, finite, wire_datatype

if TYPE_CHECKING:
    from services.teacher.backend import TensorSpec

#: longest accepted cond_id (ids are keys in server memory, not payloads)
MAX_COND_ID = 256


@dataclass(frozen=True)
class Conditioned:
    """A request's conditioning (``name -> [B or 1, ...]`` wire arrays) and guidance scale."""

    cond: dict[str, np.ndarray]
    guidance_scale: float | None

    def key(self, x: np.ndarray) -> tuple:
        """Requests with equal keys may share a forward: same state shape, same conditioning
        shapes per row, same guidance (model and adapter are grouped by the batcher)."""
        shapes = tuple(sorted((k, v.shape[1:]) for k, v in self.cond.items()))
        return (x.shape[1:], shapes, self.guidance_scale)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.cond.values())


def _signature(state: TensorSpec, conds: tuple[TensorSpec, ...]) -> str:
    parts = [f"x [B, {', '.join('*' if d < 0 else str(d) for d in state.shape)}]", "t [B]"]
    return ", ".join(parts + [s.describe() for s in conds])


def parse_conditioned(
    body: bytearray,
    header_length: str | None,
    state: TensorSpec,
    conds: tuple[TensorSpec, ...],
    check_state: Callable[[tuple[int, ...]], str | None],
    cache: CondCache | None,
) -> InferRequest:
    """Decode and validate a conditioned infer body (see the module docstring).

    ``check_state(per-state shape) -> message or None`` is the model's latent-shape rule.
    The request's :attr:`InferRequest.extra` is a :class:`Conditioned` with the conditioning
    resolved (sent, or taken from ``cache`` by ``cond_id``) and checked against ``conds``.
    """
    takes = _signature(state, conds)
    if not body:
        raise ProtocolError(400, "decode", f"empty body; this model takes {takes}")
    try:
        msg = decode_request(body, header_length)
    except CodecError as exc:
        raise ProtocolError(400, "decode", str(exc)) from None
    names = set(msg.tensors)
    cond_names = {s.name for s in conds}
    unknown = sorted(names - {"x", "t"} - cond_names)
    if unknown:
        raise ProtocolError(400, "input", f"unknown input(s) {unknown}; this model takes {takes}")
    for name in ("x", "t"):
        if name not in names:
            raise ProtocolError(400, "input", f"missing input {name!r}; this model takes {takes}")
    bad_out = sorted(set(msg.outputs) - {OUTPUT})
    if bad_out:
        raise ProtocolError(400, "input", f"unknown output(s) {bad_out}; this model returns 'v'")
    x, t = msg.tensors["x"], msg.tensors["t"]
    if wire_datatype(x) not in FLOAT_DATATYPES:
        raise ProtocolError(
            400, "input", f"input 'x' must be FP32, FP16 or BF16, got {wire_datatype(x)}"
        )
    problem = check_state(tuple(x.shape[1:])) if x.ndim >= 1 else "input 'x' needs a batch dim"
    if problem:
        raise ProtocolError(400, "input", problem)
    if wire_datatype(t) != "FP32":
        raise ProtocolError(400, "input", f"input 't' must be FP32, got {wire_datatype(t)}")
    t = check_times(x, t)
    if not finite(x) or not np.isfinite(t).all():
        raise ProtocolError(400, "input", "x or t holds NaN or Inf; send finite values")
    cond_id, scale = _parameters(msg.parameters)
    sent = {k: v for k, v in msg.tensors.items() if k in cond_names}
    cond = _resolve(sent, cond_id, cache, conds, takes)
    _check_cond(cond, conds, len(x), cond_id)
    extra = Conditioned(cond, scale)
    return InferRequest(x, t, wants_binary(msg, OUTPUT), msg.id, extra)


def _parameters(params: dict) -> tuple[str | None, float | None]:
    cond_id = params.get("cond_id")
    if cond_id is not None and (
        not isinstance(cond_id, str) or not cond_id or len(cond_id) > MAX_COND_ID
    ):
        raise ProtocolError(
            400, "input", f"parameter cond_id must be a string of 1-{MAX_COND_ID} characters"
        )
    scale = params.get("guidance_scale")
    if scale is not None:
        if (
            isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or not math.isfinite(scale)
        ):
            raise ProtocolError(
                400, "input", f"parameter guidance_scale must be a finite number, got {scale!r}"
            )
        scale = float(scale)
    return cond_id, scale


def _resolve(
    sent: dict[str, np.ndarray],
    cond_id: str | None,
    cache: CondCache | None,
    conds: tuple[TensorSpec, ...],
    takes: str,
) -> dict[str, np.ndarray]:
    """The request's conditioning: all of it sent (kept under ``cond_id`` if given), or none
    sent and taken from the cache by ``cond_id``."""
    if sent:
        missing = [s.describe() for s in conds if s.name not in sent]
        if missing:
            raise ProtocolError(
                400,
                "input",
                f"missing conditioning input(s) {', '.join(missing)}; send every conditioning "
                f"input (this model takes {takes}) or none of them with a cond_id",
            )
        for name, arr in sent.items():
            if wire_datatype(arr) not in FLOAT_DATATYPES and name != "guidance":
                raise ProtocolError(
                    400,
                    "input",
                    f"input {name!r} must be FP32, FP16 or BF16, got {wire_datatype(arr)}",
                )
        if cond_id is not None and cache is not None:
            return cache.put(cond_id, sent)
        return sent
    if not conds:
        return {}
    if cond_id is None:
        raise ProtocolError(
            400,
            "input",
            "missing conditioning: send "
            f"{', '.join(s.describe() for s in conds)} (with a cond_id parameter to have the "
            "server keep them), or a cond_id sent with them before",
        )
    cached = cache.get(cond_id) if cache is not None else None
    if cached is None:
        raise ProtocolError(
            422,
            "unknown_cond",
            f"unknown cond_id {cond_id!r}: resend the conditioning tensors with it",
        )
    return cached


def _check_cond(
    cond: dict[str, np.ndarray], conds: tuple[TensorSpec, ...], rows: int, cond_id: str | None
) -> None:
    where = f" (cond_id {cond_id!r})" if cond_id else ""
    for spec in conds:
        arr = cond[spec.name]
        if arr.ndim != len(spec.shape) + 1 or not spec.fits(tuple(arr.shape[1:])):
            raise ProtocolError(
                400,
                "input",
                f"input {spec.name!r}{where} must have shape {spec.describe()}, "
                f"got {list(arr.shape)}",
            )
        if len(arr) not in (rows, 1):
            raise ProtocolError(
                400,
                "input",
                f"input {spec.name!r}{where} has {len(arr)} rows; send {rows} (one per state) "
                "or 1 (shared by every state)",
            )
        if spec.name != "guidance" and not finite(arr):
            raise ProtocolError(400, "input", f"input {spec.name!r} holds NaN or Inf")
