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
import time
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


#: Launchers that start several computing processes on one host (``opd cluster up``, ``opd
#: demo``) put their count here, so each process takes an equal share of the cores.
CPU_SHARE_ENV = "OPD_CPU_SHARE"


def cpu_share_env(processes: int) -> dict[str, str]:
    """Environment for children of a launcher that starts ``processes`` computing processes."""
    return {CPU_SHARE_ENV: str(max(1, processes))}


def thread_budget(params: int | None, share: int | None = None, cpus: float | None = None) -> int:
    """torch intra-op threads for a process whose model has ``params`` parameters.

    Args:
        params: parameters of the model it computes with (``None``: unknown, treated as large).
        share: computing processes this one shares ``cpus`` with (default: ``OPD_CPU_SHARE``,
            set by launchers, else 1); each gets an equal whole share, at least one thread.
        cpus: cores available (default :func:`usable_cpus`).
    """
    if params is not None and params < SMALL_MODEL_PARAMS:
        return 1
    cpus = usable_cpus() if cpus is None else cpus
    if share is None:
        try:
            share = int(os.environ.get(CPU_SHARE_ENV, "1"))
        except ValueError:
            share = 1
    return max(1, math.floor(cpus / max(1, share)))


def replica_cpus() -> float | None:
    """CPUs Ray reserved for this actor (its ``num_cpus``), or ``None`` outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not in a Ray worker, or Ray absent: fall back to the host's cores
        return None


def apply_threads(n: int) -> int:
    """Set this thread's torch intra-op threads to ``n`` (OpenMP counts are per thread: a worker
    thread that computes sets its own, see ``services.teacher.batcher.forward_executor``)."""
    import torch

    torch.set_num_threads(n)
    return n


def threads_line() -> str:
    """``"1 torch thread (2 usable cores, OMP_WAIT_POLICY=PASSIVE)"``: what this process uses."""
    import torch

    n = torch.get_num_threads()
    return (
        f"{n} torch thread{'s' if n != 1 else ''} ({usable_cpus():g} usable cores, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')})"
    )


def model_params(module: object) -> int | None:
    """Parameter count of a torch module (``None`` for anything without ``parameters()``)."""
    params = getattr(module, "parameters", None)
    return sum(p.numel() for p in params()) if callable(params) else None


def _schedstat_ns(task_dir: Path = Path("/proc/self/task")) -> tuple[int, int] | None:
    """Nanoseconds this process's threads have run and waited runnable for a core (Linux
    schedstat: the second number is run-queue delay), or ``None`` where it cannot be read."""
    run = wait = 0
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return None
    for tid in tids:
        try:
            fields = (task_dir / tid / "schedstat").read_text().split()
        except OSError:  # a thread that ended meanwhile
            continue
        run, wait = run + int(fields[0]), wait + int(fields[1])
    return run, wait


class CpuWatch:
    """Tells when this process waits for a core more than it runs: an oversubscribed machine.

    ``update()`` reads the process's run and run-queue wait times; over windows of at least
    ``window_s`` it computes the fraction of runnable time spent waiting (quiet machine: a few
    per cent; beside busy processes on every core: half or more). ``warning()`` says so once.
    """

    def __init__(self, threads: int, window_s: float = 5.0, threshold: float = 0.5) -> None:
        self.threads, self.window_s, self.threshold = threads, window_s, threshold
        self.start = self._last = (time.perf_counter(), *(_schedstat_ns() or (0, 0)))
        self.wait_fraction = 0.0  # of the last full window
        self.warned = False

    def update(self) -> str | None:
        """Close a window when ``window_s`` has passed; a warning (once) if it was oversubscribed."""
        now = (time.perf_counter(), *(_schedstat_ns() or (0, 0)))
        if now[0] - self._last[0] < self.window_s:
            return None
        ran, waited = now[1] - self._last[1], now[2] - self._last[2]
        self._last = now
        self.wait_fraction = waited / (ran + waited) if ran + waited > 0 else 0.0
        if self.warned or self.wait_fraction < self.threshold:
            return None
        self.warned = True
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        return (
            f"the machine is oversubscribed: this process waited {self.wait_fraction:.0%} of "
            f"its runnable time for a CPU over the last {now[0] - self.start[0]:.0f} s "
            f"(load average {load:.1f} on {usable_cpus():g} usable cores; {self.threads} torch "
            f"thread{'s' if self.threads != 1 else ''}); steps run slower until other work "
            "stops (README 'CPU threads')"
        )

    def totals(self) -> dict[str, float]:
        """Seconds this process's threads ran and waited for a core since the watch began."""
        now = (time.perf_counter(), *(_schedstat_ns() or (0, 0)))
        return {
            "threads": self.threads,
            "run_s": round((now[1] - self.start[1]) / 1e9, 3),
            "runqueue_wait_s": round((now[2] - self.start[2]) / 1e9, 3),
        }
