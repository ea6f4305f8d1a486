"""A latent models directory pretrained for a few steps, shared by the latent-world tests."""

from __future__ import annotations

from pathlib import Path

from common.threads import apply_threads
from student.latent.pretrain import ensure_models

#: enough steps for valid, distinct models (not good ones): the tests check mechanics
BASE_STEPS, TEACHER_STEPS = 12, 6


def tiny_models(out: Path) -> Path:
    apply_threads(1)
    return ensure_models(
        out, base_steps=BASE_STEPS, teacher_steps=TEACHER_STEPS, say=lambda _: None
    )
