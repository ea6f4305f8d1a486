"""Flow-matching pretraining of the base student and the toy teachers (SPEC §2)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from common import ring
from common.checkpoint import CheckpointMeta, save_model
from common.nets import NetConfig, VelocityNet
from student.models import checkpoint_path


@dataclass(frozen=True)
class Recipe:
    """One model to pretrain: its name, role, ring modes, steps and seed offset."""

    name: str
    role: str
    modes: tuple[int, ...]
    steps: int
    seed_offset: int
    lr: float = 1e-3
    batch: int = 256


STANDARD = (
    Recipe("base", "base", ring.TEACHER_MODES["base"], 5000, 0),
    Recipe("a", "teacher", ring.TEACHER_MODES["a"], 4000, 1),
    Recipe("b", "teacher", ring.TEACHER_MODES["b"], 4000, 2),
)


def flow_matching_loss(
    net: VelocityNet, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Conditional flow matching: ``x_t = (1−t)x0 + t·ε``, target ``ε − x0``; inputs ``[B, D]``, ``t [B]``."""
    xt = (1 - t)[:, None] * x0 + t[:, None] * eps
    return (net(xt, t) - (eps - x0)).pow(2).mean()


def pretrain(
    modes: Sequence[int],
    steps: int,
    seed: int,
    lr: float = 1e-3,
    batch: int = 256,
    config: NetConfig | None = None,
    desc: str = "pretrain",
) -> VelocityNet:
    """Train a ``VelocityNet`` by flow matching on the ring modes ``modes``; deterministic per seed."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = VelocityNet(config)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc=desc, mininterval=1.0, leave=False):
        x0 = ring.sample_modes(batch, modes, gen)
        eps = torch.randn(batch, net.config.data_dim, generator=gen)
        t = torch.rand(batch, generator=gen)
        loss = flow_matching_loss(net, x0, eps, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


def pretrain_all(
    out: str | Path,
    seed: int = 0,
    force: bool = False,
    steps: int | None = None,
    recipes: Sequence[Recipe] = STANDARD,
    log=print,
    retrain_hint: str = "--force to retrain",
) -> list[Path]:
    """Pretrain every recipe into ``out``; existing files are kept unless ``force``.

    ``steps`` overrides every recipe's step count (for quick tests only). ``retrain_hint`` ends
    the "keep" line: callers without a ``--force`` flag name the command that has one.
    """
    written = []
    for r in recipes:
        path = checkpoint_path(out, r.name)
        if path.exists() and not force:
            log(f"keep {path} (exists; {retrain_hint})")
            continue
        n = steps if steps is not None else r.steps
        net = pretrain(r.modes, n, seed + r.seed_offset, r.lr, r.batch, desc=f"pretrain {r.name}")
        meta = CheckpointMeta(
            name=r.name,
            role=r.role,
            modes=list(r.modes),
            mode_centers=ring.centers_of(r.modes).tolist(),
            seed=seed + r.seed_offset,
            steps=n,
            training={
                "objective": "flow_matching",
                "lr": r.lr,
                "batch": r.batch,
                "optimizer": "adam",
            },
        )
        meta = save_model(path, net, meta)
        log(f"wrote {path} ({meta.digest[:19]}…)")
        written.append(path)
    return written


def ensure_models(models: Path) -> list[Path]:
    """What commands that need the standard checkpoints do first (``cluster up``, ``demo``,
    ``bench cost``): ``models`` must be a usable directory (``--models``), and what is missing
    in it is pretrained. They have no ``--force``, so the "keep" hint names the one that has."""
    from common.settings import out_dir

    out_dir(models, "--models")
    return pretrain_all(models, retrain_hint=f"`opd pretrain --out {models} --force` to retrain")
