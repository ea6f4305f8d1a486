"""Ctrl-C and SIGTERM during training: stop at once, but never half-way through committing a step.

``timeout``, schedulers and ``docker stop`` send SIGTERM, a user Ctrl-C (SIGINT). Either way the
trainer should save what a resumed run needs and exit with 128 + the signal number. A signal may
land anywhere, though: in the middle of an Adam update a checkpoint would hold half-updated
weights. So the trainer *holds* signals while a step commits (update, accounting, its log line)
and takes a held one at the end of that step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupt(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. A ``BaseException`` so that no ``except Exception`` on the way
    (a client's retry loop) mistakes it for a failed request; a ``KeyboardInterrupt`` so that if
    one ever got past the trainer the CLI would still report an interrupt, not a traceback."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalGuard:
    """While entered, SIGINT and SIGTERM raise :class:`Interrupt` in the main thread, unless held;
    a held signal is raised by the next :meth:`release`.

    It starts held (enter it, then release inside the ``try`` that handles :class:`Interrupt`)
    and holds again as it raises, so a second Ctrl-C cannot cut short the save the first one
    started. In a thread other than the main one it installs nothing (Python runs signal handlers
    only in the main thread, and only there can they be set), nor for a signal that is ignored.
    """

    def __init__(self) -> None:
        self.held = True
        self.pending: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                # an ignored signal stays ignored: a shell starts background jobs with SIGINT
                # ignored so that a Ctrl-C at the terminal does not reach them
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.held = True
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.pending is None:  # the first signal decides the exit status
            self.pending = signum
        if not self.held:
            self.held = True
            raise Interrupt(signum)

    def hold(self, *_: object) -> None:
        """Hold signals from now on (also usable as an optimizer step pre-hook)."""
        self.held = True

    def release(self) -> None:
        """Stop holding; raise :class:`Interrupt` if a signal came while held."""
        self.held = False
        if self.pending is not None:
            self.held = True
            raise Interrupt(self.pending)
