"""``opd serve teacher``: one teacher as a uvicorn process on a socket it binds itself.

Binding the socket here (not in uvicorn) makes ``--port 0`` work: the kernel picks the port, we
read it back, and announce the URL (``OPD_URL=...``) once uvicorn has started serving on it.
"""

from __future__ import annotations

import sys

from common.cli import Command, UsageError
from common.serving import keep_freed_memory, run_async, serve_app
from common.threads import threads_line
from services.teacher.app import create_app
from services.teacher.repository import RepositoryError
from services.teacher.settings import TeacherSettings


async def serve(settings: TeacherSettings) -> None:
    """Load the checkpoint, bind, serve until SIGINT/SIGTERM (uvicorn handles both cleanly)."""
    try:
        app = create_app(settings)
    except RepositoryError as exc:
        raise UsageError(str(exc)) from None
    # Said at start: a teacher on too many (or too few) threads is the first thing to rule out
    # when a cluster runs slow (README 'CPU threads').
    print(f"opd serve teacher: {threads_line()}", file=sys.stderr, flush=True)
    # Said at start too: what the teacher admits before it answers 503 (README 'Overload').
    print(f"opd serve teacher: {app.state.admission_line}", file=sys.stderr, flush=True)
    await serve_app(app, settings.host, settings.port, settings.log_level)


def run_teacher(settings: TeacherSettings) -> int:
    keep_freed_memory()  # forwards reuse their activation memory instead of page-faulting it
    run_async(serve(settings))
    return 0


TEACHER = Command(
    "serve one teacher checkpoint over OIP v2 (uvicorn)", TeacherSettings, run_teacher
)
