"""The Ray deployment files parse, and their application args are what the builders accept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _serve_config() -> dict:
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay-rayservice.yaml").read_text()))
    kinds = [d["kind"] for d in docs]
    assert kinds[0] == "RayService" and "PersistentVolumeClaim" in kinds
    return yaml.safe_load(docs[0]["spec"]["serveConfigV2"])


def test_kuberay_serve_config_shape() -> None:
    config = _serve_config()
    apps = {a["name"]: a for a in config["applications"]}
    assert list(apps) == ["teacher-a", "teacher-b", "base", "router"]  # teachers deploy first
    router = apps["router"]
    assert router["import_path"] == "services.router.ray_deployment:app_builder"
    # the router composes the teacher applications: no second copy of their weights
    assert router["args"]["teachers"] == {"a": {"app": "teacher-a"}, "b": {"app": "teacher-b"}}
    assert router["args"]["anchors"] == {"base": {"app": "base"}}
    assert [d["name"] for d in router["deployments"]] == ["RayRouter"]
    for name in ("teacher-a", "teacher-b", "base"):
        app = apps[name]
        assert app["import_path"] == "services.teacher.ray_deployment:app_builder"
        assert [d["name"] for d in app["deployments"]] == [name]
        assert app["route_prefix"] == f"/{name}"
    scaled = [d for a in apps.values() for d in a["deployments"] if "autoscaling_config" in d]
    assert scaled and all(d["autoscaling_config"]["max_replicas"] >= 2 for d in scaled)
    assert config["http_options"]["host"] == "0.0.0.0"


def test_serve_configs_are_valid_serve_deploy_schemas() -> None:
    """Both Serve configs parse as Ray's own ServeDeploySchema (what ``serve deploy`` and
    KubeRay's serveConfigV2 take), and their args are what the builders accept."""
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    from services.router.ray_deployment import RayRouterArgs
    from services.teacher.ray_deployment import TeacherArgs

    local = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    for config in (_serve_config(), local):
        ServeDeploySchema.model_validate(config)
        for app in config["applications"]:
            if app["import_path"].startswith("services.router."):
                RayRouterArgs(**app["args"])
            else:
                TeacherArgs(**app["args"])
    # a misspelt key fails the deploy instead of being dropped
    with pytest.raises(ValueError, match="threds"):
        TeacherArgs(**{**app["args"], "threds": 2})
    router = next(a for a in local["applications"] if a["name"] == "router")
    with pytest.raises(ValueError, match="polcy"):
        RayRouterArgs(**{**router["args"], "polcy": "label"})
    with pytest.raises(ValueError, match="teachers.a: endpoint .tcp://x"):
        RayRouterArgs(**{**router["args"], "teachers": {"a": {"endpoints": ["tcp://x"]}}}).specs()


def _check(value: object, schema: dict, path: str, errors: list[str]) -> None:
    """Structural check of ``value`` against a CRD openAPIV3Schema node: known field names,
    types, required fields, enums (a small subset of what the API server validates)."""
    kind = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, int | str):
            errors.append(f"{path}: int or string expected, got {value!r}")
        return
    if schema.get("x-kubernetes-preserve-unknown-fields") and not schema.get("properties"):
        return
    expected = {
        "object": dict,
        "array": list,
        "string": str,
        "integer": int,
        "boolean": bool,
        "number": int | float,
    }.get(kind or "")
    if expected is not None and not isinstance(value, expected):
        errors.append(f"{path}: {kind} expected, got {type(value).__name__}")
        return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not one of {schema['enum']}")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}.{key}: required")
        for key, item in value.items():
            if key in props:
                _check(item, props[key], f"{path}.{key}", errors)
            elif isinstance(extra, dict):
                _check(item, extra, f"{path}.{key}", errors)
            elif not extra and props:
                errors.append(f"{path}.{key}: not a field of the RayService CRD")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{path}[{i}]", errors)


def test_kuberay_manifest_matches_the_rayservice_crd() -> None:
    """The RayService against KubeRay's ray.io/v1 CRD schema (pruned copy beside this test;
    its ``_source`` names the KubeRay commit), including the pod templates' fields we use."""
    crd = json.loads((Path(__file__).with_name("rayservice_v1_schema.json")).read_text())
    doc = next(yaml.safe_load_all((DEPLOY / "kuberay-rayservice.yaml").read_text()))
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    errors: list[str] = []
    _check(doc["spec"], crd["schema"]["properties"]["spec"], "spec", errors)
    assert errors == []
    # the check itself catches a misspelt field and a wrong type
    bad = {**doc["spec"], "serveConfigV3": "x", "serviceUnhealthySecondThreshold": "300"}
    errors = []
    _check(bad, crd["schema"]["properties"]["spec"], "spec", errors)
    assert any("serveConfigV3" in e for e in errors) and any("Threshold" in e for e in errors)


def test_prometheus_scrapes_every_service() -> None:
    doc = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {
        t for job in doc["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert targets == {"teacher-a:8000", "teacher-b:8000", "base:8000", "router:8000"}
