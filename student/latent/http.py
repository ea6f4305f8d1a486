"""The latent world's teachers over HTTP: the router's ``opd-router`` model, OIP v2 binary.

The same interface as :class:`student.latent.teachers.LocalLatentTeachers`, so the trainer runs
unchanged against served teachers. As the trainer's client (``submit`` / ``collect_parts``) it
streams: queried rollout states go out as soon as ``stream_chunk`` of them exist (the step's
last one at once), one request per chunk of ``B`` rollouts' states, carrying their times, each
row's teacher index (``route``: label routing by the prompt's family) and the rollouts'
conditioning; with ``cond_cache`` each chunk goes as one request per prompt family present, the
family's conditioning sent once per run under a ``cond_id`` (``latent-fam<F>``) and named by id
only after that (the teachers' cache): the prompt set is finite, so the cache key is the
prompt, not the step. ``guidance_scale`` is a request parameter (the teachers run the
unconditional rows themselves); the anchor answers as ``v_anchor``.
``query`` answers a set of prompted states at once (one request, or one per prompt family with
``cond_cache``).

It sends through the public client (:mod:`student.client`), the one implementation of the
wire path; it counts requests and bytes.
"""

from __future__ import annotations

import concurrent.futures
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from common.procs import Service, start_service
from services.teacher.backend import TensorSpec
from student.client import OPDClient, RetryPolicy, StepCost
from student.clients import Answer, QueryCost, TeacherClient, TeacherInfo
from student.latent.models import BASE_DIR, teacher_dir
from student.latent.teachers import (
    ANCHOR,
    LatentQuery,
    LatentSetupError,
    TeacherContract,
    family_routes,
    teacher_infos,
)
from student.latent.world import TEACHER_FAMILIES, World
from student.students import Prompts


