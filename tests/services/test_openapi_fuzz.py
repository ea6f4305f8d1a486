"""Schema-driven property-based fuzz of both services' OpenAPI (schemathesis + hypothesis).

Each service's own ``GET /openapi.json`` (:mod:`common.openapi`: the OIP v2 REST schema plus
every status these services answer) drives generated requests against a real teacher process
and a real router process in front of real teachers: schema-conforming requests (which are
mostly not valid inputs for the model) and schema-violating ones. Every answer must be a
non-5xx, with a documented status, content type, headers and body schema, and a request that
violates the schema must be refused (4xx). Bounded: a fixed number of examples per operation
and no shrinking, so both run in well under two minutes on two cores.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from common.procs import Service
from tests.services.router_helpers import start_router, start_teacher

#: examples per operation and generation mode; with ~14 operations per service this is a few
#: hundred requests per service
MAX_EXAMPLES = 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,  # the host is shared: timing is not what this test checks
    derandomize=True,  # the same requests every run: a failure reproduces
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],  # no shrinking: bounded time
)


def fuzz(url: str, model: str) -> tuple[Counter, list[str]]:
    """Run every operation of ``url``'s OpenAPI in both generation modes, those on a model also
    with the served ``model``'s name (a random name only ever meets the 404 before the body is
    read); returns the statuses answered per (operation, mode, status) and one line per
    failure (operation, mode, the check's message)."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures: list[str] = []
    statuses: Counter = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        names = [None, model] if "{name}" in operation.path else [None]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for name in names:
                try:
                    _runner(operation, mode, statuses, name)()
                except Unsatisfiable:  # nothing to violate (no parameters, no body)
                    continue
                except Exception as exc:  # a check failed: record it, fuzz the rest
                    failures.append(f"{operation.label} [{mode.value}, {name}]: {exc}"[:2000])
    return statuses, failures


def _runner(operation, mode: GenerationMode, statuses: Counter, name: str | None):
    """The hypothesis test of one operation in one generation mode (``name``: the model or
    teacher name in its path, else generated)."""
    fixed = {"path_parameters": {"name": name}} if name else {}

    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    @FUZZ
    def run(case) -> None:
        response = case.call_and_validate(checks=CHECKS)
        statuses[(operation.label, mode.value, response.status_code)] += 1
        assert response.status_code < 500  # said again: what this fuzz exists to rule out

    return run


def _summary(statuses: Counter) -> str:
    by_status = Counter()
    for (_, _, status), n in statuses.items():
        by_status[status] += n
    return ", ".join(f"{s}: {n}" for s, n in sorted(by_status.items()))


@pytest.fixture(scope="module")
def teacher(tiny_models: Path):
    t = start_teacher(tiny_models / "teacher-a.safetensors", "a")
    yield t
    t.stop()


@pytest.fixture(scope="module")
def router(tiny_models: Path):
    teachers = [
        start_teacher(tiny_models / f"{ckpt}.safetensors", name)
        for name, ckpt in (("a", "teacher-a"), ("b", "teacher-b"))
    ]
    router = start_router("--teacher", f"a={teachers[0].url}", "--teacher", f"b={teachers[1].url}")
    yield router
    for s in (router, *teachers):
        s.stop()


def test_teacher_answers_every_request_as_documented(teacher: Service) -> None:
    statuses, failures = fuzz(teacher.url, "a")
    assert not failures, "\n\n".join(failures)
    operations = {op for op, _, _ in statuses}
    assert len(operations) == 13, operations  # every documented operation answered
    print("teacher statuses:", _summary(statuses))


def test_router_answers_every_request_as_documented(router: Service) -> None:
    statuses, failures = fuzz(router.url, "opd-router")
    assert not failures, "\n\n".join(failures)
    operations = {op for op, _, _ in statuses}
    assert len(operations) == 12, operations
    print("router statuses:", _summary(statuses))
