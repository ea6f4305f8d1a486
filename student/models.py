"""Finding and loading the standard checkpoints of a models directory by teacher name."""

from __future__ import annotations

from pathlib import Path

from common.checkpoint import CheckpointError, CheckpointMeta, read_model
from common.nets import VelocityNet

BASE_NAME = "base"


def checkpoint_path(models: str | Path, name: str) -> Path:
    """``teacher-NAME.safetensors`` for a teacher, ``base.safetensors`` for the base student."""
    models = Path(models)
    return models / ("base.safetensors" if name == BASE_NAME else f"teacher-{name}.safetensors")


def load_named(
    models: str | Path, name: str, device: str = "cpu"
) -> tuple[VelocityNet, CheckpointMeta]:
    """Load the checkpoint of teacher ``name`` (or ``base``) from ``models``."""
    path = checkpoint_path(models, name)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint for teacher {name!r}: {path} does not exist (run `opd pretrain --out {models}`)"
        )
    return read_model(path, device=device)


def parse_names(spec: str | list[str]) -> list[str]:
    """``"a,b"`` → ``["a", "b"]`` (order kept, blanks and repeats refused)."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec)]
    if not names or any(not n for n in names):
        raise ValueError(f"teacher list {spec!r} has an empty name; write e.g. 'a,b'")
    if len(set(names)) != len(names):
        raise ValueError(f"teacher list {spec!r} names a teacher twice")
    return names
