"""The teacher registry: names → replicas (endpoints), what each serves, and the routing policy.

A :class:`Registry` is an immutable snapshot. A request takes the current snapshot once and
keeps it until it is answered, so a registry change (a swap of a teacher's endpoints) sends new
requests to the new endpoints at once while requests in flight finish where they started.
Replicas carry mutable health state (live / ejected, in-flight count); an unchanged teacher keeps
its :class:`Teacher` object, and so its replicas' health, across snapshots.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import httpx
import torch

from common import routing
from common.names import PLAIN_NAME_RULE, is_http_base_url, is_plain_name
from common.ring import NUM_MODES, centers_of
from services.router.negotiate import BINARY, encoding_of, server_extensions

Role = Literal["teacher", "anchor"]
log = logging.getLogger("opd.router")


class RegistryError(ValueError):
    """A registry that cannot be served; the message says which teacher/replica and why."""


class TeacherUnreachable(RegistryError):
    """A teacher did not answer at all (refused, timed out): may pass, worth another try."""


def check_name(name: str) -> str:
    """Teacher names appear in URLs and response parameter keys: keep them plain."""
    if not is_plain_name(name):
        raise RegistryError(f"teacher name {name!r} must be {PLAIN_NAME_RULE}")
    if name == "opd-router":
        raise RegistryError(
            "'opd-router' is the router's own model name; pick another teacher name"
        )
    return name


#: ``serve://APP``: a Serve application name (the Ray router's handle endpoints)
_SERVE_APP = re.compile(r"^serve://[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Endpoint:
    """One server of a teacher: base URL plus the served model's name (``None`` = ask its index)."""

    url: str
    model: str | None = None

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``http://host:port[#MODEL]`` → endpoint (trailing ``/`` dropped); also
        ``serve://APP[#MODEL]``, a Ray Serve application that the Ray router reaches by handle
        (:mod:`services.router.serve_transport`)."""
        text = text.strip()
        url, _, model = text.partition("#")
        url = url.rstrip("/")
        if not is_http_base_url(url) and not _SERVE_APP.match(url):
            raise RegistryError(
                f"endpoint {text!r} is not an http(s) base URL "
                "(write e.g. http://127.0.0.1:8001 or http://host:8001#teacher-a)"
            )
        return cls(url, model or None)

    def __str__(self) -> str:
        return f"{self.url}#{self.model}" if self.model else self.url


@dataclass(eq=False)
class Replica:
    """A resolved endpoint and its health. Mutated in place by the pool and the health checker."""

    endpoint: Endpoint
    version: str | None = None
    digest: str | None = None
    live: bool = True
    cause: str | None = None  # why it was ejected (or never admitted)
    inflight: int = 0
    failures: int = 0
    infer_url: str = ""
    #: what its server declares in ``GET /v2`` (None: not asked, e.g. a replica that has not
    #: answered yet); binary tensors only to one that declares ``binary_tensor_data``
    extensions: tuple[str, ...] | None = None
    encoding: str = BINARY

    def __post_init__(self) -> None:
        self.infer_url = f"{self.endpoint.url}/v2/models/{self.endpoint.model}/infer"

    def eject(self, cause: str) -> None:
        self.live, self.cause = False, cause
        self.failures += 1

    def admit(self) -> None:
        self.live, self.cause = True, None

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.endpoint.url,
            "model": self.endpoint.model,
            "live": self.live,
            "cause": self.cause,
            "version": self.version,
            "digest": self.digest,
            "inflight": self.inflight,
            "failures": self.failures,
            "encoding": self.encoding,
            "extensions": None if self.extensions is None else list(self.extensions),
        }

    def negotiated(self, extensions: tuple[str, ...]) -> None:
        """Take what the server declares: the encoding follows its extensions."""
        self.extensions, self.encoding = extensions, encoding_of(extensions)

    @property
    def binary(self) -> bool:
        return self.encoding == BINARY


@dataclass(frozen=True)
class InputSpec:
    """One input a teacher's model metadata declares: name, v2 datatype and shape (a leading
    ``-1`` for the batch; ``-1`` elsewhere: any size)."""

    name: str
    datatype: str | None
    shape: tuple[int, ...]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


#: Inputs every teacher takes besides its conditioning (``route`` is the router's own).
STATE_INPUTS = frozenset({"x", "t"})
#: Backends that accept a conditioning input ``c`` without declaring it: the toy teachers take
#: (and ignore) it, and a server that names no backend is taken for one of them.
_UNDECLARED_C = (None, "toy")


@dataclass(eq=False)
class Teacher:
    """A named teacher: its replicas (same checkpoint digest), its mode centers ``[M, D]`` and
    what its model metadata declares (inputs, backend, time convention).

    Derived once here, not per request: ``state_shape`` (``S`` of its input ``x [B, *S]``, or
    None when not declared), ``accepts`` (the conditioning inputs it takes, or None when its
    metadata lists no inputs: then anything goes) and ``row_shapes`` (their declared row
    shapes, ``-1`` = any size).
    """

    name: str
    replicas: list[Replica]
    role: Role = "teacher"
    digest: str | None = None
    modes: list[int] = field(default_factory=list)
    centers: torch.Tensor | None = None  # [M, D] float32, or None when unknown
    dim: int | None = None  # D of its input x [B, D] per its metadata, None when not declared
    pinned: bool = False  # modes / centers were given in its registry entry, not read from it
    rr: int = 0  # round-robin cursor among equally loaded replicas
    inputs: tuple[InputSpec, ...] = ()  # as its metadata lists them (empty: not listed)
    backend: str | None = None  # "toy" | "diffusers" | None (not said)
    time_convention: str | None = None  # what t means; None = unknown (not said)
    state_shape: tuple[int, ...] | None = field(init=False, default=None)
    accepts: frozenset[str] | None = field(init=False, default=None)
    row_shapes: dict[str, tuple[int, ...]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        declared = {s.name: s for s in self.inputs}
        x = declared.get("x")
        if x is not None and len(x.shape) >= 2:
            self.state_shape = tuple(x.shape[1:])
            if self.dim is None and len(x.shape) == 2 and x.shape[1] > 0:
                self.dim = x.shape[1]
        elif self.dim is not None:
            self.state_shape = (self.dim,)
        if declared:
            extra = set(declared) - STATE_INPUTS
            if self.backend in _UNDECLARED_C:
                extra.add("c")
            self.accepts = frozenset(extra)
            self.row_shapes = {n: tuple(s.shape[1:]) for n, s in declared.items() if n in extra}

    @property
    def version(self) -> str | None:
        versions = sorted({r.version for r in self.replicas if r.live and r.version})
        return ",".join(versions) or None

    @property
    def live_digests(self) -> list[str]:
        """The distinct checkpoints its live replicas serve: one, or more mid rolling swap."""
        return sorted({r.digest for r in self.replicas if r.live and r.digest})

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "digest": self.digest,
            "live_digests": self.live_digests,
            "version": self.version,
            "modes": self.modes,
            "mode_centers": None if self.centers is None else self.centers.tolist(),
            "backend": self.backend,
            "time_convention": self.time_convention,
            "inputs": [s.describe() for s in self.inputs],
            "replicas": [r.describe() for r in self.replicas],
        }


def convention_clash(teacher: Teacher, others: Iterable[Teacher]) -> str | None:
    """Why ``teacher`` cannot join ``others``: another teacher or anchor means something else by
    ``t`` (its ``time_convention`` differs), or None. Unknown conventions (None) clash with
    nothing: they are accepted with a warning (see :func:`convention_warning`)."""
    if teacher.time_convention is None:
        return None
    for other in others:
        if other.name == teacher.name or other.time_convention is None:
            continue
        if other.time_convention != teacher.time_convention:
            return (
                f"{teacher.role} {teacher.name!r} uses time convention "
                f"{teacher.time_convention!r} but {other.role} {other.name!r} uses "
                f"{other.time_convention!r}; every teacher and anchor of one router must share "
                "one time convention (the t a request sends must mean the same to each)"
            )
    return None


def convention_warning(teacher: Teacher) -> str | None:
    """A warning for a teacher that does not say what its ``t`` means (accepted as unknown)."""
    if teacher.time_convention is not None:
        return None
    return (
        f"{teacher.role} {teacher.name!r} declares no time_convention in its model metadata; "
        "accepted, but the router cannot check that its t means what the others' does"
    )


@dataclass(frozen=True)
class Registry:
    """Ordered teachers (their index is what ``teacher`` outputs report), anchors and the policy."""

    teachers: tuple[Teacher, ...] = ()
    anchors: tuple[Teacher, ...] = ()
    policy: str = "nearest"

    def __post_init__(self) -> None:
        if self.policy not in routing.POLICIES:
            raise RegistryError(
                f"unknown policy {self.policy!r}; choose one of {', '.join(routing.POLICIES)}"
            )

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.teachers]

    @property
    def centers(self) -> list[torch.Tensor | None]:
        return [t.centers for t in self.teachers]

    def all(self) -> tuple[Teacher, ...]:
        return self.teachers + self.anchors

    def get(self, name: str) -> Teacher | None:
        return next((t for t in self.all() if t.name == name), None)

    def anchor(self, name: str | None = None) -> Teacher | None:
        """The anchor called ``name``; with ``None`` the only (or first) anchor."""
        if name is None:
            return self.anchors[0] if self.anchors else None
        return next((a for a in self.anchors if a.name == name), None)

    def check(self, policy: str | None = None) -> None:
        """Refuse a registry that ``policy`` (default: its own) cannot serve.

        Raises:
            RegistryError: ``nearest`` with a teacher lacking mode centers, or centers of
                different dimensions.
        """
        policy = policy or self.policy
        if policy == "nearest" and self._nearest_refusal is not None:
            raise RegistryError(self._nearest_refusal)
        if self._convention_refusal is not None:
            raise RegistryError(self._convention_refusal)

    @cached_property
    def _convention_refusal(self) -> str | None:
        """Why the teachers and anchors cannot serve together (different time conventions),
        or None; once per snapshot."""
        everyone = self.all()
        for k, teacher in enumerate(everyone):
            if (clash := convention_clash(teacher, everyone[:k])) is not None:
                return clash
        return None

    @cached_property
    def nearest_table(self) -> routing.NearestTable:
        """The teachers' mode centers laid out for the nearest policy, once per snapshot.

        Raises:
            routing.RoutingError: a teacher has no mode centers.
        """
        return routing.nearest_table(self.centers)

    @cached_property
    def _nearest_refusal(self) -> str | None:
        """Why policy ``nearest`` cannot serve this snapshot, or None; worked out once per
        snapshot (snapshots never change), not on every request."""
        missing = [t.name for t in self.teachers if t.centers is None or t.centers.numel() == 0]
        if missing:
            latent = next(
                (t.state_shape for t in self.teachers if len(t.state_shape or ()) > 1), None
            )
            why = (
                f" (states of shape {list(latent)} come without them: nearest needs centers of "
                "dimension D = prod(S))"
                if latent
                else " (its metadata lists no mode_centers)"
            )
            return (
                f"policy 'nearest' needs mode centers for every teacher, but {', '.join(missing)} "
                f"has none{why}; use label or average routing (policy 'label' with a route "
                "input, or 'average'), or register it with modes"
            )
        dims = {int(t.centers.shape[1]) for t in self.teachers if t.centers is not None}
        if len(dims) > 1:
            return f"teachers' mode centers have different dimensions {sorted(dims)}"
        return None

    def with_teacher(self, teacher: Teacher) -> Registry:
        """A snapshot where ``teacher`` replaces its namesake (same index) or is appended."""
        group = "anchors" if teacher.role == "anchor" else "teachers"
        other = "teachers" if group == "anchors" else "anchors"
        if any(t.name == teacher.name for t in getattr(self, other)):
            raise RegistryError(
                f"{teacher.name!r} is registered as {other[:-1]}; delete it first "
                f"to register it as {group[:-1]}"
            )
        if (clash := convention_clash(teacher, self.all())) is not None:
            raise RegistryError(clash)
        current = list(getattr(self, group))
        idx = next((i for i, t in enumerate(current) if t.name == teacher.name), None)
        if idx is None:
            current.append(teacher)
        else:
            current[idx] = teacher
        new = replace(self, **{group: tuple(current)})
        new.check()
        return new

    def without(self, name: str) -> Registry:
        """A snapshot without ``name``; later teachers' indices shift down by one."""
        if self.get(name) is None:
            raise KeyError(name)
        return replace(
            self,
            teachers=tuple(t for t in self.teachers if t.name != name),
            anchors=tuple(t for t in self.anchors if t.name != name),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "teachers": [{"index": i, **t.describe()} for i, t in enumerate(self.teachers)],
            "anchors": [a.describe() for a in self.anchors],
        }


