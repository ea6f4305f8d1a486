"""The OpenAPI document both services serve at ``GET /openapi.json``.

Built from the Open Inference Protocol's REST schema (kserve/open-inference-protocol,
``open_inference_rest.yaml``: server / model metadata, infer request and response) and its model
repository extension (index items ``name``, ``version``, ``state``, ``reason``), with every
status these services answer, not only the spec's 200: 400 (a request the schema or the model
refuses), 401 / 403 (admin calls), 404, 408 (a body that does not arrive), 413 (a body over the
limit), 422, 502 (router: an undecodable teacher answer), 503 with ``Retry-After`` (overload, no
live replica, an unloaded model) and a not-ready model's 503 (KServe's answer; Triton answers
400; either way only 200 means ready). FastAPI's own generator cannot describe the infer route:
it is answered below FastAPI (:class:`common.asgi.InferFastPath`) and reads two body encodings.
The schemathesis fuzz (``tests/services/test_openapi_fuzz.py``) holds both services to it.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

_ERROR = {"$ref": "#/components/schemas/error"}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before trying again (overload, no live replica)",
        "schema": {"type": "string"},
    }
}
_REASONS = {
    400: "Bad Request: the body or a parameter violates the schema or the model's inputs",
    401: "Unauthorized: an admin call without 'Authorization: Bearer <token>'",
    403: "Forbidden: a wrong token, or admin calls disabled (no token configured)",
    404: "Not Found: no such model (or version, or teacher)",
    405: "Method Not Allowed",
    408: "Request Timeout: the body did not arrive in time",
    413: "Content Too Large: the body exceeds the server's limit",
    422: "Unprocessable: an input the model does not declare, a refused registry change, or a query parameter of the wrong type",
    500: "Internal Server Error",
    501: "Not Implemented in this deployment",
    502: "Bad Gateway: a teacher answered something undecodable",
    503: "Service Unavailable: overloaded, unloaded, or no live replica; see Retry-After",
}

SCHEMAS: dict[str, Any] = {
    "error": {
        "type": "object",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
    },
    "parameters": {"type": "object"},
    "metadata_server_response": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "version", "extensions"],
    },
    "metadata_tensor": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
        "required": ["name", "datatype", "shape"],
    },
    "metadata_model_response": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/metadata_tensor"}},
            "outputs": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/metadata_tensor"},
            },
            "parameters": {"$ref": "#/components/schemas/parameters"},
        },
        "required": ["name", "platform"],
    },
    "tensor_data": {
        "type": "array",
        "items": {
            "anyOf": [
                {"$ref": "#/components/schemas/tensor_data"},
                {"type": "number"},
                {"type": "string"},
                {"type": "boolean"},
            ]
        },
    },
    "request_input": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string"},
            "parameters": {"$ref": "#/components/schemas/parameters"},
            "data": {"$ref": "#/components/schemas/tensor_data"},
        },
        "required": ["name", "shape", "datatype", "data"],
    },
    "request_output": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "parameters": {"$ref": "#/components/schemas/parameters"},
        },
        "required": ["name"],
    },
    "inference_request": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "parameters": {"$ref": "#/components/schemas/parameters"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/request_input"}},
            "outputs": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/request_output"},
            },
        },
        "required": ["inputs"],
    },
    "response_output": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"},
            "parameters": {"$ref": "#/components/schemas/parameters"},
            "data": {"$ref": "#/components/schemas/tensor_data"},
        },
        # a binary output carries parameters.binary_data_size instead of data
        "required": ["name", "shape", "datatype"],
    },
    "inference_response": {
        "type": "object",
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": {"$ref": "#/components/schemas/parameters"},
            "outputs": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/response_output"},
            },
        },
        "required": ["model_name", "outputs"],
    },
    "repository_index_request": {
        "type": "object",
        "properties": {"ready": {"type": "boolean"}},
    },
    "repository_index_response": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "state": {"type": "string"},
                "reason": {"type": "string"},
            },
            "required": ["name", "state", "reason"],
        },
    },
    "repository_load_request": {
        "type": "object",
        "properties": {"parameters": {"$ref": "#/components/schemas/parameters"}},
    },
    "live": {
        "type": "object",
        "properties": {"live": {"type": "boolean"}},
        "required": ["live"],
    },
    "ready": {
        "type": "object",
        "properties": {"ready": {"type": "boolean"}},
        "required": ["ready"],
    },
    "model_ready": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
        "required": ["ready"],
    },
    "object": {"type": "object"},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def responses(ok: dict[str, Any] | None, *errors: int, ok_status: int = 200) -> dict[str, Any]:
    """A responses object: ``ok`` (content) under ``ok_status`` and an ``{"error"}`` body for
    each of ``errors`` (503 with ``Retry-After``)."""
    out: dict[str, Any] = {str(ok_status): {"description": "OK"}}
    if ok is not None:
        out[str(ok_status)]["content"] = ok
    for status in errors:
        entry: dict[str, Any] = {"description": _REASONS[status], "content": _json(_ERROR)}
        if status == 503:
            entry["headers"] = copy.deepcopy(_RETRY_AFTER)
        out[str(status)] = entry
    return out


def _name(param: str = "name") -> dict[str, Any]:
    return {"name": param, "in": "path", "required": True, "schema": {"type": "string"}}


_INFER_ERRORS = (400, 404, 408, 413, 422, 503)
_HEADER_LENGTH = {
    "name": "Inference-Header-Content-Length",
    "in": "header",
    "required": False,
    "description": "binary tensor extension: length of the JSON header before the tensor bytes",
    "schema": {"type": "integer", "minimum": 1},
}
_ADMIN = [{"bearer": []}]


def infer_operation(extra_errors: tuple[int, ...] = ()) -> dict[str, Any]:
    """``POST .../infer``: a JSON infer document, or the binary tensor extension's body."""
    return {
        "summary": "Inference (OIP v2; JSON tensors or the binary tensor extension)",
        "parameters": [_HEADER_LENGTH],
        "requestBody": {
            "required": True,
            "content": {
                **_json(_ref("inference_request")),
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        "responses": {
            **responses(
                {
                    **_json(_ref("inference_response")),
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
                *sorted(set(_INFER_ERRORS + extra_errors)),
            )
        },
    }


def oip_paths(
    versions: bool, load_errors: tuple[int, ...] | None, infer_errors: tuple[int, ...] = ()
) -> dict[str, Any]:
    """The OIP v2 paths both services serve (``versions``: the per-version routes too; the
    load / unload routes when ``load_errors`` is not None, and they and infer may also answer
    ``load_errors`` / ``infer_errors``)."""
    ready_model = {
        "get": {
            "summary": "Model Ready (200 ready; 503 not ready)",
            "parameters": [_name()],
            "responses": {
                **responses(_json(_ref("model_ready")), 404),
                "503": {
                    "description": "the model is not ready (unloaded, or no live replica)",
                    "content": _json(_ref("model_ready")),
                },
            },
        }
    }
    meta = {
        "get": {
            "summary": "Model Metadata",
            "parameters": [_name()],
            "responses": responses(_json(_ref("metadata_model_response")), 404, 503),
        }
    }
    paths: dict[str, Any] = {
        "/v2/health/live": {
            "get": {"summary": "Server Live", "responses": responses(_json(_ref("live")))}
        },
        "/v2/health/ready": {
            "get": {
                "summary": "Server Ready (200 ready; 503 not ready)",
                "responses": {
                    **responses(_json(_ref("ready"))),
                    "503": {"description": "not ready", "content": _json(_ref("ready"))},
                },
            }
        },
        "/v2": {
            "get": {
                "summary": "Server Metadata",
                "responses": responses(_json(_ref("metadata_server_response"))),
            }
        },
        "/v2/models/{name}": meta,
        "/v2/models/{name}/ready": ready_model,
        "/v2/models/{name}/infer": {
            "post": {**infer_operation(infer_errors), "parameters": [_name(), _HEADER_LENGTH]}
        },
        "/v2/repository/index": {
            "post": {
                "summary": "Repository Index (model repository extension)",
                "requestBody": {
                    "required": False,
                    "content": _json(_ref("repository_index_request")),
                },
                "responses": responses(_json(_ref("repository_index_response")), 400),
            }
        },
    }
    for op in ("load", "unload") if load_errors is not None else ():
        paths[f"/v2/repository/models/{{name}}/{op}"] = {
            "post": {
                "summary": f"Repository {op.title()} (admin: Bearer token)",
                "security": _ADMIN,
                "parameters": [_name()],
                "requestBody": {
                    "required": False,
                    "content": _json(_ref("repository_load_request")),
                },
                "responses": responses(
                    _json(_ref("object")), 400, 401, 403, 404, *(load_errors or ())
                ),
            }
        }
    if versions:
        version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
        for suffix, item in (("", meta), ("/ready", ready_model)):
            op = copy.deepcopy(item)
            op["get"]["parameters"].append(version)
            paths[f"/v2/models/{{name}}/versions/{{version}}{suffix}"] = op
        paths["/v2/models/{name}/versions/{version}/infer"] = {
            "post": {
                **infer_operation(infer_errors),
                "parameters": [_name(), version, _HEADER_LENGTH],
            }
        }
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics",
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
    return paths


def document(title: str, version: str, paths: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI 3.0 document over ``paths`` with the OIP component schemas."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": title,
            "version": version,
            "description": "Open Inference Protocol v2 (KServe v2 / Triton HTTP), binary tensor "
            "and model repository extensions",
        },
        "paths": paths,
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def serve_openapi(app: FastAPI, doc: dict[str, Any]) -> None:
    """Answer ``GET /openapi.json`` with ``doc`` (the apps have FastAPI's own generator off)."""
    app.openapi_schema = doc

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(doc)


def index_ready_only(body: bytes) -> bool:
    """``POST /v2/repository/index``'s request: nothing, or ``{"ready": bool}`` (True: only
    the models ready for inferencing).

    Raises:
        ValueError: a body that is not that object; the message says what is wrong.
    """
    if not body.strip():
        return False
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f'body is not valid JSON ({exc}); send {{}} or {{"ready": true}}'
        ) from None
    if not isinstance(doc, dict):
        raise ValueError('the index request must be a JSON object: {} or {"ready": true}')
    ready = doc.get("ready", False)
    if not isinstance(ready, bool):
        raise ValueError(f"'ready' must be a boolean, got {ready!r}")
    return ready
