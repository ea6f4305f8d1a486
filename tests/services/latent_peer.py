"""A minimal OIP v2 teacher of latent states, for the router tests: ``python -m
tests.services.latent_peer --name a --scale 2``.

It follows the contract a diffusers teacher serves (model metadata lists ``x [-1, C, H, W]``,
``t [-1]`` and ``encoder_hidden_states [-1, L, E]``; ``parameters`` say ``backend`` and
``time_convention``; request parameters ``cond_id`` and ``guidance_scale``; an unknown
``cond_id`` is a 4xx that says to resend) but answers a deterministic function of its inputs,
so a test can check every merged row exactly::

    v[i] = x[i] * scale + mean(encoder_hidden_states[i]) + t[i] + guidance_scale

computed in float32 and sent back in x's datatype (FP16 in, FP16 out). Conditioning sent with a
``cond_id`` is kept under that id (the rows this server was sent); a later request may send the
id alone. ``--name a,b --scale 2,3`` serves two models from one process sharing one
conditioning cache, as LoRA specialists on one diffusers base do.
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common.codec import (
    HEADER_LENGTH,
    CodecError,
    bf16_to_float32,
    datatype_of,
    decode_request,
    float32_to_bf16,
    is_bf16,
    response_parts,
    wants_binary,
)
from common.procs import announce_url
from common.serving import GracefulServer, bind_socket, run_async, url_of

COND = "encoder_hidden_states"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def velocity(
    x: np.ndarray, t: np.ndarray, cond: np.ndarray, scale: float, guidance: float
) -> np.ndarray:
    """``v [B, *S]`` for ``x [B, *S]``, ``t [B]``, ``cond [B or 1, L, E]``: float32 math, the
    answer in x's type (FP32, FP16, or BF16 rounded to nearest even)."""
    b = len(x)
    per_row = cond.astype(np.float32).reshape(len(cond), -1).mean(axis=1)
    per_row = np.broadcast_to(per_row, (b,))
    extra = (per_row + t.astype(np.float32) + np.float32(guidance)).reshape(b, *[1] * (x.ndim - 1))
    xf = bf16_to_float32(x) if is_bf16(x) else x.astype(np.float32)
    v = xf * np.float32(scale) + extra
    return float32_to_bf16(v) if is_bf16(x) else v.astype(x.dtype)


def build(args: argparse.Namespace) -> Starlette:
    shape = tuple(int(d) for d in args.shape.split(","))
    cond_shape = tuple(int(d) for d in args.cond.split(","))
    scales = dict(zip(args.name.split(","), map(float, args.scale.split(",")), strict=True))
    # cond_id -> the conditioning rows it was sent with, shared by every model served here
    cache: dict[str, np.ndarray] = {}

    def parameters(name: str) -> dict[str, str]:
        params = {"version": "1", "digest": f"latent-{name}-{scales[name]}", "backend": "diffusers"}
        if args.time_convention != "none":
            params["time_convention"] = args.time_convention
        return params

    async def ok(_: Request) -> JSONResponse:
        return JSONResponse({"ready": True, "live": True})

    async def server(_: Request) -> JSONResponse:
        # it reads the binary extension (common.codec): declared, so the router sends binary
        # and FP16 / BF16 states pass through unconverted
        return JSONResponse(
            {"name": "latent-peer", "version": "0", "extensions": ["binary_tensor_data"]}
        )

    async def index(_: Request) -> JSONResponse:
        return JSONResponse([{"name": n, "version": "1", "state": "READY"} for n in scales])

    async def metadata(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        if name not in scales:
            return _error(404, f"unknown model {name!r}")
        return JSONResponse(
            {
                "name": name,
                "versions": ["1"],
                "platform": "latent-peer",
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [-1, *shape]},
                    {"name": "t", "datatype": "FP32", "shape": [-1]},
                    {"name": COND, "datatype": "FP32", "shape": [-1, *cond_shape]},
                ],
                "outputs": [{"name": "v", "datatype": "FP32", "shape": [-1, *shape]}],
                "parameters": parameters(name),
            }
        )

    async def infer(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in scales:
            return _error(404, f"unknown model {name!r}")
        try:
            msg = decode_request(await request.body(), request.headers.get(HEADER_LENGTH))
        except CodecError as exc:
            return _error(400, str(exc))
        unknown = sorted(set(msg.tensors) - {"x", "t", COND})
        if unknown:
            return _error(400, f"unknown input(s) {unknown}")
        x, t = msg.tensors.get("x"), msg.tensors.get("t")
        if x is None or t is None or x.shape[1:] != shape or t.shape != (len(x),):
            return _error(400, f"x must be [B, {shape}] and t [B]")
        cond_id = msg.parameters.get("cond_id")
        cond = msg.tensors.get(COND)
        if cond is None:
            if cond_id is None:
                return _error(400, f"missing input {COND!r} (or a cond_id parameter)")
            if cond_id not in cache:
                return _error(
                    404, f"unknown cond_id {cond_id!r}: resend the conditioning tensors with it"
                )
            cond = cache[cond_id]
        elif cond_id is not None:
            cache[str(cond_id)] = np.array(cond)
        if cond.shape[1:] != cond_shape or len(cond) not in (1, len(x)):
            return _error(400, f"{COND} must be [B or 1, {cond_shape}], got {list(cond.shape)}")
        guidance = float(msg.parameters.get("guidance_scale", 0.0))
        v = velocity(x, t, cond, scales[name], guidance)
        parts, headers = response_parts(
            {"v": v},
            name,
            "1",
            binary=wants_binary(msg, "v"),
            request_id=msg.id,
            parameters={
                "version": "1",
                "digest": parameters(name)["digest"],
                "x_datatype": datatype_of(x),
            },
        )
        return Response(b"".join(bytes(p) for p in parts), headers=headers)

    return Starlette(
        routes=[
            Route("/v2/health/live", ok),
            Route("/v2/health/ready", ok),
            Route("/v2", server),
            Route("/v2/repository/index", index, methods=["POST"]),
            Route("/v2/models/{name}", metadata),
            Route("/v2/models/{name}/ready", ok),
            Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        ]
    )


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True, help="model name(s), comma-separated")
    p.add_argument("--scale", default="1", help="each model's scale, comma-separated")
    p.add_argument("--shape", default="2,4,4", help="S of x [B, *S], comma-separated")
    p.add_argument("--cond", default="2,4", help="L,E of encoder_hidden_states [B, L, E]")
    p.add_argument("--time-convention", default="flow-t", help="'none': do not declare one")
    args = p.parse_args()
    sock = bind_socket("127.0.0.1", 0)
    server = GracefulServer(uvicorn.Config(build(args), log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    announce_url(url_of(sock))
    await task


if __name__ == "__main__":
    run_async(main())
