"""A minimal, standards-only Open Inference Protocol v2 server: the third-party teacher.

Written from the OIP v2 REST spec alone, sharing no protocol code with this project: Python's
stdlib HTTP server and ``json``, the REST endpoints the spec requires (health, server and model
metadata, model ready, infer) and nothing else. It does **not** implement the binary tensor
extension: ``GET /v2`` answers ``"extensions": []``, and a request body that is not a JSON
document (e.g. the binary extension's raw tensor bytes) is refused with 400, as such a server
would. It answers ``v`` as FP64 (declared so), as many framework servers do. Its model
metadata lists only the standard fields (no ``parameters``: no version,
digest, mode centers or time convention), so the router must serve it on what the spec gives.

Run as a process (the tests do)::

    python -m tests.services.oip_json_peer CHECKPOINT NAME   # prints OPD_URL=http://127.0.0.1:PORT

The velocity comes from a toy checkpoint's network, so answers can be compared with this
project's own teacher serving the same weights.
"""

from __future__ import annotations

import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from common.checkpoint import read_model

_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(/ready|/infer)?$")


def make_handler(name: str, net: torch.nn.Module, dim: int) -> type[BaseHTTPRequestHandler]:
    """A request handler class serving model ``name`` (``x [B, dim]``, ``t [B]`` → ``v``)."""

    metadata = {
        "name": name,
        "versions": ["1"],
        "platform": "pytorch_torchscript",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, dim]},
            {"name": "t", "datatype": "FP32", "shape": [-1]},
        ],
        # FP64 out, as many framework servers answer: the router must take it (as FP32)
        "outputs": [{"name": "v", "datatype": "FP64", "shape": [-1, dim]}],
    }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as every production server does

        def log_message(self, *args: Any) -> None:  # quiet: the tests read stdout for the URL
            pass

        def _send(self, status: int, doc: Any) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            if self.path in ("/v2/health/live", "/v2/health/ready"):
                return self._send(200, {"live": True, "ready": True})
            if self.path == "/v2":
                return self._send(200, {"name": "json-peer", "version": "1", "extensions": []})
            m = _MODEL_PATH.match(self.path)
            if m is None or m.group(1) != name or m.group(2) == "/infer":
                return self._send(404, {"error": f"no such resource {self.path}"})
            if m.group(2) == "/ready":
                return self._send(200, {"name": name, "ready": True})
            return self._send(200, metadata)

        def do_POST(self) -> None:  # noqa: N802
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            m = _MODEL_PATH.match(self.path)
            if m is None or m.group(1) != name or m.group(2) != "/infer":
                return self._send(404, {"error": f"no such resource {self.path}"})
            try:
                doc = json.loads(raw.decode("utf-8"))  # raw tensor bytes fail here
                inputs = {i["name"]: i for i in doc["inputs"]}
                x = torch.tensor(inputs["x"]["data"], dtype=torch.float32).reshape(-1, dim)
                t = torch.tensor(inputs["t"]["data"], dtype=torch.float32).reshape(-1)
                if inputs["x"]["datatype"] != "FP32" or inputs["t"]["datatype"] != "FP32":
                    raise ValueError("x and t must be FP32")
                if x.shape[0] != t.shape[0]:
                    raise ValueError("x and t need the same batch size")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError, RuntimeError) as exc:
                return self._send(400, {"error": f"bad infer request: {exc}"})
            with torch.no_grad():
                v = net(x, t)
            out: dict[str, Any] = {
                "model_name": name,
                "outputs": [
                    {
                        "name": "v",
                        "datatype": "FP64",
                        "shape": list(v.shape),
                        "data": v.double().reshape(-1).tolist(),
                    }
                ],
            }
            if "id" in doc:
                out["id"] = doc["id"]
            return self._send(200, out)

    return Handler


def main(argv: list[str]) -> None:
    """``CHECKPOINT NAME``: serve it on a free loopback port and print ``OPD_URL=...``."""
    checkpoint, name = argv
    torch.set_num_threads(1)
    net, meta = read_model(checkpoint)
    dim = int(meta.arch.data_dim)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(name, net, dim))
    print(f"OPD_URL=http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
