"""The latent world's data, prompts and fixed evaluation (the analogue of SPEC §2 and §4).

Data: ``FAMILIES`` families of ``[C, H, W] = [4, 8, 8]`` latents. Family ``f`` has two sub-modes
``P[f, m] = F_f ± G_f`` (smooth, low-frequency patterns: images are smooth) and a sample is a
prototype plus isotropic noise of std ``DATA_STD``. Each family has a prompt embedding
(``encoder_hidden_states [L, E]``, ``pooled_projections [P]``); the unconditional embedding is
zeros. Everything is drawn from ``WORLD_SEED`` with its own generator: the world is the same in
every process.

Evaluation classifies each sample by its nearest prototype (8 of them) and reports, over the
prompts of the target families:
- ``target_logp``: mean log-density per dimension of a sample under its prompt family's true
  distribution (the mixture of its two sub-mode Gaussians): the analogue of ``avg_target_logp``;
- ``family_mass``: fraction of samples whose nearest prototype is of their prompt's family;
- ``proto_rmse``: RMS distance (per value) to the nearest prototype of the prompt's family;
- ``effective_modes``: ``1 / Σ m_k²`` over the 8 prototypes' sample fractions (the ring's
  effective modes; at most 2 per target family);
- ``submode_balance``: mean over target families of the effective sub-modes (1..2): diversity
  within a family, what mode collapse lowers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

FAMILIES = 4
SUBMODES = 2
SHAPE = (4, 8, 8)  # [C, H, W] of one latent
TEXT_LEN = 4  # L: tokens of encoder_hidden_states
TEXT_DIM = 16  # E: joint_attention_dim
POOLED_DIM = 8  # P: pooled_projection_dim
DATA_STD = 0.15
WORLD_SEED = 7
SUBMODE_SCALE = 0.6  # RMS of G_f relative to F_f's 1.0: sub-modes closer than families
#: the specialists and the families each is fine-tuned on (teachers a, b know two ring modes each)
TEACHER_FAMILIES: dict[str, tuple[int, ...]] = {"a": (0, 1), "b": (2, 3)}
DIM = math.prod(SHAPE)


def _smooth_patterns(n: int, g: torch.Generator, freqs: int = 3) -> torch.Tensor:
    """``n`` random low-frequency patterns ``[n, C, H, W]`` of RMS 1: per channel a random
    combination of the ``freqs × freqs`` lowest 2-D cosine (DCT-II) basis images."""
    c, h, w = SHAPE
    coef = torch.randn(n, c, freqs, freqs, generator=g)
    ys = torch.cos(math.pi * torch.arange(freqs)[:, None] * (torch.arange(h) + 0.5) / h)  # [F, H]
    xs = torch.cos(math.pi * torch.arange(freqs)[:, None] * (torch.arange(w) + 0.5) / w)  # [F, W]
    pat = torch.einsum("ncuv,uh,vw->nchw", coef, ys, xs)
    return pat / pat.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()


@dataclass(frozen=True)
class World:
    """The prototypes and prompt embeddings (all float32, CPU)."""

    prototypes: torch.Tensor  # [FAMILIES, SUBMODES, C, H, W]
    text: torch.Tensor  # [FAMILIES, L, E]  encoder_hidden_states per family
    pooled: torch.Tensor  # [FAMILIES, P]    pooled_projections per family

    def cond(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The conditioning of prompts ``labels [B]`` (family ids; ``-1`` = unconditional, zeros):
        ``encoder_hidden_states [B, L, E]``, ``pooled_projections [B, P]``."""
        labels = labels.long()
        keep = (labels >= 0).float()
        idx = labels.clamp(min=0)
        return {
            "encoder_hidden_states": self.text[idx] * keep[:, None, None],
            "pooled_projections": self.pooled[idx] * keep[:, None],
        }

    def sample_data(
        self, labels: torch.Tensor, g: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Data ``x0 [B, C, H, W]`` of families ``labels [B]`` and their sub-modes ``[B]``."""
        sub = torch.randint(0, SUBMODES, labels.shape, generator=g)
        x0 = self.prototypes[labels.long(), sub]
        return x0 + DATA_STD * torch.randn(x0.shape, generator=g), sub

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest prototype of each ``x [B, C, H, W]``: ``[B]`` ids ``family · SUBMODES + m``."""
        protos = self.prototypes.reshape(FAMILIES * SUBMODES, -1)
        return torch.cdist(x.reshape(len(x), -1).double(), protos.double()).argmin(dim=1)

    def family_logp(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``log p(x | family)`` per dimension, ``[B]``: the family's equal mixture of
        ``N(P[f, m], DATA_STD² I)``."""
        flat = x.reshape(len(x), 1, -1).double()
        protos = self.prototypes[labels.long()].reshape(len(x), SUBMODES, -1).double()
        sq = (flat - protos).pow(2).sum(dim=2)  # [B, SUBMODES]
        log_norm = -0.5 * DIM * math.log(2 * math.pi * DATA_STD**2)
        logp = torch.logsumexp(-sq / (2 * DATA_STD**2), dim=1) - math.log(SUBMODES) + log_norm
        return (logp / DIM).float()


def make_world(seed: int = WORLD_SEED) -> World:
    """The world of ``seed`` (own generator: independent of the global torch RNG)."""
    g = torch.Generator().manual_seed(seed)
    fam = _smooth_patterns(FAMILIES, g)
    sub = SUBMODE_SCALE * _smooth_patterns(FAMILIES, g)
    protos = torch.stack([fam + sub, fam - sub], dim=1)
    text = torch.randn(FAMILIES, TEXT_LEN, TEXT_DIM, generator=g)
    pooled = torch.randn(FAMILIES, POOLED_DIM, generator=g)
    return World(protos, text, pooled)


def with_prompts(world: World, path: Path) -> World:
    """``world`` with the prompt set in ``path`` in place of its own embeddings: a safetensors
    file of ``encoder_hidden_states [FAMILIES, L, E]`` and ``pooled_projections [FAMILIES, P]``,
    one prompt per family in family order (what a user's text encoder made of their captions).

    Raises:
        ValueError: the file is missing or unreadable, lacks a tensor, or has another number of
            prompts than families; whether the embeddings fit the models is checked by the
            run's setup (:func:`student.latent.train.check_setup`).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        got = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"--prompts {path}: not a readable safetensors file ({exc})") from None
    want = {"encoder_hidden_states": 3, "pooled_projections": 2}
    for name, ndim in want.items():
        t = got.get(name)
        if t is None or t.ndim != ndim or len(t) != FAMILIES:
            have = "missing" if t is None else f"shape {list(t.shape)}"
            raise ValueError(
                f"--prompts {path}: {name} must be [{FAMILIES}, ...] with {ndim} dims (one "
                f"prompt per family), got {have}"
            )
    return World(
        world.prototypes, got["encoder_hidden_states"].float(), got["pooled_projections"].float()
    )


def target_families(teachers: Sequence[str]) -> list[int]:
    """The families the named teachers are specialists of (sorted, each once)."""
    unknown = [t for t in teachers if t not in TEACHER_FAMILIES]
    if unknown:
        raise ValueError(
            f"no teacher {unknown[0]!r} in the latent world; teachers: {', '.join(TEACHER_FAMILIES)}"
        )
    return sorted({f for t in teachers for f in TEACHER_FAMILIES[t]})


def metrics_of(world: World, samples: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The evaluation of ``samples [n, C, H, W]`` generated for prompts ``labels [n]``."""
    ids = world.classify(samples)
    fam = ids // SUBMODES
    own = world.prototypes[labels.long()].reshape(len(samples), SUBMODES, -1)
    d2 = (samples.reshape(len(samples), 1, -1) - own).pow(2).mean(dim=2).min(dim=1).values
    m = torch.bincount(ids, minlength=FAMILIES * SUBMODES).double() / len(ids)
    balance = []
    for f in labels.unique().tolist():
        mine = ids[(labels == f) & (fam == f)] % SUBMODES
        if len(mine):
            q = torch.bincount(mine, minlength=SUBMODES).double() / len(mine)
            balance.append(float(1 / q.pow(2).sum()))
        else:
            balance.append(0.0)
    return {
        "target_logp": float(world.family_logp(samples, labels).mean()),
        "family_mass": float((fam == labels).double().mean()),
        "proto_rmse": float(d2.sqrt().mean()),
        "effective_modes": float(1 / m.pow(2).sum()),
        "submode_balance": sum(balance) / len(balance),
    }


def eval_labels(families: Sequence[int], per_family: int) -> torch.Tensor:
    """``per_family`` prompts of each family in ``families``, ``[len(families)·per_family]``."""
    return torch.tensor(list(families)).repeat_interleave(per_family)
