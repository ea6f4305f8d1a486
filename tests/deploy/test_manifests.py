"""The Ray deployment files parse, and their application args are what the builders accept."""

from __future__ import annotations

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
    (app,) = config["applications"]
    assert app["import_path"] == "services.router.ray_deployment:app_builder"
    assert set(app["args"]["teachers"]) == {"a", "b"} and set(app["args"]["anchors"]) == {"base"}
    names = {d["name"] for d in app["deployments"]}
    assert names == {"RayRouter", "teacher-a", "teacher-b", "teacher-base"}
    scaled = [d for d in app["deployments"] if "autoscaling_config" in d]
    assert scaled and all(d["autoscaling_config"]["max_replicas"] >= 2 for d in scaled)
    assert config["http_options"]["host"] == "0.0.0.0"


def test_kuberay_args_match_the_builders() -> None:
    pytest.importorskip("ray.serve")
    from services.router.ray_deployment import RayRouterArgs
    from services.teacher.ray_deployment import TeacherArgs

    (app,) = _serve_config()["applications"]
    args = RayRouterArgs(**app["args"])
    for group in (args.teachers, args.anchors):
        for targs in group.values():
            TeacherArgs(**targs)
    # a misspelt key fails the deploy instead of being dropped
    with pytest.raises(ValueError, match="threds"):
        TeacherArgs(**{**targs, "threds": 2})
    with pytest.raises(ValueError, match="polcy"):
        RayRouterArgs(**{**app["args"], "polcy": "label"})


def test_prometheus_scrapes_every_service() -> None:
    doc = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {
        t for job in doc["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert targets == {"teacher-a:8000", "teacher-b:8000", "base:8000", "router:8000"}