class HttpLatentTeachers(TeacherClient):
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
        anchor: bool = False,
        retries: int = 5,
        max_in_flight: int = 8,
        stream_chunk: int = 12,
    ) -> None:
        """``stream_chunk``: queried rollout states per request (per family with the cache);
        12 covers a whole dense rollout of the latent world's 8 steps: on 2 shared cores fewer,
        larger requests beat finer streaming (docs/latent-world.md, the demo)."""
        self.url, self.names, self.world = url.rstrip("/"), list(names), world
        self.stream_chunk = max(1, stream_chunk)
        self.cond_cache, self.cond_prefix = cond_cache, "latent-fam"
        self.supervise, self.guidance_scale = supervise, guidance_scale
        policy = "average" if supervise == "average" else None
        self.client = OPDClient(
            self.url,
            timeout_s=timeout_s,
            guidance_scale=guidance_scale,
            policy=policy,
            retry=RetryPolicy(retries=retries),
            max_in_flight=max_in_flight,
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
        if anchor and ANCHOR not in self.client.anchors:
            self.client.close()
            raise LatentSetupError(
                f"Flow-OPD needs the anchor {ANCHOR!r} at the router {url} (it has "
                f"{', '.join(self.client.anchors) or 'none'}): start it with --anchor"
            )
        self.requests = self.bytes_sent = self.bytes_received = 0
        self.last_cost = StepCost()
        self.teachers = teacher_infos(self.names, {})  # digests: as the answers report them
        self.anchor = TeacherInfo(ANCHOR, "") if anchor else None
        #: this step's requests: the future and, when split by family, the step rows it answers
        self._inflight: list[tuple[concurrent.futures.Future, torch.Tensor | None]] = []
        self._submitted = 0  # states submitted this step (the next request's first row)
        self._buffer: list[tuple[torch.Tensor, torch.Tensor, Prompts]] = []  # the next chunk

    def contract(self) -> TeacherContract:
        """The router's declared contract (``GET /v2/models/opd-router``): its teachers' time
        convention, state shape and conditioning inputs."""
        import httpx

        doc = httpx.get(f"{self.url}/v2/models/opd-router", timeout=30.0).json()
        specs = {
            i["name"]: TensorSpec(i["name"], tuple(i["shape"][1:]), i.get("datatype", "FP32"))
            for i in doc.get("inputs", [])
        }
        conds = tuple(v for k, v in specs.items() if k not in ("x", "t", "route"))
        params = doc.get("parameters") or {}
        return TeacherContract(params.get("time_convention"), specs["x"], conds)

    def _route(self, labels: torch.Tensor) -> torch.Tensor | None:
        if self.supervise == "average":
            return None
        return torch.tensor([self.routes[int(f)] for f in labels], dtype=torch.int32)

    def submit(
        self, x: torch.Tensor, t: torch.Tensor, last: bool = False, prompts: Prompts | None = None
    ) -> None:
        """Queue states ``x [B, C, H, W]`` of the rollouts ``prompts``; the chunk goes out when
        it holds ``stream_chunk`` states or this is the step's ``last`` (the public client
        copies them; it blocks only while ``max_in_flight`` requests are out)."""
        if prompts is None:
            raise ValueError("latent teachers answer prompted states: give each state's prompts")
        self._buffer.append((x, t, prompts))
        if last or len(self._buffer) >= self.stream_chunk:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        chunk, self._buffer = self._buffer, []
        x, t = _cat([c[0] for c in chunk]), _cat([c[1] for c in chunk])
        labels = _cat([c[2].labels for c in chunk])
        cond = (  # the cache sends each family's own conditioning by id instead
            {}
            if self.cond_cache
            else {k: _cat([c[2].cond[k] for c in chunk]) for k in chunk[0][2].cond}
        )
        offset, self._submitted = self._submitted, self._submitted + len(x)
        sent = self._send(x, t, labels, cond, self.anchor is not None)
        self._inflight += [(fut, None if rows is None else rows + offset) for fut, rows in sent]

    def _send(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor,
        cond: dict[str, torch.Tensor],
        anchor: bool,
    ) -> list[tuple[concurrent.futures.Future, torch.Tensor | None]]:
        """Send states ``x [M, ...]`` of prompts ``labels [M]`` (conditioning ``cond``): one
        request, or with ``cond_cache`` one per family present naming its ``cond_id``. Returns
        each request's future and the rows of ``x`` it answers (``None``: all, in order)."""
        route = self._route(labels)
        if not self.cond_cache:
            return [(self.client.submit(x, t, cond=cond, labels=route, anchor=anchor), None)]
        sent = []
        for f, idx in self._by_family(labels):
            fut = self.client.submit(
                x[idx],
                t[idx],
                cond=self.world.cond(torch.tensor([f])),  # one row: broadcast
                cond_id=f"{self.cond_prefix}{f}",
                labels=None if route is None else route[idx],
                anchor=anchor,
            )
            sent.append((fut, idx))
        return sent

    @staticmethod
    def _by_family(labels: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """``(family, rows [M_f])`` for each prompt family present in ``labels``."""
        return [(f, (labels == f).nonzero().flatten()) for f in labels.unique().tolist()]

    def collect_parts(self) -> Iterator[tuple[list[Answer], QueryCost]]:
        """One group per request, in submit order, each as soon as it is answered; the step's
        cost (every request, resends included) comes with the last group."""
        self._flush()
        sent, self._inflight, self._submitted = self._inflight, [], 0
        try:
            for k, (fut, rows) in enumerate(sent):
                reply = self.client.wait([fut])[0]
                cost = self._take_cost() if k == len(sent) - 1 else QueryCost()
                teacher = reply.teacher.to(torch.int32)
                yield [Answer(reply.v, teacher, reply.v_anchor, rows)], cost
        finally:  # a failed or abandoned step: nothing of it may still be running after
            for fut, _ in sent:
                fut.cancel()
            concurrent.futures.wait([fut for fut, _ in sent])

    def _take_cost(self) -> QueryCost:
        self.last_cost = cost = self.client.step_cost()
        self.requests += cost.query.requests
        self.bytes_sent += cost.query.bytes_sent
        self.bytes_received += cost.query.bytes_received
        return cost.query

    def query(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, anchor: bool = False
    ) -> LatentQuery:
        """As :meth:`LocalLatentTeachers.query`, through the router.

        Without ``cond_cache``: one request, each row with its own prompt's conditioning. With
        it: one request per prompt family present (all in flight at once), its states only,
        the family's conditioning under ``cond_id`` ``latent-fam<F>`` (one row, sent the first
        time, or again when the server answers that it does not hold the id).
        """
        sent = self._send(x, t, labels, self.world.cond(labels), anchor)
        futs = [fut for fut, _ in sent]
        order = [torch.arange(len(labels)) if rows is None else rows for _, rows in sent]
        replies = self.client.wait(futs)
        where = torch.argsort(torch.cat(order), stable=True)  # back to row order
        v = torch.cat([r.v for r in replies])[where]
        teacher = torch.cat([r.teacher for r in replies])[where]
        v_anchor = torch.cat([r.v_anchor for r in replies])[where] if anchor else None
        self._take_cost()
        return LatentQuery(v, teacher, v_anchor)

    def close(self) -> None:
        self.client.close()


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` along dim 0; a single part as it is (the public client copies what it sends)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def router_command(teacher_url: str, anchor: bool = True) -> list[str]:
    """``opd serve router --policy label`` over the latent teachers of the one teacher process
    at ``teacher_url`` (its adapters ``a``, ``b``), with its base as the anchor when ``anchor``."""
    cmd = [sys.executable, "-m", "common.cli", "serve", "router", "--port", "0"]
    cmd += ["--policy", "label"]
    cmd += [a for n in TEACHER_FAMILIES for a in ("--teacher", f"{n}={teacher_url}#{n}")]
    return cmd + (["--anchor", f"base={teacher_url}#{BASE_DIR}"] if anchor else [])


@contextmanager
def serve_latent(models: Path, threads: int = 1) -> Iterator[tuple[Service, Service]]:
    """Serve the latent models as the project deploys them: one ``opd serve teacher`` process
    holding the base once with adapters ``a`` and ``b``, and ``opd serve router --policy label``
    over them (``base`` as the anchor). Yields ``(teacher, router)``; both stop on exit."""
    py, repo = sys.executable, str(Path(__file__).resolve().parents[2])
    teacher = start_service(
        [py, "-m", "common.cli", "serve", "teacher", "--model-dir", str(models / BASE_DIR)]
        + [a for n in TEACHER_FAMILIES for a in ("--adapter", f"{n}={teacher_dir(models, n)}")]
        + ["--port", "0", "--threads", str(threads)],
        cwd=repo,
    )
    router = None
    try:
        router = start_service(router_command(teacher.url), cwd=repo)
        yield teacher, router
    finally:
        if router is not None:
            router.stop()
        teacher.stop()


@contextmanager
def served_teachers(models: Path, threads: int = 1) -> Iterator[str]:
    """:func:`serve_latent`, yielding the router's URL."""
    with serve_latent(models, threads) as (_, router):
        yield router.url
