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


class WideVelocityNet(VelocityNet):
    """``VelocityNet`` with its first layer applied to ``x`` and to the time features apart.

    Same parameters, same function: ``W [x, feats] + b = W_x x + W_t feats + b``. It never builds
    the ``[B, D + 2F]`` input that ``VelocityNet`` concatenates, a copy of ``x`` (8 MB for 32
    states at D = 65,536); that saved 20-30% of a width-8 forward at D = 65,536 on 2 vCPUs.
    Equal to ``VelocityNet.forward`` to float rounding (~1e-7).
    ``forward(x [B, D], t [B]) -> v [B, D]``.
    """

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        first, d = self.mlp[0], self.config.data_dim
        tf = t.reshape(-1, 1) * self.freqs  # [B, F]
        feats = torch.cat([tf.sin(), tf.cos()], dim=1)  # [B, 2F]
        # bias + W_t feats, then += x W_x^T in place: strided weight views, no weight copy
        h = torch.addmm(first.bias, feats, first.weight[:, d:].T).addmm_(x, first.weight[:, :d].T)
        for layer in self.mlp[1:]:
            h = layer(h)
        return h


def synthetic_net(config: NetConfig, seed: int = 0) -> VelocityNet:
    """A frozen ``WideVelocityNet(config)`` whose weights depend only on ``config`` and ``seed``
    (the same weights a ``VelocityNet(config)`` built under that seed gets).

    The global torch RNG is forked, so building one does not disturb the caller's random stream.
    ``forward(x [B, config.data_dim], t [B]) -> v [B, config.data_dim]``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = WideVelocityNet(config)
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
