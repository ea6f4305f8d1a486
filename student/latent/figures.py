"""Sample grids of the latent world: one row per model, a few samples per prompt family."""

from __future__ import annotations

from pathlib import Path

import torch

from student.latent.world import FAMILIES, SUBMODES, World

PER_FAMILY = 3


def plot_grid(
    path: Path, world: World, grids: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> Path:
    """Draw channel 0 of the prototypes (first row) and of ``PER_FAMILY`` samples per family of
    each model (``title -> (samples [n, C, H, W], labels [n])``) into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = FAMILIES * PER_FAMILY
    fig, axes = plt.subplots(
        len(grids) + 1, cols, figsize=(cols * 0.6, (len(grids) + 1) * 0.7), squeeze=False
    )
    lim = float(world.prototypes[:, :, 0].abs().max())
    protos = [
        world.prototypes[f, m % SUBMODES, 0] for f in range(FAMILIES) for m in range(PER_FAMILY)
    ]
    rows = [("data prototypes", protos)]
    for title, (samples, labels) in grids.items():
        cells = []
        for f in range(FAMILIES):
            mine = samples[labels == f][:PER_FAMILY, 0]
            cells += [mine[i] if i < len(mine) else None for i in range(PER_FAMILY)]
        rows.append((title, cells))
    for r, (title, cells) in enumerate(rows):
        for c, img in enumerate(cells):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if img is not None:
                ax.imshow(img.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=7)
    for f in range(FAMILIES):
        axes[0][f * PER_FAMILY + 1].set_title(f"family {f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
