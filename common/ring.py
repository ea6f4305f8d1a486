"""The toy world: an 8-mode Gaussian ring in 2-D (SPEC §2) and the metrics of SPEC §4.

All functions are pure. Shapes: ``B`` samples, ``D = 2`` dimensions, ``K`` modes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

NUM_MODES = 8
RADIUS = 4.0
MODE_STD = 0.35
#: Density floor of the target log-density: ``log(p(x) + 1e-12)``. SPEC §5's base rows are only
#: reproducible with it (samples on far modes have p ≈ e^-130, and without a floor one stray
#: sample dominates the mean); it does not move samples that land near a target mode.
DENSITY_FLOOR = 1e-12

#: Which ring modes each named toy teacher knows (SPEC §2); ``base`` knows all of them.
TEACHER_MODES: dict[str, tuple[int, ...]] = {
    "a": (0, 2),
    "b": (1, 3),
    "base": tuple(range(NUM_MODES)),
}


def ring_centers(num_modes: int = NUM_MODES, radius: float = RADIUS) -> torch.Tensor:
    """Mode centers ``radius · (cos 2πk/K, sin 2πk/K)``, shape ``[K, 2]`` (float32)."""
    angles = 2.0 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
    return (radius * torch.stack([angles.cos(), angles.sin()], dim=1)).float()


def centers_of(modes: Sequence[int]) -> torch.Tensor:
    """Centers of the given ring modes, shape ``[len(modes), 2]``."""
    return ring_centers()[torch.as_tensor(list(modes), dtype=torch.long)]


def sample_modes(
    n: int, modes: Sequence[int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` samples from the equal-weight mixture of the given ring modes, shape ``[n, 2]``."""
    centers = centers_of(modes)
    pick = torch.randint(len(modes), (n,), generator=generator)
    return centers[pick] + MODE_STD * torch.randn(n, 2, generator=generator)


def mixture_logp(x: torch.Tensor, centers: torch.Tensor, std: float = MODE_STD) -> torch.Tensor:
    """Log-density of the equal-weight isotropic Gaussian mixture at ``x``.

    Args:
        x: points, ``[B, D]``.
        centers: component means, ``[K, D]``.
    Returns:
        ``[B]`` log-densities, computed in float64 with logsumexp (far points stay finite).
    """
    x64, c64 = x.double(), centers.double()
    d = x64.shape[1]
    sq = torch.cdist(x64, c64).pow(2)  # [B, K]
    log_norm = -0.5 * d * math.log(2.0 * math.pi * std**2)
    comp = log_norm - sq / (2.0 * std**2)
    return torch.logsumexp(comp, dim=1) - math.log(centers.shape[0])


def target_logp(
    x: torch.Tensor, teacher_modes: Sequence[Sequence[int]], floor: float = DENSITY_FLOOR
) -> torch.Tensor:
    """Log-density under the target: the uniform mixture of the routed teachers' distributions.

    It is the log of the mean of the teachers' densities (not the mean of their log-densities),
    floored as ``log(p + floor)`` (see :data:`DENSITY_FLOOR`; ``floor=0`` gives the plain value).

    Args:
        x: points, ``[B, 2]``.
        teacher_modes: each teacher's own mode indices.
    Returns:
        ``[B]`` log-densities (float64).
    """
    per_teacher = torch.stack([mixture_logp(x, centers_of(m)) for m in teacher_modes], dim=1)
    logp = torch.logsumexp(per_teacher, dim=1) - math.log(len(teacher_modes))
    return (
        torch.logaddexp(logp, torch.tensor(math.log(floor), dtype=logp.dtype))
        if floor > 0
        else logp
    )


def nearest_mode(x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest ring center for each point, ``[B]`` (long)."""
    return torch.cdist(x.float(), ring_centers()).argmin(dim=1)


def mode_fractions(x: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose nearest ring center is mode k, ``[NUM_MODES]``."""
    return torch.bincount(nearest_mode(x), minlength=NUM_MODES).double() / x.shape[0]


def teacher_mode_mass(x: torch.Tensor, modes: Sequence[int]) -> float:
    """Fraction of samples whose nearest ring center is one of ``modes``."""
    return float(mode_fractions(x)[list(modes)].sum())


def effective_modes(x: torch.Tensor) -> float:
    """``1 / Σ_k m_k²`` over the ring modes' sample fractions ``m_k`` (k equal modes give k)."""
    return float(1.0 / mode_fractions(x).pow(2).sum())


def union_modes(teacher_modes: Sequence[Sequence[int]]) -> list[int]:
    """Sorted union of the teachers' mode indices."""
    return sorted({m for modes in teacher_modes for m in modes})
