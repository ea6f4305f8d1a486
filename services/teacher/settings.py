"""Settings of ``opd serve teacher``: flags and ``OPD_TEACHER_*`` environment variables."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.admission import body_timeout_field, send_timeout_field
from common.names import PLAIN_NAME_RULE, is_plain_name
from common.threads import THREADS_HELP

#: Environment variable holding the bearer token for admin calls (load / unload). Kept out of
#: the flags on purpose: a token on the command line is visible to every user in ``ps``.
ADMIN_TOKEN_ENV = "OPD_ADMIN_TOKEN"


class TeacherSettings(BaseSettings):
    """One teacher process: which checkpoint it serves, where, and how it batches."""

    model_config = SettingsConfigDict(env_prefix="OPD_TEACHER_")

    checkpoint: Path | None = Field(
        None, description="VelocityNet checkpoint to serve (safetensors); or give --synthetic"
    )
    model_dir: Path | None = Field(
        None,
        description="diffusers transformer directory (save_pretrained; SD3 or FLUX; safetensors "
        "only) to serve instead of a checkpoint",
    )
    adapter: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="--model-dir: NAME=PATH (repeatable): serve the LoRA adapter at PATH "
        "(safetensors) on the base as model NAME",
    )
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="--model-dir: weights and compute dtype"
    )
    cond_cache_mb: float = Field(
        256.0, ge=0, description="conditioning kept by cond_id (LRU, MiB); 0 keeps none"
    )
    max_batch_mb: float = Field(
        64.0,
        gt=0,
        description="--model-dir: most input MiB (states + conditioning) merged into one forward",
    )
    synthetic: bool = Field(
        False, description="serve a random seeded VelocityNet instead of a checkpoint (benchmarks)"
    )
    state_dim: int = Field(
        2, ge=1, le=1 << 20, description="--synthetic: floats per state (D), e.g. 65536"
    )
    width: int = Field(128, ge=1, description="--synthetic: hidden width of the MLP")
    depth: int = Field(3, ge=1, description="--synthetic: hidden layers of the MLP")
    seed: int = Field(0, description="--synthetic: weight seed (same seed, same weights)")
    name: str | None = Field(
        None,
        description="served model name (default: the checkpoint's file stem, e.g. teacher-a, base)",
    )
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind; 0 picks a free one")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where the forward pass runs")
    max_batch_states: int = Field(16384, ge=1, description="most states merged into one forward")
    max_delay_ms: float = Field(
        0.0,
        ge=0,
        description="longest a request waits for others to "
        "join its batch (0: only those already queued)",
    )
    forward_chunk_states: int = Field(
        4096,
        ge=0,
        description="CPU forwards run merged batches in row chunks of at most this many states "
        "(cache-sized: faster per state than one big forward); 0 = one forward per batch",
    )
    max_body_mb: float = Field(64.0, gt=0, description="largest accepted request body (MiB)")
    max_queue_mb: float | None = Field(
        None,
        gt=0,
        description="most MiB held by requests in queue and in flight (bodies, decoded tensors, "
        "answers not yet sent); beyond: 503 + Retry-After, one larger request: 413 "
        "(default: a quarter of the cgroup limit or MemAvailable, 64..1024 MiB)",
    )
    body_timeout_s: float = body_timeout_field()
    send_timeout_s: float = send_timeout_field()
    model_root: Path | None = Field(
        None,
        description="directory that load calls may read "
        "checkpoints from (default: the checkpoint's)",
    )
    threads: int | None = Field(None, ge=1, description=THREADS_HELP)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "warning", description="uvicorn log level"
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if not v:  # empty (e.g. OPD_TEACHER_NAME= in a compose file) keeps meaning "the default"
            return None
        if not is_plain_name(v):
            raise ValueError(f"must be {PLAIN_NAME_RULE}; got {v!r}")
        return v

    @field_validator("adapter", mode="before")
    @classmethod
    def _split_adapters(cls, v: object) -> object:
        # env: a JSON list or NAME=PATH specs separated by ';' or whitespace
        if isinstance(v, str):
            text = v.strip()
            return json.loads(text) if text.startswith("[") else text.replace(";", " ").split()
        return v

    @field_validator("adapter")
    @classmethod
    def _adapter_specs(cls, v: list[str]) -> list[str]:
        for spec in v:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"must be NAME=PATH, got {spec!r}")
            if not is_plain_name(name):
                raise ValueError(f"adapter name must be {PLAIN_NAME_RULE}; got {name!r}")
            if not Path(path).exists():
                raise ValueError(f"adapter {name}: {path!r} does not exist")
        return v

    @field_validator("model_dir")
    @classmethod
    def _existing_model_dir(cls, v: Path | None) -> Path | None:
        has_config = v is None or any(
            (v / sub / "config.json").is_file() for sub in (".", "transformer")
        )
        if not has_config:
            raise ValueError(
                f"{str(v)!r} holds no config.json (nor transformer/config.json): give the "
                "directory a diffusers transformer was saved to with save_pretrained"
            )
        return v

    @field_validator("model_root")
    @classmethod
    def _existing_root(cls, v: Path | None) -> Path | None:
        # Load calls resolve names under it: a typo would only show at the first swap.
        if v is not None and not v.is_dir():
            what = "is not a directory" if v.exists() else "does not exist"
            raise ValueError(f"{str(v)!r} {what}")
        return v

    @field_validator("device")
    @classmethod
    def _device_present(cls, v: str) -> str:
        # Checked here, not at the first .to(): torch's own error is a traceback
        # ("Torch not compiled with CUDA enabled").
        if v == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("CUDA is not available on this machine; use --device cpu")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSettings:
        sources = (self.checkpoint is not None) + self.synthetic + (self.model_dir is not None)
        if sources != 1:
            raise ValueError(
                "give either --checkpoint FILE or --synthetic or --model-dir DIR "
                "(exactly one of them)"
            )
        if self.adapter and self.model_dir is None:
            raise ValueError("--adapter needs --model-dir (LoRA adapters load on a diffusers base)")
        if self.name is None and not is_plain_name(self.served_name()):
            raise ValueError(
                f"the served name {self.served_name()!r} (the checkpoint's file stem) must be "
                f"{PLAIN_NAME_RULE}; give --name"
            )
        return self

    def served_name(self) -> str:
        """The model name clients use in URLs."""
        if self.name:
            return self.name
        if self.model_dir is not None:
            return self.model_dir.resolve().name
        return self.checkpoint.stem if self.checkpoint is not None else "synthetic"

    def root(self) -> Path:
        """The directory load calls are confined to (``--model-dir``: adapters under its
        parent by default)."""
        if self.checkpoint is not None:
            parent = self.checkpoint.parent
        elif self.model_dir is not None:
            parent = self.model_dir.resolve().parent
        else:
            parent = Path.cwd()
        return (self.model_root or parent).resolve()

    def adapters(self) -> dict[str, Path]:
        """``--adapter NAME=PATH`` as name -> path, in the order given."""
        return {n: Path(p) for n, _, p in (s.partition("=") for s in self.adapter)}

    @property
    def max_batch_bytes(self) -> int | None:
        """The byte bound on merged forwards (diffusers only: toy merges stay bounded by states)."""
        return int(self.max_batch_mb * 1024 * 1024) if self.model_dir is not None else None

    @property
    def cond_cache_bytes(self) -> int:
        return int(self.cond_cache_mb * 1024 * 1024)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


def admin_token_from_env() -> str | None:
    """The configured admin token, or ``None`` (then admin calls are refused with 403)."""
    token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    return token or None
