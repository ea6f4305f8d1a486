"""Container entrypoint: wait for what a service needs, then ``exec`` its command.

    OPD_WAIT_FOR="/models/teacher-a.safetensors http://router:8000/v2/health/ready"
    OPD_WAIT_TIMEOUT_S=600

Each item is an ``http(s)://`` URL (waited for until it answers 200) or a file path (waited for
until it exists). Compose's ``depends_on: condition: service_healthy`` does the same on Docker,
but podman runs no healthchecks by itself and podman-compose ignores the conditions, so the
containers wait for themselves. SIGTERM while waiting exits at once (PID 1 ignores signals that
have no handler).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import urllib.request
from pathlib import Path


def ready(item: str) -> bool:
    if item.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(item, timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False
    return Path(item).exists()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not argv:
        sys.stderr.write("entrypoint: no command given\n")
        return 2
    items = os.environ.get("OPD_WAIT_FOR", "").split()
    deadline = time.monotonic() + float(os.environ.get("OPD_WAIT_TIMEOUT_S", "600"))
    waiting = [i for i in items if not ready(i)]
    if waiting:
        sys.stderr.write(f"entrypoint: waiting for {' '.join(waiting)}\n")
    while waiting:
        if time.monotonic() > deadline:
            sys.stderr.write(f"entrypoint: gave up waiting for {' '.join(waiting)}\n")
            return 1
        time.sleep(0.5)
        waiting = [i for i in waiting if not ready(i)]
    sys.stderr.flush()
    os.execvp(argv[0], argv)
    return 127  # not reached


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
