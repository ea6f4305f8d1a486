"""What the teacher and the router apps share: the bare FastAPI app, the error body, buckets."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

#: Prometheus latency buckets (seconds) of both services: 0.1 ms to 10 s.
LATENCY_BUCKETS_S = (
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
    0.25,
    0.5,
    1.0,
    5.0,
    10.0,
)


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The protocol's error body: ``{"error": message}``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def bare_app(title: str, version: str, lifespan: Any = None) -> FastAPI:
    """A FastAPI app without the docs/OpenAPI routes (a data-plane service, not a web UI)."""
    return FastAPI(
        title=title,
        version=version,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
