"""The OIP v2 HTTP API of a teacher: a FastAPI app behind the raw-ASGI infer path.

:func:`build_api` holds the routes over a :class:`TeacherCore` (repository + how to run a forward
+ metrics), so the uvicorn process (:func:`create_app`) and the Ray Serve deployment serve the
very same API; only the forward runner differs (own batcher here, ``@serve.batch`` there). Infer
itself is a :class:`~common.asgi.InferFastPath` in front of the FastAPI routes.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.admission import ByteBudget, configured_budget
from common.asgi import InferFastPath
from common.httpapi import bare_app, error_response
from common.openapi import document, index_ready_only, oip_paths, serve_openapi
from common.threads import apply_threads, model_params, thread_budget
from services.teacher.batcher import Batcher, ForwardResult
from services.teacher.cond_cache import CondCache
from services.teacher.diffusers_repository import DiffusersRepository
from services.teacher.fastpath import infer_handler
from services.teacher.metrics import TeacherMetrics
from services.teacher.protocol import ProtocolError, read_body
from services.teacher.repository import ModelRepository, RepositoryError
from services.teacher.settings import TeacherSettings, admin_token_from_env

SERVER_NAME = "opd-teacher"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
ADMIN_BODY_LIMIT = 64 * 1024

#: the variable a deployment without flags (Ray Serve) sets the admission bound with
MAX_QUEUE_ENV = "OPD_TEACHER_MAX_QUEUE_MB"
#: body read and answer send deadlines when the deployment sets none
DEFAULT_BODY_TIMEOUT_S = DEFAULT_SEND_TIMEOUT_S = 30.0


def teacher_budget(max_queue_mb: float | None = None) -> ByteBudget:
    """The teacher's admission budget: ``--max-queue-mb``, else ``OPD_TEACHER_MAX_QUEUE_MB``,
    else derived from the memory the process may use (see :mod:`common.admission`)."""
    return configured_budget(max_queue_mb, "--max-queue-mb", MAX_QUEUE_ENV)[0]


#: runs a forward: (model snapshot, x [B, *S], t [B][, extra]) -> result with v [B, *S];
#: ``extra`` (conditioning and guidance of a diffusers model) is passed only when there is one
Runner = Callable[..., Awaitable[ForwardResult]]


@dataclass
class TeacherCore:
    """What the routes need: the repository, a forward runner, metrics, limits, the admin token,
    the conditioning cache (``cond_id``; shared by every model of the process), and the
    admission budget bounding the bytes held by infer requests (uvicorn and Ray alike)."""

    repository: ModelRepository | DiffusersRepository
    run: Runner
    metrics: TeacherMetrics
    max_body_bytes: int
    admin_token: str | None
    on_close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    conds: CondCache | None = None
    admission: ByteBudget = field(default_factory=teacher_budget)
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S


def teacher_openapi() -> dict[str, Any]:
    """The teacher's OpenAPI document (``GET /openapi.json``; :mod:`common.openapi`): infer may
    also answer 500 (a forward that failed is answered and named, the server keeps serving)."""
    paths = oip_paths(versions=True, load_errors=(413, 422), infer_errors=(500,))
    return document(SERVER_NAME, SERVER_VERSION, paths)


def build_api(core: TeacherCore, lifespan: Any = None, join: bool = False) -> InferFastPath:
    """The ASGI app serving ``core`` over OIP v2 (+ repository extension, ``/metrics``).

    ``join``: infer responses as one ``bytes`` body (Ray Serve) instead of header and tensor
    written separately (uvicorn: one copy fewer per binary output).

    Infer is answered by :class:`InferFastPath` (raw ASGI, no middleware on the hot path); every
    other route is a FastAPI route of the app it wraps (``.app``; its attributes show through).
    """
    repo, metrics = core.repository, core.metrics
    metrics.watch_admission(core.admission)
    app = bare_app(SERVER_NAME, SERVER_VERSION, lifespan)
    app.state.core = core

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            metrics.error("not_found")
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, f"invalid request: {exc.errors()}")

    @app.exception_handler(ProtocolError)
    async def _protocol_error(_: Request, exc: ProtocolError) -> JSONResponse:
        metrics.error(exc.kind)
        return error_response(exc.status, exc.message)

    @app.exception_handler(RepositoryError)
    async def _repository_error(_: Request, exc: RepositoryError) -> JSONResponse:
        return error_response(exc.status, str(exc))

    def unknown(name: str) -> ProtocolError:
        names = repo.names()
        serves = repr(names[0]) if len(names) == 1 else f"{names}"
        return ProtocolError(
            404,
            "not_found",
            f"unknown model {name!r}; this server serves {serves} (see POST /v2/repository/index)",
        )

    def served(name: str) -> Any:
        """The current snapshot of model ``name``; 404 unknown, 503 unloaded."""
        try:
            model = repo.get(name)
        except KeyError:
            raise unknown(name) from None
        if model is None:
            raise ProtocolError(
                503,
                "unavailable",
                f"model {name!r} is unloaded; load it with POST /v2/repository/models/{name}/load",
            )
        return model

    def check_version(model: Any, version: str | None) -> None:
        if version is not None and version != str(model.version):
            raise ProtocolError(
                404,
                "not_found",
                f"version {version!r} of {model_name(model)!r} is not "
                f"served; the current version is {model.version}",
            )

    def model_name(model: Any) -> str:
        return getattr(model, "name", None) or repo.names()[0]

    def model_for(name: str, version: str | None) -> Any:
        """The snapshot an infer request on ``name`` (and ``version``, if given) runs on."""
        model = served(name)
        check_version(model, version)
        return model

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = repo.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> dict:
        model = served(name)
        check_version(model, version)
        return model.metadata(name)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        try:
            model = repo.get(name)
        except KeyError:
            raise unknown(name) from None
        if model is not None:
            # a version this server does not serve is not found (404, as its metadata and
            # infer answer), not "not ready": only the served model can be (not) ready
            check_version(model, version)
        ok = model is not None
        # not ready: 503, as KServe answers (Triton answers 400); only 200 means ready
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    @app.post("/v2/repository/index")
    async def repository_index(request: Request) -> list:
        try:  # {"ready": true}: only the models ready for inferencing (the extension's filter)
            ready_only = index_ready_only(await read_body(request, ADMIN_BODY_LIMIT))
        except ValueError as exc:
            raise ProtocolError(400, "decode", str(exc)) from None
        return [e for e in repo.index() if e["state"] == "READY" or not ready_only]

    def check_admin(request: Request) -> None:
        if core.admin_token is None:
            raise StarletteHTTPException(
                403,
                "admin calls are disabled: start the server with "
                "OPD_ADMIN_TOKEN set to enable load/unload",
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise StarletteHTTPException(
                401,
                "admin call needs 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(given.strip().encode(), core.admin_token.encode()):
            raise StarletteHTTPException(403, "wrong admin token")

    async def admin_json(request: Request) -> dict:
        body = await read_body(request, ADMIN_BODY_LIMIT)
        if not body.strip():
            return {}
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(400, "decode", f"body is not valid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ProtocolError(400, "decode", "body must be a JSON object")
        return doc

    @app.post("/v2/repository/models/{name}/load")
    async def load(name: str, request: Request) -> JSONResponse:
        check_admin(request)
        if name not in repo.names() and not isinstance(repo, DiffusersRepository):
            raise unknown(name)  # a diffusers teacher serves a new adapter under a new name
        params = (await admin_json(request)).get("parameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError(400, "input", "parameters must be a JSON object")
        try:
            model, answer = await repo.load_named(name, params)
        except RepositoryError as exc:
            metrics.loads.labels(name, "failed").inc()
            return error_response(exc.status, f"load failed: {exc}{repo.kept(name)}")
        metrics.loads.labels(name, "ok").inc()
        metrics.version.labels(name).set(model.version)
        return JSONResponse(answer)

    @app.post("/v2/repository/models/{name}/unload")
    async def unload(name: str, request: Request) -> JSONResponse:
        check_admin(request)
        if name not in repo.names():
            raise unknown(name)
        await repo.unload_named(name)
        metrics.version.labels(name).set(0)
        return JSONResponse({"name": name, "state": "UNAVAILABLE"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    serve_openapi(app, teacher_openapi())
    return InferFastPath(app, infer_handler(core, model_for, join))


def create_app(settings: TeacherSettings, admin_token: str | None = None) -> InferFastPath:
    """The uvicorn teacher app: loads ``settings.checkpoint`` now (errors surface before binding).

    ``admin_token`` defaults to the ``OPD_ADMIN_TOKEN`` environment variable. The app's
    ``state.admission_line`` says the admission bound and how it was chosen.
    """
    budget, admission_line = configured_budget(
        settings.max_queue_mb, "--max-queue-mb", MAX_QUEUE_ENV
    )
    name = settings.served_name()
    if settings.model_dir is not None:
        repo: ModelRepository | DiffusersRepository = diffusers_repository(settings)
        apply_threads(settings.threads or thread_budget(model_params(repo.backend.transformer)))
    else:
        repo = ModelRepository(
            name, settings.root(), settings.device, settings.forward_chunk_states
        )
        if settings.synthetic:
            from services.teacher.synthetic import synthetic_model

            net, meta = synthetic_model(
                name, settings.state_dim, settings.width, settings.depth, settings.seed
            )
            repo.install(net, meta, Path("synthetic"))
        else:
            assert settings.checkpoint is not None  # the settings validator guarantees a source
            repo.load_now(settings.checkpoint)
        # Before the batcher starts its forward thread, which takes this thread's count.
        apply_threads(settings.threads or thread_budget(model_params(repo.current.net)))
    metrics = TeacherMetrics(name)
    metrics.version.labels(name).set(1)
    batcher = Batcher(
        settings.max_batch_states,
        settings.max_delay_ms / 1e3,
        metrics.observe_batch,
        max_bytes=settings.max_batch_bytes,
    )
    core = TeacherCore(
        repo,
        batcher.submit,
        metrics,
        settings.max_body_bytes,
        admin_token if admin_token is not None else admin_token_from_env(),
        on_close=[batcher.close],
        conds=CondCache(settings.cond_cache_bytes),
        admission=budget,
        body_timeout_s=settings.body_timeout_s,
        send_timeout_s=settings.send_timeout_s,
    )
    metrics.watch_cond_cache(core.conds)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        for close in core.on_close:
            await close()

    app = build_api(core, lifespan=lifespan)
    app.state.admission_line = admission_line
    return app


def diffusers_repository(settings: TeacherSettings) -> DiffusersRepository:
    """The base model of ``settings.model_dir`` and its ``--adapter`` LoRAs, loaded now.

    Raises:
        RepositoryError: the directory or an adapter cannot be served (the message says why).
    """
    assert settings.model_dir is not None
    return load_diffusers(
        settings.model_dir,
        settings.served_name(),
        settings.root(),
        settings.adapters(),
        settings.dtype,
        settings.device,
    )


def load_diffusers(
    model_dir: Path,
    name: str,
    root: Path,
    adapters: dict[str, Path],
    dtype: str = "fp32",
    device: str = "cpu",
) -> DiffusersRepository:
    """A :class:`DiffusersRepository` serving ``model_dir`` as ``name`` and each of
    ``adapters`` (name -> LoRA path) on it; load calls read under ``root``. Blocking.

    Raises:
        RepositoryError: the directory or an adapter cannot be served (the message says why).
    """
    from services.teacher.diffusers_backend import DiffusersLoadError, load_backend

    try:
        backend = load_backend(model_dir, dtype, device)
    except DiffusersLoadError as exc:
        raise RepositoryError(str(exc), 400) from None
    repo = DiffusersRepository(name, backend, root)
    for adapter, path in adapters.items():
        repo.add_adapter_now(adapter, path)
    return repo
