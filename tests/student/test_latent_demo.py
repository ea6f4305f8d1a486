"""``opd demo --world latent`` end to end on tiny models: the teacher process and the router
it starts, every row over HTTP, both tables, report.md, report.json and the sample grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.student.latent_helpers import tiny_models

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_latent_demo_runs_every_row_over_http_and_reports(tmp_path: Path) -> None:
    models = tiny_models(tmp_path / "models")
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "common.cli", "demo", "--world", "latent"]
    cmd += ["--models", str(models), "--out", str(out), "--steps", "2", "--threads", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "\nquality\n" in done.stdout and "\ncost over HTTP\n" in done.stdout
    report = (out / "report.md").read_text()
    assert "## Quality" in report and "## Cost" in report and "![samples](samples.png)" in report
    assert (out / "samples.png").stat().st_size > 0
    doc = json.loads((out / "report.json").read_text())
    trained = [r for r in doc["rows"] if r["counts"]]
    assert [r["run"] for r in trained] == [
        "single teacher (a), dense",
        "DiffusionOPD dense (a, b)",
        "Flow-OPD dense + anchor (a, b)",
        "DanceOPD single query (a, b)",
        "naive average of a and b (dense)",
    ]
    for r in trained:
        assert r["counts"]["requests"] > 0 and r["config"]["guidance_scale"] == 2.0
        # the cond_id run sends less per step than every prompt in every request
        uncached = doc["uncached_bytes_per_step"][r["run"]]["sent"]
        assert r["counts"]["bytes_sent"] / 2 < uncached
