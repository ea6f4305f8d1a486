"""The Ray Serve deployments use Serve's public API only: no import from ``ray.serve._private``
anywhere in the project (a Ray upgrade may change private modules without notice)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRIVATE = re.compile(r"ray\.serve\._private|from ray\.serve import _private|serve\._private")
SKIP = {".venv", ".git", "runs", "models", ".opd", "node_modules"}


def test_no_private_serve_api_anywhere() -> None:
    offenders = []
    for path in REPO.rglob("*"):
        if path.suffix not in {".py", ".yaml", ".yml", ".toml", ".cfg"} or not path.is_file():
            continue
        if SKIP & set(path.relative_to(REPO).parts) or path == Path(__file__):
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if PRIVATE.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == []


def test_serve_endpoints_parse_in_the_registry() -> None:
    from services.router.registry import Endpoint, RegistryError, spec_from_doc
    from services.router.serve_transport import split

    spec = spec_from_doc("a", {"endpoints": ["serve://teacher-a#teacher-a"]})
    assert spec.endpoints == (Endpoint("serve://teacher-a", "teacher-a"),)
    assert split("serve://teacher-a/v2/models/teacher-a/infer") == (
        "teacher-a",
        "/v2/models/teacher-a/infer",
    )
    for bad in ("serve://", "serve://a/b", "tcp://x"):
        try:
            spec_from_doc("a", {"endpoints": [bad]})
        except RegistryError:
            continue
        raise AssertionError(f"{bad!r} accepted")
