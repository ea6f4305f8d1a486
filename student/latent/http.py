"""The latent world's teachers over HTTP: the router's ``opd-router`` model, OIP v2 binary.

The same interface as :class:`student.latent.teachers.LocalLatentTeachers` (``query``), so the
latent loop runs unchanged against served teachers: one request per optimizer step carrying the
queried states, their times, each row's teacher index (``route``: label routing by the prompt's
family) and each row's prompt conditioning; ``guidance_scale`` as a request parameter (the
teachers run the unconditional rows themselves); the anchor as ``v_anchor``. With
``cond_cache`` it sends one request per prompt family instead, the family's conditioning once
under a ``cond_id`` and then states only (the teachers' conditioning cache).

A small client for this loop, not the trainer's streaming one (issue 18 item 1 makes that
public and conditioned); it counts requests and bytes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch

from common.codec import decode_response, encode_request
from common.procs import start_service
from student.latent.models import BASE_DIR, teacher_dir
from student.latent.teachers import LatentQuery, LatentSetupError, family_routes
from student.latent.world import TEACHER_FAMILIES, World

HEADER_LENGTH = "Inference-Header-Content-Length"
ROUTER_MODEL = "opd-router"


class UnknownCondId(RuntimeError):
    """The server does not hold a ``cond_id`` (never sent there, or dropped by its LRU)."""


class HttpLatentTeachers:
    """Teachers ``names`` behind the router at ``url`` (registered in this order)."""

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
        self.cond_cache, self._sent = cond_cache, set[int]()  # families the server was sent
        self.cond_prefix = "latent-fam"
        self.supervise, self.guidance_scale = supervise, guidance_scale
        self.http = httpx.Client(timeout=timeout_s)
        # route labels are the router's teacher indices: its registry order, not ours
        registered = [t["name"] for t in self._get("/v1/teachers")["teachers"]]
        missing = [n for n in self.names if n not in registered]
        if missing:
            self.http.close()
            raise LatentSetupError(
                f"teacher {missing[0]!r} is not registered at the router {url} "
                f"(it has {', '.join(registered) or 'none'})"
            )
        ours = family_routes(self.names, [f for n in self.names for f in TEACHER_FAMILIES[n]])
        self.routes = {f: registered.index(self.names[k]) for f, k in ours.items()}
        self.requests = self.bytes_sent = self.bytes_received = 0

    def _get(self, path: str) -> dict:
        r = self.http.get(self.url + path)
        if r.status_code != 200:
            raise RuntimeError(f"router {self.url}{path} answered {r.status_code}: {r.text[:300]}")
        return r.json()

    def query(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, anchor: bool = False
    ) -> LatentQuery:
        """As :meth:`LocalLatentTeachers.query`, through the router.

        Without ``cond_cache``: one request, each row with its own prompt's conditioning. With
        it: one request per prompt family present, its states only, the family's conditioning
        under ``cond_id`` ``latent-fam<F>`` (one row, sent the first time, or again when the
        server answers that it does not hold the id: an LRU may have dropped it).
        """
        outputs = ["v", "teacher", *(["v_anchor"] if anchor else [])]
        params: dict = {}
        if self.supervise == "average":
            params["policy"] = "average"
        if self.guidance_scale is not None:
            params["guidance_scale"] = self.guidance_scale
        states = {
            "x": x.numpy().astype(np.float32, copy=False),
            "t": t.numpy().astype(np.float32, copy=False),
        }
        route = np.array([self.routes[int(f)] for f in labels], dtype=np.int32)
        if not self.cond_cache:
            inputs = {**states, **{k: c.numpy() for k, c in self.world.cond(labels).items()}}
            if self.supervise != "average":
                inputs["route"] = route
            out = self._infer(inputs, params, outputs)
        else:
            out = {k: [] for k in outputs}
            order = []
            for f in labels.unique().tolist():
                idx = (labels == f).nonzero().flatten().numpy()
                order.append(idx)
                inputs = {k: a[idx] for k, a in states.items()}
                if self.supervise != "average":
                    inputs["route"] = route[idx]
                part = self._infer_cached(int(f), inputs, params, outputs)
                for k in outputs:
                    out[k].append(part[k])
            where = np.argsort(np.concatenate(order), kind="stable")  # back to row order
            out = {k: np.concatenate(v)[where] for k, v in out.items()}
        v_anchor = torch.from_numpy(np.array(out["v_anchor"])) if anchor else None
        return LatentQuery(
            torch.from_numpy(np.array(out["v"])),
            torch.from_numpy(np.array(out["teacher"]).astype(np.int64)),
            v_anchor,
        )

    def _infer_cached(
        self, family: int, inputs: dict[str, np.ndarray], params: dict, outputs: list[str]
    ) -> dict[str, np.ndarray]:
        """One family's request by ``cond_id``; the conditioning goes along when the server
        may not hold it (first use, or its 422 'unknown cond_id')."""
        params = {**params, "cond_id": f"{self.cond_prefix}{family}"}
        one = {k: c.numpy() for k, c in self.world.cond(torch.tensor([family])).items()}
        if family in self._sent:
            try:
                return self._infer(inputs, params, outputs)
            except UnknownCondId:
                pass
        self._sent.add(family)
        return self._infer({**inputs, **one}, params, outputs)

    def _infer(
        self, inputs: dict[str, np.ndarray], params: dict, outputs: list[str]
    ) -> dict[str, np.ndarray]:
        body, headers = encode_request(inputs, outputs=outputs, parameters=params or None)
        r = self.http.post(
            f"{self.url}/v2/models/{ROUTER_MODEL}/infer", content=body, headers=headers
        )
        self.requests += 1
        self.bytes_sent += len(body)
        self.bytes_received += len(r.content)
        if r.status_code == 422 and "unknown cond_id" in r.text:
            raise UnknownCondId(r.text)
        if r.status_code != 200:
            raise RuntimeError(f"router answered {r.status_code}: {r.text[:500]}")
        return decode_response(r.content, r.headers.get(HEADER_LENGTH)).tensors

    def close(self) -> None:
        self.http.close()


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
