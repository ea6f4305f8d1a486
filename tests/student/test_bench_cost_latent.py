"""``opd bench cost --world latent``: the per-method breakdown at latent shapes through real
teacher and router processes, and DanceOPD's saving per point; bad sweep flags exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "common.cli", "bench", "cost", "--world", "latent", *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("flag", [["--teacher-sizes", "2"], ["--sides", "7"], ["--sides", "x"]])
def test_bad_sweep_flags_exit_2(tmp_path: Path, flag: list[str]) -> None:
    done = bench(*flag, "--out", str(tmp_path / "b"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--sides" in done.stderr or "--teacher-sizes" in done.stderr


@pytest.mark.slow
def test_latent_cost_rows_and_dance_saving(tmp_path: Path) -> None:
    out = tmp_path / "b"
    done = bench(
        "--sides", "8", "--teacher-sizes", "1x1", "--methods", "diffusionopd,danceopd",
        "--steps", "2", "--batch", "2", "--rollout-steps", "4", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((out / "cost.json").read_text())
    dense, dance = doc["rows"]
    assert (dense["method"], dance["method"]) == ("diffusionopd", "danceopd")
    assert dense["states"] == 2 * 4 and dance["states"] == 2  # dense: all N; dance: one
    assert dense["requests"] == 4 and dense["bytes_sent"] > dance["bytes_sent"] > 0
    assert dense["compute_ms"] > 0 and dense["teacher_params"] < 76_368
    (saved,) = doc["savings"]
    assert saved["side"] == 8 and saved["state_floats"] == 256 and "saving" in saved
    assert "DanceOPD saving" in done.stdout
