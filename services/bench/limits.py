"""The in-process forward: the model's own states/s, with no server and no wire."""

from __future__ import annotations

import time
from typing import Any

import torch

from common.nets import NetConfig, VelocityNet


def forward_rate(
    net: VelocityNet, states: int, seconds: float = 1.0, threads: int = 1, max_calls: int = 10_000
) -> float:
    """states/s of ``net(x [states, D], t [states])`` in this process on ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        d = net.config.data_dim
        x, t = torch.rand(states, d), torch.rand(states)
        with torch.inference_mode():
            net(x, t)  # warm-up: allocator, lazy kernels
            n, start = 0, time.perf_counter()
            while n < max_calls and time.perf_counter() - start < seconds:
                net(x, t)
                n += 1
        return n * states / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)


def net_from_metadata(params: dict[str, Any]) -> VelocityNet | None:
    """The same network a synthetic teacher serves, rebuilt from its metadata ``parameters``
    (same config and seed → same weights); ``None`` for other models."""
    if not params.get("synthetic"):
        return None
    from services.teacher.synthetic import synthetic_net

    config = NetConfig(
        data_dim=int(params["data_dim"]), width=int(params["width"]), depth=int(params["depth"])
    )
    return synthetic_net(config, int(params.get("seed") or 0))
