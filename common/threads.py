"""CPU thread budgets: how many torch threads a process takes, chosen before it computes.

torch's default (one intra-op thread per core) is wrong for this project's processes twice over:
the toy models are too small for threads to pay (a 35k-parameter MLP on a 128-row batch spends
more on the OpenMP barrier than on the matmul), and a trainer, a router and three teachers on the
same cores each taking every core oversubscribe the machine. On a busy 2-core host the default
ran a short DanceOPD training 18x slower than one thread (OpenMP threads spin-waiting for a
descheduled sibling; docs/contention.md). So every process asks :func:`thread_budget` for its
count: small models get one thread, larger ones the cores they may use (affinity and cgroup
quota) divided among the computing services one command starts. ``--threads`` / ``OPD_*_THREADS``
still override.

The OpenMP wait policy is set to passive in ``common/__init__`` (before torch loads libgomp):
an idle worker sleeps instead of spinning, so threads that lose their core to another process
give it back.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: Models with fewer parameters run on one intra-op thread: below ~1M parameters a forward of a
#: few thousand rows is shorter than the cost of waking and joining a second thread.
SMALL_MODEL_PARAMS = 1_000_000

#: the help of every process's ``--threads`` flag
THREADS_HELP = (
    "torch CPU threads (default: 1 for models under 1M parameters, else the cores this process "
    "may use, shared among the services one command starts; README 'CPU threads')"
)

#: cgroup v2 and v1 files that hold a container's CPU quota (``docker run --cpus``, compose
#: ``cpus:``, a Kubernetes CPU limit).
_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = (
    Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
    Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
)


def cgroup_cpu_limit(v2: Path = _CGROUP_V2, v1: tuple[Path, Path] = _CGROUP_V1) -> float | None:
    """The CPU quota of this process's cgroup in cores (e.g. 1.5), or ``None`` when unlimited."""
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us, period_us = (int(p.read_text()) for p in v1)
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cpus() -> float:
    """Cores this process may use: its affinity set, capped by its cgroup's CPU quota."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cpus = float(os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return min(cpus, limit) if limit else cpus


def thread_budget(params: int | None, share: int = 1, cpus: float | None = None) -> int:
    """torch intra-op threads for a process whose model has ``params`` parameters.

    Args:
        params: parameters of the model it computes with (``None``: unknown, treated as large).
        share: computing processes this one shares ``cpus`` with (e.g. the services that
            ``opd cluster up`` starts); each gets an equal whole share, at least one.
        cpus: cores available (default :func:`usable_cpus`).
    """
    if params is not None and params < SMALL_MODEL_PARAMS:
        return 1
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, math.floor(cpus / max(1, share)))


def apply_threads(n: int) -> int:
    """Set this thread's torch intra-op threads to ``n`` (OpenMP counts are per thread: a worker
    thread that computes sets its own, see ``services.teacher.batcher.forward_executor``)."""
    import torch

    torch.set_num_threads(n)
    return n


def model_params(module: object) -> int | None:
    """Parameter count of a torch module (``None`` for anything without ``parameters()``)."""
    params = getattr(module, "parameters", None)
    return sum(p.numel() for p in params()) if callable(params) else None
