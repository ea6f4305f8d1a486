"""Router settings: ``opd serve router`` flags and ``OPD_ROUTER_*`` environment variables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.admission import body_timeout_field, send_timeout_field

#: Environment variable holding the admin Bearer token (shared with the teacher service).
ADMIN_TOKEN_ENV = "OPD_ADMIN_TOKEN"


def _split_specs(value: object) -> object:
    """Env values: a JSON list, or specs separated by ``;`` or whitespace (``,`` splits replicas)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [s for s in text.replace(";", " ").split() if s]
    return value


class RouterSettings(BaseSettings):
    """Everything ``opd serve router`` can be told; flags win over env, env over defaults."""

    model_config = SettingsConfigDict(env_prefix="OPD_ROUTER_")

    teacher: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="NAME=URL[,URL...] (repeatable); URL#MODEL names the served model, else the "
        "server's repository index must hold exactly one",
    )
    anchor: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="NAME=URL[,URL...]: extra teacher asked on every row (v_anchor)",
    )
    registry: Path | None = Field(
        None, description="YAML or JSON registry file (teachers, anchors, policy)"
    )
    policy: Literal["nearest", "label", "average"] | None = Field(
        None,
        description="routing policy (default: the registry file's, else nearest); latent "
        "teachers have no mode centers: use label (route input per row) or average",
    )
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="port (0 = any free port)")
    deadline_s: float = Field(10.0, gt=0, description="per-request deadline, retries included")
    startup_timeout_s: float = Field(
        30.0,
        ge=0,
        description="how long start-up retries reaching "
        "unreachable teachers (they may still be starting)",
    )
    attempt_timeout_s: float = Field(5.0, gt=0, description="timeout of one call to one replica")
    connect_timeout_s: float = Field(1.0, gt=0, description="TCP connect timeout to a replica")
    health_interval_s: float = Field(0.5, gt=0, description="how often ejected replicas are probed")
    metadata_refresh_s: float = Field(
        5.0,
        ge=0,
        description="how often live replicas' metadata is re-read to catch a checkpoint loaded "
        "on the server itself (0 = only when an answer shows a new version)",
    )
    max_inflight: int = Field(64, ge=1, description="router requests fanned out at once")
    max_queue: int = Field(256, ge=0, description="requests waiting beyond max_inflight before 503")
    max_connections: int = Field(256, ge=1, description="keep-alive connections over all replicas")
    max_body_mb: float = Field(64.0, gt=0, description="largest accepted request body (MiB)")
    max_queue_mb: float | None = Field(
        None,
        gt=0,
        description="most MiB held by admitted requests (bodies and answers), beside "
        "max_inflight + max_queue; beyond: 503 + Retry-After, one larger request: 413 "
        "(default: a quarter of the cgroup limit or MemAvailable, 64..1024 MiB)",
    )
    body_timeout_s: float = body_timeout_field()
    send_timeout_s: float = send_timeout_field()
    threads: int = Field(1, ge=1, description="torch CPU threads (routing math only)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "warning", description="uvicorn log level"
    )

    _split_teacher = field_validator("teacher", "anchor", mode="before")(_split_specs)
