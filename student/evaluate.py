"""Evaluation of a student against the routed teachers' target distribution (SPEC §4)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common import ring
from student.rollout import sample

EVAL_SAMPLES = 5000
EVAL_STEPS = 50
EVAL_SEED = 2024


def metrics_of(samples: torch.Tensor, teacher_modes: Sequence[Sequence[int]]) -> dict[str, float]:
    """SPEC §4 metrics of ``samples [n, 2]`` against the teachers' modes."""
    return {
        "avg_target_logp": float(ring.target_logp(samples, teacher_modes).mean()),
        "teacher_mode_mass": ring.teacher_mode_mass(samples, ring.union_modes(teacher_modes)),
        "effective_modes": ring.effective_modes(samples),
    }


def evaluate(
    net: nn.Module,
    teacher_modes: Sequence[Sequence[int]],
    n: int = EVAL_SAMPLES,
    steps: int = EVAL_STEPS,
    seed: int = EVAL_SEED,
) -> tuple[dict[str, float], torch.Tensor]:
    """Sample ``n`` points with ``steps`` Euler steps (own seeded generator) and score them.

    Returns the metrics and the samples ``[n, 2]``.
    """
    x = sample(net, n, steps, generator=torch.Generator().manual_seed(seed))
    return metrics_of(x, teacher_modes), x
