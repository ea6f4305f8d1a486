"""Capability negotiation with OIP v2 servers: which tensor encoding each replica gets.

The binary tensor extension is an *extension* of the Open Inference Protocol: a server declares
it in its server metadata (``GET /v2`` → ``"extensions": ["binary_tensor_data", ...]``), and a
server that does not (a standards-only one, ``"extensions": []``) reads only JSON documents.
Our callers (the router's pool, in-client routing, ``opd bench serve``, the trainer) ask once per
endpoint at registration or refresh and then send binary only where it is declared; JSON
otherwise, with each input in the datatype the model metadata declares for it.
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np

from common.codec import (
    DATATYPES,
    CodecError,
    bf16_to_float32,
    datatype_of,
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