# --------------------------------------------------------------------------------------------
# Specs: what the user wrote (flags, env, file) before anything is contacted.


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher as configured: name, endpoints, role and optional modes / centers override."""

    name: str
    endpoints: tuple[Endpoint, ...]
    role: Role = "teacher"
    modes: tuple[int, ...] | None = None
    centers: tuple[tuple[float, ...], ...] | None = None


def parse_flag(text: str, role: Role = "teacher") -> TeacherSpec:
    """``NAME=URL[,URL...]`` → spec."""
    name, sep, urls = text.partition("=")
    if not sep or not urls.strip():
        raise RegistryError(
            f"--{role} {text!r}: write NAME=URL[,URL...], e.g. a=http://127.0.0.1:8001"
        )
    return TeacherSpec(
        check_name(name.strip()),
        tuple(Endpoint.parse(u) for u in urls.split(",") if u.strip()),
        role,
    )


def spec_from_doc(name: str, doc: Any, role: Role = "teacher") -> TeacherSpec:
    """A spec from a registry-file / API entry: a URL string, a list of URLs, or a mapping with
    ``endpoints`` and optional ``modes`` (ring mode indices) or ``mode_centers`` (``[M, D]``)."""
    check_name(name)
    if isinstance(doc, str):
        doc = {"endpoints": [doc]}
    elif isinstance(doc, list):
        doc = {"endpoints": doc}
    if not isinstance(doc, dict):
        raise RegistryError(
            f"teacher {name!r}: expected a URL, a list of URLs or a mapping, got {doc!r}"
        )
    eps = doc.get("endpoints", doc.get("urls"))
    if isinstance(eps, str):
        eps = [u for u in eps.split(",") if u.strip()]
    if not isinstance(eps, list) or not eps or not all(isinstance(u, str) for u in eps):
        raise RegistryError(f"teacher {name!r}: 'endpoints' must be a non-empty list of URLs")
    unknown = set(doc) - {"endpoints", "urls", "modes", "mode_centers", "role", "name"}
    if unknown:
        raise RegistryError(f"teacher {name!r}: unknown keys {sorted(unknown)}")
    modes = doc.get("modes")
    if modes is not None and (
        not isinstance(modes, list)
        or not modes
        or not all(isinstance(m, int) and not isinstance(m, bool) for m in modes)
        or not all(0 <= m < NUM_MODES for m in modes)
    ):
        raise RegistryError(
            f"teacher {name!r}: 'modes' must be a non-empty list of ring mode indices "
            f"0..{NUM_MODES - 1}, got {modes!r}"
        )
    centers = doc.get("mode_centers")
    if centers is not None:
        try:
            c = torch.tensor(centers, dtype=torch.float32)
        except (TypeError, ValueError):
            c = None
        if c is None or c.dim() != 2 or c.shape[0] == 0:
            raise RegistryError(f"teacher {name!r}: 'mode_centers' must be a [M, D] list of lists")
        centers = tuple(tuple(row) for row in c.tolist())
    role = doc.get("role", role)
    if role not in ("teacher", "anchor"):
        raise RegistryError(f"teacher {name!r}: role must be 'teacher' or 'anchor'")
    return TeacherSpec(
        name,
        tuple(Endpoint.parse(u) for u in eps),
        role,
        tuple(modes) if modes is not None else None,
        centers,
    )


def read_registry_file(path: Path) -> tuple[list[TeacherSpec], str | None]:
    """Specs and policy from a YAML or JSON file::

    policy: nearest
    teachers:
      a: [http://127.0.0.1:8001, http://127.0.0.1:8002]
      b: {endpoints: [http://127.0.0.1:8003#teacher-b], modes: [1, 3]}
    anchors:
      base: http://127.0.0.1:8004
    """
    if not path.is_file():
        raise RegistryError(f"registry file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except Exception as exc:  # yaml and json raise different types; both mean "unreadable"
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else exc
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise RegistryError(f"registry file {path} is not valid {kind}: {where}") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"registry file {path} must hold a mapping with 'teachers'")
    specs: list[TeacherSpec] = []
    for key, role in (("teachers", "teacher"), ("anchors", "anchor")):
        entries = doc.get(key) or {}
        if isinstance(entries, list):  # [{name: a, endpoints: [...]}, ...]
            entries = {e.get("name"): e for e in entries if isinstance(e, dict)}
        if not isinstance(entries, dict):
            raise RegistryError(f"registry file {path}: '{key}' must be a mapping or a list")
        specs += [spec_from_doc(str(n), d, role) for n, d in entries.items()]
    policy = doc.get("policy")
    return specs, policy


def merge_specs(*groups: Iterable[TeacherSpec]) -> list[TeacherSpec]:
    """Later groups override earlier ones by name; first appearance fixes the order."""
    out: dict[str, TeacherSpec] = {}
    for group in groups:
        for spec in group:
            out[spec.name] = spec
    return list(out.values())


# --------------------------------------------------------------------------------------------
# Discovery: contact the endpoints, read metadata, check digests.


def _centers_from(params: dict[str, Any]) -> torch.Tensor | None:
    raw = params.get("mode_centers")
    if isinstance(raw, str):  # servers restricted to scalar parameters may send JSON text
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return None
    if not raw:
        return None
    try:
        c = torch.tensor(raw, dtype=torch.float32)
    except (TypeError, ValueError):
        return None
    return c if c.dim() == 2 and c.shape[0] > 0 else None


def _modes_from(params: dict[str, Any]) -> list[int]:
    raw = params.get("modes")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return []
    return [int(m) for m in raw] if isinstance(raw, list) else []


def _error_text(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("error", resp.text))[:300]
    except (ValueError, AttributeError):
        return resp.text[:300]


def _state_dim(meta: dict[str, Any]) -> int | None:
    """D of input ``x`` ``[B, D]`` as the model metadata declares it, or None."""
    for spec in meta.get("inputs") or ():
        if isinstance(spec, dict) and spec.get("name") == "x":
            shape = spec.get("shape")
            if isinstance(shape, list) and len(shape) == 2 and isinstance(shape[1], int):
                return shape[1] if shape[1] > 0 else None
    return None


def inputs_of(meta: dict[str, Any]) -> tuple[InputSpec, ...]:
    """The inputs the model metadata lists (entries without a name or an integer shape are
    skipped: they say nothing the router could check)."""
    out = []
    for spec in meta.get("inputs") or ():
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            continue
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            continue
        datatype = spec.get("datatype")
        out.append(InputSpec(spec["name"], str(datatype) if datatype else None, tuple(shape)))
    return tuple(out)


def text_of(params: dict[str, Any], key: str) -> str | None:
    value = params.get(key)
    return str(value) if isinstance(value, str) and value else None


@dataclass
class Discovered:
    """What one endpoint said about itself: the replica (version, digest), modes, centers, D,
    its inputs, backend and time convention."""

    replica: Replica
    modes: list[int]
    centers: torch.Tensor | None
    dim: int | None = None
    inputs: tuple[InputSpec, ...] = ()
    backend: str | None = None
    time_convention: str | None = None


async def discover(client: httpx.AsyncClient, endpoint: Endpoint, timeout: float) -> Discovered:
    """Resolve the model name (repository index when not given) and read its metadata.

    Raises:
        RegistryError: unreachable, not an OIP v2 server, or an ambiguous repository.
    """
    try:
        model = endpoint.model
        if model is None:
            resp = await client.post(
                f"{endpoint.url}/v2/repository/index", json={}, timeout=timeout
            )
            if resp.status_code != 200:
                raise RegistryError(
                    f"{endpoint.url}: POST /v2/repository/index answered "
                    f"{resp.status_code} ({_error_text(resp)}); name the model "
                    "with URL#MODEL"
                )
            entries = resp.json()
            names = (
                [e.get("name") for e in entries if isinstance(e, dict)]
                if isinstance(entries, list)
                else []
            )
            if len(names) != 1:
                raise RegistryError(
                    f"{endpoint.url} serves {len(names)} models ({', '.join(map(str, names))}); "
                    "name the one to use with URL#MODEL"
                )
            model = names[0]
        resp = await client.get(f"{endpoint.url}/v2/models/{model}", timeout=timeout)
        if resp.status_code != 200:
            raise RegistryError(
                f"{endpoint.url}: model {model!r} metadata answered {resp.status_code} "
                f"({_error_text(resp)})"
            )
        meta = resp.json()
        extensions = await server_extensions(client, endpoint.url, timeout)
    except RegistryError:
        raise  # a ValueError too: not to be taken for bad JSON below
    except httpx.HTTPError as exc:
        raise TeacherUnreachable(
            f"{endpoint}: unreachable ({type(exc).__name__}: {exc or 'no detail'})"
        ) from None
    except ValueError as exc:  # JSON decode
        raise RegistryError(f"{endpoint}: not an OIP v2 server (bad JSON: {exc})") from None
    if not isinstance(meta, dict):
        raise RegistryError(f"{endpoint}: not an OIP v2 server (metadata is not an object)")
    params = meta.get("parameters") or {}
    version = params.get("version") or (meta.get("versions") or [None])[-1]
    digest = params.get("digest")
    replica = Replica(
        Endpoint(endpoint.url, model),
        str(version) if version is not None else None,
        str(digest) if digest else None,
    )
    replica.negotiated(extensions)
    return Discovered(
        replica,
        _modes_from(params),
        _centers_from(params),
        _state_dim(meta),
        inputs_of(meta),
        text_of(params, "backend"),
        text_of(params, "time_convention"),
    )


async def build_teacher(client: httpx.AsyncClient, spec: TeacherSpec, timeout: float) -> Teacher:
    """Contact every endpoint of ``spec`` concurrently and build the teacher.

    Unreachable replicas join ejected (the health checker admits them once they answer with the
    same digest); at least one must answer.

    Raises:
        RegistryError: no replica answered, or two replicas serve different digests.
    """
    found = await asyncio.gather(
        *(discover(client, e, timeout) for e in spec.endpoints), return_exceptions=True
    )
    for f in found:
        if isinstance(f, BaseException) and not isinstance(f, RegistryError):
            raise f
    ok = [f for f in found if isinstance(f, Discovered)]
    if not ok:
        causes = "; ".join(str(f) for f in found)
        # Only "nobody answered at all" is worth waiting out; a wrong server is not.
        kind = (
            TeacherUnreachable
            if all(isinstance(f, TeacherUnreachable) for f in found)
            else RegistryError
        )
        raise kind(f"teacher {spec.name!r}: no replica answered: {causes}")
    ref = ok[0]
    for other in ok[1:]:
        if other.time_convention != ref.time_convention:
            raise RegistryError(
                f"teacher {spec.name!r}: replica {other.replica.endpoint} uses time convention "
                f"{other.time_convention!r} but replica {ref.replica.endpoint} uses "
                f"{ref.time_convention!r}; replicas of one teacher must mean the same by t"
            )
        if other.replica.digest != ref.replica.digest:
            raise RegistryError(
                f"teacher {spec.name!r}: replica {other.replica.endpoint} serves checkpoint digest "
                f"{other.replica.digest} but replica {ref.replica.endpoint} serves "
                f"{ref.replica.digest}; replicas of one teacher must serve the same checkpoint"
            )
    replicas = []
    for e, f in zip(spec.endpoints, found, strict=True):
        if isinstance(f, Discovered):
            replicas.append(f.replica)
        else:
            r = Replica(Endpoint(e.url, e.model or ref.replica.endpoint.model))
            r.eject(f"not reachable at registration: {f}")
            replicas.append(r)
    if spec.centers is not None:
        centers = torch.tensor(spec.centers, dtype=torch.float32)
    elif spec.modes is not None:
        centers = centers_of(spec.modes)
    else:
        centers = ref.centers
    modes = list(spec.modes) if spec.modes is not None else ref.modes
    pinned = spec.modes is not None or spec.centers is not None
    teacher = Teacher(
        spec.name,
        replicas,
        spec.role,
        ref.replica.digest,
        modes,
        centers,
        ref.dim,
        pinned,
        inputs=ref.inputs,
        backend=ref.backend,
        time_convention=ref.time_convention,
    )
    shape = teacher.state_shape
    if centers is not None and shape is not None and min(shape) > 0:
        d = math.prod(shape)
        if int(centers.shape[1]) != d:
            given = "its mode_centers" if spec.centers is not None else "the ring modes"
            x = f"[B, {d}]" if len(shape) == 1 else f"[B, {', '.join(map(str, shape))}]"
            raise RegistryError(
                f"teacher {spec.name!r}: {given} have dimension {int(centers.shape[1])} but its "
                f"input x is {x} ({ref.replica.endpoint}); give centers of dimension {d}"
            )
    if (warning := convention_warning(teacher)) is not None:
        log.warning("%s", warning)
    for warning in standard_only_warnings(teacher, ref):
        log.warning("%s", warning)
    return teacher


def standard_only_warnings(teacher: Teacher, ref: Discovered) -> list[str]:
    """What a teacher served by a standards-only OIP v2 server goes without: the binary
    extension (its replicas get JSON) and the metadata beyond the standard (digest, version,
    mode centers) that this project's teachers add."""
    out = []
    json_only = [
        str(r.endpoint) for r in teacher.replicas if r.extensions is not None and not r.binary
    ]
    if json_only:
        out.append(
            f"{teacher.role} {teacher.name!r}: {', '.join(json_only)} declare(s) no "
            "binary_tensor_data extension in GET /v2; requests to them are JSON tensors"
        )
    missing = [
        key
        for key, value in (
            ("digest", ref.replica.digest),
            ("version", ref.replica.version),
            ("mode_centers", teacher.centers),
        )
        if value is None
    ]
    if missing and teacher.role == "teacher":
        out.append(
            f"teacher {teacher.name!r} ({ref.replica.endpoint}) declares no "
            f"{', '.join(missing)} in its model metadata parameters (a standards-only server); "
            + (
                "served by label or average routing: policy 'nearest' needs its mode centers "
                "(give 'modes' or 'mode_centers' in its registry entry)"
                if teacher.centers is None
                else "served without checkpoint tracking"
            )
        )
    return out


def refreshed(teacher: Teacher, replica: Replica, found: Discovered) -> Teacher | None:
    """``teacher`` after its ``replica`` was found serving a new checkpoint (``found``: that
    replica's metadata read again), or None while its live replicas disagree on the digest (a
    rolling swap in progress).

    The replica's version and digest are updated in place (the registry's view of it). Once
    every live replica serves one digest that is not ``teacher.digest``, the teacher takes that
    digest and, unless they were pinned by its registry entry, the new modes, centers and D.
    """
    replica.version, replica.digest = found.replica.version, found.replica.digest
    digests = teacher.live_digests
    if len(digests) != 1 or teacher.digest in digests:
        return teacher if len(digests) <= 1 else None
    # what the new checkpoint's server declares (inputs, backend, t) replaces the old always;
    # modes and centers only when the registry entry did not pin them
    declared = {
        "inputs": found.inputs,
        "backend": found.backend,
        "time_convention": found.time_convention,
    }
    if teacher.pinned:
        return replace(teacher, digest=found.replica.digest, **declared)
    return replace(
        teacher,
        digest=found.replica.digest,
        modes=found.modes,
        centers=found.centers,
        dim=found.dim,
        **declared,
    )


async def build_registry(
    client: httpx.AsyncClient, specs: Sequence[TeacherSpec], policy: str, timeout: float
) -> Registry:
    """Discover every teacher concurrently and check the result against ``policy``."""
    teachers = await asyncio.gather(*(build_teacher(client, s, timeout) for s in specs))
    reg = Registry(
        tuple(t for t in teachers if t.role == "teacher"),
        tuple(t for t in teachers if t.role == "anchor"),
        policy,
    )
    reg.check()
    return reg
