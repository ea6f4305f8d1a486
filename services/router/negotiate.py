"""Capability negotiation with OIP v2 servers: which tensor encoding each replica gets.

The binary tensor extension is an *extension* of the Open Inference Protocol: a server declares
it in its server metadata (``GET /v2`` → ``"extensions": ["binary_tensor_data", ...]``), and a
server that does not (a standards-only one, ``"extensions": []``) reads only JSON documents.
Our callers (the router's pool, in-client routing, ``opd bench serve``, the trainer) ask once per
endpoint at registration or refresh and then send binary only where it is declared; JSON
otherwise, with each input in the datatype the model metadata declares for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import numpy as np

from common.codec import (
    DATATYPES,
    HEADER_LENGTH,
    CodecError,
    bf16_to_float32,
    datatype_of,
    decode_request,
    encode_request,
    float32_to_bf16,
    is_bf16,
)

BINARY_EXTENSION = "binary_tensor_data"
BINARY, JSON = "binary", "json"


async def server_extensions(client: httpx.AsyncClient, url: str, timeout: float) -> tuple[str, ...]:
    """The extensions ``url``'s server metadata (``GET /v2``) declares; ``()`` when it does not
    answer one (the spec makes the endpoint mandatory, so a server without it gets the base
    protocol: JSON).

    Raises:
        httpx.HTTPError: the server is unreachable (the caller's discovery reports it).
    """
    resp = await client.get(f"{url}/v2", timeout=timeout)
    if resp.status_code != 200:
        return ()
    try:
        doc = resp.json()
    except ValueError:
        return ()
    exts = doc.get("extensions") if isinstance(doc, dict) else None
    return tuple(str(e) for e in exts) if isinstance(exts, list) else ()


def speaks_binary(url: str, timeout: float) -> bool:
    """Whether the server at ``url`` declares the binary tensor extension (a synchronous
    ``GET /v2``, for callers outside an event loop); False when it does not answer one."""
    try:
        resp = httpx.get(f"{url}/v2", timeout=timeout)
        doc = resp.json() if resp.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return False
    exts = doc.get("extensions") if isinstance(doc, dict) else None
    return isinstance(exts, list) and BINARY_EXTENSION in exts


def encoding_of(extensions: tuple[str, ...] | None) -> str:
    """``binary`` for a server that declares the binary tensor extension, else ``json``."""
    return BINARY if extensions is not None and BINARY_EXTENSION in extensions else JSON


def as_declared(arr: np.ndarray, datatype: str | None) -> np.ndarray:
    """``arr`` in the v2 ``datatype`` a model declares for it (unchanged when it declares none,
    one the codec does not know, or the one ``arr`` already has). A standards-only server
    checks the datatype of a JSON tensor against its metadata; binary callers pass types through."""
    if datatype is None or datatype not in DATATYPES:
        return arr
    try:
        if datatype_of(arr) == datatype:
            return arr
    except CodecError:
        return arr
    values = bf16_to_float32(arr) if is_bf16(arr) else arr
    if datatype == "BF16":
        return float32_to_bf16(values.astype(np.float32))
    return values.astype(DATATYPES[datatype])


def encode_infer(
    inputs: dict[str, np.ndarray],
    outputs: list[str] | None,
    binary: bool,
    parameters: dict[str, Any] | None = None,
    declared: dict[str, str | None] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """An infer request for a server that speaks ``binary`` or only JSON; a JSON request takes
    each input in the datatype ``declared`` (name → datatype from the model metadata)."""
    if not binary and declared:
        inputs = {k: as_declared(a, declared.get(k)) for k, a in inputs.items()}
    return encode_request(inputs, outputs=outputs, binary=binary, parameters=parameters)


def passthrough_encoder(
    body: bytes, headers: dict[str, str], declared: dict[str, str | None]
) -> Callable[[Any], tuple[bytes, dict[str, str]]]:
    """For the router's passthrough infer (a client's own request to one teacher): the body as
    sent for a replica that reads binary, and for one that does not a binary-extension request
    re-encoded as JSON (same inputs in the declared datatypes, outputs, parameters and id; made
    once). The JSON-only server answers JSON, which every OIP client reads. A body that does not
    decode is sent as is: the server's own 400 says what is wrong with it."""
    made: list[tuple[bytes, dict[str, str]]] = []

    def encode(replica: Any) -> tuple[bytes, dict[str, str]]:
        if replica.binary or HEADER_LENGTH not in headers:
            return body, headers
        if not made:
            try:
                msg = decode_request(body, headers[HEADER_LENGTH])
            except CodecError:
                made.append((body, headers))
                return made[0]
            params = {k: v for k, v in msg.parameters.items() if k != "binary_data_output"}
            inputs = {k: as_declared(a, declared.get(k)) for k, a in msg.tensors.items()}
            made.append(
                encode_request(
                    inputs,
                    outputs=list(msg.outputs) or None,
                    binary=False,
                    parameters=params or None,
                    request_id=msg.id,
                )
            )
        return made[0]

    return encode
