"""Training state on disk: model, Adam moments, RNG and run totals, written atomically.

A resumed run continues from the last saved step with the same global RNG state, so it ends with
the same student as an uninterrupted run of the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import CheckpointError, atomic_write_bytes, decode_tensors, encode_tensors
from common.nets import VelocityNet

STATE_FILE = "checkpoint.safetensors"


@dataclass
class TrainState:
    """What a resumed run needs; ``step`` is the number of optimizer steps already done."""

    step: int
    totals: dict[str, Any]
    versions_seen: dict[str, list[str]]
    config: dict[str, Any]
    params_init: torch.Tensor  # flat student parameters at step 0, for the report's change norm
    digests_seen: dict[str, list[str]] = field(default_factory=dict)  # checkpoints that answered


def save_state(
    out: Path,
    state: TrainState,
    student: VelocityNet,
    opt: torch.optim.Adam,
    rng: torch.Tensor | None = None,
) -> Path:
    """Write ``out/checkpoint.safetensors`` (replacing the previous one atomically).

    ``rng``: the global torch RNG state to resume with (default: the current one); a step that
    failed half-way saves the state it started with, so the resumed run replays it exactly.
    """
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in student.state_dict().items()}
    for i, p in enumerate(student.parameters()):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"optim.{i}.{key}"] = (
                value.detach().reshape(-1) if key == "step" else value.detach()
            )
    tensors["rng.torch"] = torch.get_rng_state() if rng is None else rng
    tensors["init.params"] = state.params_init
    meta = {
        "step": state.step,
        "totals": state.totals,
        "versions_seen": state.versions_seen,
        "digests_seen": state.digests_seen,
        "config": state.config,
    }
    path = out / STATE_FILE
    atomic_write_bytes(path, encode_tensors(tensors, meta))
    return path


def load_state(out: Path, student: VelocityNet, opt: torch.optim.Adam) -> TrainState:
    """Restore ``student``, ``opt`` and the global torch RNG from ``out/checkpoint.safetensors``."""
    path = out / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"--resume: {path} does not exist (no checkpoint was written yet)")
    tensors, meta = decode_tensors(path.read_bytes(), source=str(path))
    student.load_state_dict(
        {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    )
    for i, p in enumerate(student.parameters()):
        st = {
            key.split(".", 2)[2]: v.clone()
            for key, v in tensors.items()
            if key.startswith(f"optim.{i}.")
        }
        if st:
            st["step"] = st["step"].reshape(())
            opt.state[p] = st
    torch.set_rng_state(tensors["rng.torch"])
    return TrainState(
        meta["step"],
        meta["totals"],
        meta["versions_seen"],
        meta["config"],
        tensors["init.params"],
        meta.get("digests_seen", {}),  # absent in checkpoints written before it was recorded
    )


def check_not_shorter(out: Path, done: int, steps: int) -> None:
    """Refuse resuming the run in ``out`` (``done`` steps in) to ``steps`` < ``done``: its report
    would say ``steps`` while its counts hold ``done``. Raises :class:`CheckpointError`."""
    if done > steps:
        raise CheckpointError(
            f"--resume: the run in {out} has done {done} steps, more than --steps {steps}; "
            f"give --steps {done} or more"
        )


def read_state_meta(out: Path) -> dict[str, Any] | None:
    """The metadata (``step``, ``config``, ...) of ``out/checkpoint.safetensors``, or None when
    there is none: what a command checks before it starts, without restoring anything."""
    path = out / STATE_FILE
    if not path.is_file():
        return None
    return decode_tensors(path.read_bytes(), source=str(path))[1]
