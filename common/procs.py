"""Starting services as child processes and learning their URL (port 0 friendly).

A service prints one line ``OPD_URL=<base url>`` on stdout once it is ready to serve; launchers
(tests, ``opd cluster``) read up to that line, then keep draining the output in a thread so the
child never blocks on a full pipe.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

URL_PREFIX = "OPD_URL="


def announce_url(url: str) -> None:
    """Tell a launcher that this service is ready at ``url`` (one flushed stdout line)."""
    sys.stdout.write(f"{URL_PREFIX}{url}\n")
    sys.stdout.flush()


@dataclass
class Service:
    """A running child service: its process, announced URL and the tail of its output."""

    proc: subprocess.Popen
    url: str
    tail: deque = field(default_factory=lambda: deque(maxlen=200))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return "".join(self.tail)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace_s`` for a clean exit, then SIGKILL. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL now (fault-injection tests)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def start_detached(
    cmd: list[str],
    log_path: str | Path,
    timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
    append: bool = False,
) -> tuple[int, str]:
    """Start ``cmd`` in its own session, output to ``log_path``, and wait for its URL line.

    The service outlives the caller (``opd cluster up`` exits while the cluster runs).
    ``append``: keep the log's earlier content (a restart: why the last one died is in it);
    only what this process writes is searched for its URL. Returns ``(pid, url)``.

    Raises:
        RuntimeError: the process exited or stayed silent past ``timeout_s`` (log tail included).
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = log_path.stat().st_size if append and log_path.is_file() else 0
    with log_path.open("a" if append else "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with log_path.open(errors="replace") as log:
            log.seek(start)
            lines = log.read().splitlines()
        for line in lines:
            if line.startswith(URL_PREFIX):
                return proc.pid, line[len(URL_PREFIX) :].strip()
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    exited = proc.poll()
    if exited is None:
        proc.kill()
    tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-40:])
    raise RuntimeError(f"{_no_url(cmd, exited, timeout_s)}; log {log_path}:\n{tail}")


def _no_url(cmd: list[str], exit_code: int | None, timeout_s: float) -> str:
    """Why a service never announced its URL: it exited (the log says why), or it hung."""
    if exit_code is not None:
        return f"{' '.join(cmd)} exited with status {exit_code} before announcing its URL"
    return f"{' '.join(cmd)} did not announce a URL within {timeout_s:.0f} s (killed)"


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def stop_pid(pid: int, grace_s: float = 10.0) -> bool:
    """SIGTERM ``pid``, wait up to ``grace_s`` for it to drain and exit, then SIGKILL.

    Returns True if it needed SIGKILL.
    """
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return False
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


def start_service(
    cmd: list[str],
    timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> Service:
    """Start ``cmd`` and wait for its ``OPD_URL=`` line.

    Raises:
        RuntimeError: the process exited or stayed silent past ``timeout_s``; the message holds
            the tail of its output.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=cwd,
        bufsize=1,
    )
    tail: deque = deque(maxlen=200)
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            if not found and line.startswith(URL_PREFIX):
                found.append(line[len(URL_PREFIX) :].strip())
                ready.set()
        ready.set()  # EOF: the process ended

    threading.Thread(target=pump, daemon=True, name=f"pump-{proc.pid}").start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            break
    if not found:
        exited = proc.poll()
        proc.kill()
        proc.wait(5)
        raise RuntimeError(f"{_no_url(cmd, exited, timeout_s)}; output:\n{''.join(tail)}")
    return Service(proc, found[0], tail)
