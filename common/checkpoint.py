"""Checkpoints: safetensors weights plus one JSON metadata record. No pickle anywhere.

The metadata lives under a single safetensors metadata key (``opd``) as JSON with sorted keys, so
the same weights and metadata always give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common.nets import NetConfig, VelocityNet

META_KEY = "opd"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message says what is wrong with it."""


class TeacherRef(BaseModel):
    """Who supervised a student: a teacher's name, weights digest and served version."""

    name: str
    digest: str
    version: str = "1"


class CheckpointMeta(BaseModel):
    """Everything a process needs to know about a set of weights besides the weights."""

    name: str
    role: str = Field(description="base | teacher | student")
    arch: NetConfig = Field(default_factory=NetConfig)
    modes: list[int] = Field(default_factory=list, description="ring modes it was trained on")
    mode_centers: list[list[float]] = Field(default_factory=list, description="[K, D] centers")
    seed: int | None = None
    steps: int = 0
    training: dict[str, Any] = Field(default_factory=dict, description="recipe: lr, batch, ...")
    teachers: list[TeacherRef] = Field(default_factory=list, description="students only")
    digest: str = ""


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode open() would (0666 less the umask), so a
        # checkpoint is as readable as any other file, e.g. by a container's non-root user.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encode_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """safetensors bytes with ``meta`` stored as sorted JSON under one metadata key."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return st_save(clean, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def decode_tensors(data: bytes, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of :func:`encode_tensors`; raises :class:`CheckpointError` with the reason."""
    try:
        tensors = st_load(data)
    except (
        SafetensorError,
        ValueError,
        RuntimeError,
        OSError,
    ) as exc:  # garbage raises several types
        raise CheckpointError(f"{source} is not a readable safetensors file: {exc}") from exc
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    raw = (header.get("__metadata__") or {}).get(META_KEY)
    if raw is None:
        raise CheckpointError(f"{source} has no '{META_KEY}' metadata; write it with opd tools")
    return tensors, json.loads(raw)


def save_model(path: str | Path, net: VelocityNet, meta: CheckpointMeta) -> CheckpointMeta:
    """Save ``net`` with ``meta`` (its ``arch`` and ``digest`` filled in) atomically to ``path``."""
    tensors = dict(net.state_dict())
    meta = meta.model_copy(update={"arch": net.config, "digest": weights_digest(tensors)})
    atomic_write_bytes(path, encode_tensors(tensors, meta.model_dump(mode="json")))
    return meta


def read_model(path: str | Path, device: str = "cpu") -> tuple[VelocityNet, CheckpointMeta]:
    """Load a ``VelocityNet`` checkpoint, checking its metadata and its weights digest.

    Raises:
        CheckpointError: missing file, not safetensors, bad metadata, or digest mismatch.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give a .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    tensors, raw = decode_tensors(path.read_bytes(), source=str(path))
    try:
        meta = CheckpointMeta.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(f"{path} has invalid metadata: {exc}") from exc
    digest = weights_digest(tensors)
    if meta.digest and meta.digest != digest:
        raise CheckpointError(f"{path}: weights digest {digest} != recorded {meta.digest}")
    net = VelocityNet(meta.arch)
    try:
        net.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit arch {meta.arch}: {exc}") from exc
    net.eval().requires_grad_(False)
    return net.to(device), meta.model_copy(update={"digest": digest})
