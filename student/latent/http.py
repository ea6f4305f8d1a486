"""The latent world's teachers over HTTP: the router's ``opd-router`` model, OIP v2 binary.

The same interface as :class:`student.latent.teachers.LocalLatentTeachers` (``query``), so the
latent loop runs unchanged against served teachers: one request per optimizer step carrying the
queried states, their times, each row's teacher index (``route``: label routing by the prompt's
family) and each row's prompt conditioning; ``guidance_scale`` as a request parameter (the
teachers run the unconditional rows themselves); the anchor as ``v_anchor``. With
``cond_cache`` it sends one request per prompt family instead, the family's conditioning once
under a ``cond_id`` and then states only (the teachers' conditioning cache).

It sends through the public client (:mod:`student.client`), the one implementation of the
wire path; it counts requests and bytes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from common.procs import start_service
from student.client import OPDClient, StepCost
from student.latent.models import BASE_DIR, teacher_dir
from student.latent.teachers import LatentQuery, LatentSetupError, family_routes
from student.latent.world import TEACHER_FAMILIES, World


class HttpLatentTeachers:
    """Teachers ``names`` behind the router at ``url`` (registered in this order), through the
    public client (:class:`student.client.OPDClient`): its retries, bytes and cost accounting,
    its ``cond_id`` handling (tensors once, resent on the server's 'unknown cond_id')."""

    def __init__(
        self,
        url: str,
        names: Sequence[str],
        world: World,
        supervise: str = "router",
        guidance_scale: float | None = None,
        timeout_s: float = 60.0,
        cond_cache: bool = False,
    ) -> None:
        self.url, self.names, self.world = url.rstrip("/"), list(names), world
        self.cond_cache, self.cond_prefix = cond_cache, "latent-fam"
        self.supervise, self.guidance_scale = supervise, guidance_scale
        policy = "average" if supervise == "average" else None
        self.client = OPDClient(
            self.url, timeout_s=timeout_s, guidance_scale=guidance_scale, policy=policy
        )
        # route labels are the router's teacher indices: its registry order, not ours
        registered = self.client.teachers
        missing = [n for n in self.names if n not in registered]
        if missing:
            self.client.close()
            raise LatentSetupError(
                f"teacher {missing[0]!r} is not registered at the router {url} "
                f"(it has {', '.join(registered) or 'none'})"
            )
        ours = family_routes(self.names, [f for n in self.names for f in TEACHER_FAMILIES[n]])
        self.routes = {f: registered.index(self.names[k]) for f, k in ours.items()}
        self.requests = self.bytes_sent = self.bytes_received = 0
        self.last_cost = StepCost()

    def query(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, anchor: bool = False
    ) -> LatentQuery:
        """As :meth:`LocalLatentTeachers.query`, through the router.

        Without ``cond_cache``: one request, each row with its own prompt's conditioning. With
        it: one request per prompt family present (all in flight at once), its states only,
        the family's conditioning under ``cond_id`` ``latent-fam<F>`` (one row, sent the first
        time, or again when the server answers that it does not hold the id).
        """
        route = None
        if self.supervise != "average":
            route = torch.tensor([self.routes[int(f)] for f in labels], dtype=torch.int32)
        if not self.cond_cache:
            futs = [
                self.client.submit(x, t, cond=self.world.cond(labels), labels=route, anchor=anchor)
            ]
            order = [torch.arange(len(labels))]
        else:
            futs, order = [], []
            for f in labels.unique().tolist():
                idx = (labels == f).nonzero().flatten()
                order.append(idx)
                futs.append(
                    self.client.submit(
                        x[idx],
                        t[idx],
                        cond=self.world.cond(torch.tensor([f])),  # one row: broadcast
                        cond_id=f"{self.cond_prefix}{f}",
                        labels=None if route is None else route[idx],
                        anchor=anchor,
                    )
                )
        replies = self.client.wait(futs)
        where = torch.argsort(torch.cat(order), stable=True)  # back to row order
        v = torch.cat([r.v for r in replies])[where]
        teacher = torch.cat([r.teacher for r in replies])[where]
        v_anchor = torch.cat([r.v_anchor for r in replies])[where] if anchor else None
        self.last_cost = cost = self.client.step_cost()
        self.requests += cost.query.requests
        self.bytes_sent += cost.query.bytes_sent
        self.bytes_received += cost.query.bytes_received
        return LatentQuery(v, teacher, v_anchor)

    def close(self) -> None:
        self.client.close()


@contextmanager
def served_teachers(models: Path, threads: int = 1) -> Iterator[str]:
    """Serve the latent models as the project deploys them and yield the router's URL: one
    ``opd serve teacher`` process holding the base once with adapters ``a`` and ``b``, and
    ``opd serve router --policy label`` over them (``base`` as the anchor). Both are stopped
    on exit."""
    py, repo = sys.executable, str(Path(__file__).resolve().parents[2])
    teacher = start_service(
        [py, "-m", "common.cli", "serve", "teacher", "--model-dir", str(models / BASE_DIR)]
        + [a for n in TEACHER_FAMILIES for a in ("--adapter", f"{n}={teacher_dir(models, n)}")]
        + ["--port", "0", "--threads", str(threads)],
        cwd=repo,
    )
    router = None
    try:
        router = start_service(
            [py, "-m", "common.cli", "serve", "router", "--port", "0", "--policy", "label"]
            + [a for n in TEACHER_FAMILIES for a in ("--teacher", f"{n}={teacher.url}#{n}")]
            + ["--anchor", f"base={teacher.url}#{BASE_DIR}"],
            cwd=repo,
        )
        yield router.url
    finally:
        if router is not None:
            router.stop()
        teacher.stop()
