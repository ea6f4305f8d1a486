"""The memory a process may use and the memory it holds: cgroup limit, MemAvailable, RSS, and
handing freed heap memory back to the kernel (glibc ``malloc_trim``).

The services size their default admission bound (``--max-queue-mb``) from
:func:`usable_bytes`, and give memory back after a burst with :func:`trim_heap`.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
from pathlib import Path

#: cgroup v2 and v1 files holding the memory limit of this process's cgroup
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
#: a cgroup "limit" above this means none (v1 writes 2^63 rounded down to a page)
_NO_LIMIT = 1 << 60

#: the default admission bound is this fraction of the usable memory...
DEFAULT_QUEUE_FRACTION = 0.25
#: ...at least this much (a tiny container still serves one 64 MiB request at a time)...
DEFAULT_QUEUE_MIN = 64 << 20
#: ...and at most this much: past it a burst only adds latency, not throughput
DEFAULT_QUEUE_MAX = 1 << 30


def cgroup_limit_bytes() -> int | None:
    """This process's cgroup memory limit in bytes, or None when there is none (or no cgroup)."""
    for name in _CGROUP_LIMITS:
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return value if value < _NO_LIMIT else None
    return None


def mem_available_bytes() -> int | None:
    """The kernel's ``MemAvailable`` (bytes), or None where ``/proc/meminfo`` is not there."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def usable_bytes() -> tuple[int | None, str]:
    """The memory this process may use and where that figure comes from: the cgroup limit
    (a container's), else ``MemAvailable``, the smaller of the two when both exist."""
    limit, avail = cgroup_limit_bytes(), mem_available_bytes()
    if limit is not None and (avail is None or limit <= avail):
        return limit, "cgroup memory limit"
    if avail is not None:
        return avail, "MemAvailable"
    return None, "unknown"


def default_queue_bytes() -> tuple[int, str]:
    """The default admission bound in bytes and a sentence saying how it was derived."""
    usable, source = usable_bytes()
    if usable is None:
        return DEFAULT_QUEUE_MAX // 4, "no memory figure found: 256 MiB"
    bound = int(usable * DEFAULT_QUEUE_FRACTION)
    bound = max(DEFAULT_QUEUE_MIN, min(DEFAULT_QUEUE_MAX, bound))
    return bound, (
        f"a quarter of the {source} ({usable / 2**20:.0f} MiB), "
        f"within [{DEFAULT_QUEUE_MIN >> 20}, {DEFAULT_QUEUE_MAX >> 20}] MiB"
    )


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of ``pid`` (default: this process) in bytes; 0 if it is gone."""
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def trim_heap() -> bool:
    """Hand the free pages of every glibc arena back to the kernel (``malloc_trim(0)``).

    :func:`common.serving.keep_freed_memory` raises glibc's trim threshold so forwards reuse
    their activations; the price is that a burst's request bodies and answers (below the mmap
    threshold, they come from the arenas) stay resident after it. Called once a burst has
    drained, this returns them. False where the C library has no ``malloc_trim`` (not glibc).
    """
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC is not None else None
    if trim is None:
        return False
    trim(0)
    return True


#: set to 0 to keep freed heap memory after a burst (to measure what the trim gives back)
TRIM_ENV = "OPD_MALLOC_TRIM"


def trim_soon(min_interval_s: float = 1.0) -> None:
    """:func:`trim_heap` off the event loop (a trim of a large heap takes milliseconds), or now
    when there is no running loop; nothing when ``OPD_MALLOC_TRIM=0``.

    At most one trim per ``min_interval_s``: a call sooner than that schedules one for when the
    interval is over (so the last burst of a series is trimmed too), once.
    """
    if os.environ.get(TRIM_ENV, "1").strip() == "0":
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        trim_heap()
        return
    if _trim.scheduled:
        return
    wait = _trim.last + min_interval_s - loop.time()
    if wait > 0:
        _trim.scheduled = True
        loop.call_later(wait, _trim_now, loop)
        return
    _trim_now(loop)


class _TrimState:
    last = float("-inf")  # loop time of the last trim
    scheduled = False


_trim = _TrimState()


def _trim_now(loop: asyncio.AbstractEventLoop) -> None:
    _trim.scheduled = False
    _trim.last = loop.time()
    loop.run_in_executor(None, trim_heap)
