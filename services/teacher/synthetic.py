"""Synthetic teachers: a ``VelocityNet`` of any state dimension with seeded random weights.

For planning beyond the toy (``opd serve teacher --synthetic --state-dim 65536 --width 64``):
the same API and metrics as a checkpoint teacher, with no file behind it, so users can see at
which state size the network and (de)serialisation, rather than the model, become the bottleneck.
"""

from __future__ import annotations

import torch

from common.checkpoint import CheckpointMeta, weights_digest
from common.nets import NetConfig, VelocityNet

#: largest state dimension accepted (a 1024×1024 latent); keeps a typo from allocating GBs
MAX_STATE_DIM = 1 << 20


def synthetic_net(config: NetConfig, seed: int = 0) -> VelocityNet:
    """A frozen ``VelocityNet(config)`` whose weights depend only on ``config`` and ``seed``.

    The global torch RNG is forked, so building one does not disturb the caller's random stream.
    ``forward(x [B, config.data_dim], t [B]) -> v [B, config.data_dim]``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = VelocityNet(config)
    return net.eval().requires_grad_(False)


def synthetic_model(
    name: str, state_dim: int, width: int, depth: int = 3, seed: int = 0
) -> tuple[VelocityNet, CheckpointMeta]:
    """The net and the metadata a checkpoint would carry (``training.synthetic`` marks it)."""
    config = NetConfig(data_dim=state_dim, width=width, depth=depth)
    net = synthetic_net(config, seed)
    meta = CheckpointMeta(
        name=name,
        role="teacher",
        arch=config,
        seed=seed,
        training={"synthetic": True},
        digest=weights_digest(dict(net.state_dict())),
    )
    return net, meta
