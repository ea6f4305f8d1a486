"""``opd train`` stopped by SIGTERM (``timeout``, schedulers) or SIGINT (Ctrl-C), as a user runs it:
the state is saved at the interrupt, and ``--resume`` completes the run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common.checkpoint import read_model
from student.commands import TrainSettings, run_train
from tests.trainer_proc import wait_for_lines


def _train_cmd(models: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "common.cli",
        "train",
        "--backend",
        "local",
        "--method",
        "danceopd",
        "--steps",
        str(steps),
        "--models",
        str(models),
        "--out",
        str(out),
        "--checkpoint-every",
        "0",
        "--no-progress",
        "--threads",
        "1",
        *extra,
    ]


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and the trainer keeps an ignored
    # signal ignored: give the child the disposition a terminal's foreground job has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _params(path: Path):
    net, _ = read_model(path)
    return [p.detach() for p in net.parameters()]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_state_and_resume_completes(tiny_models, tmp_path, sig, code):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(tiny_models, out, 100_000),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_default_sigint,
    )
    wait_for_lines(out / "steps.jsonl", 5, proc)
    proc.send_signal(sig)
    assert proc.wait(60) == code
    text = proc.stdout.read()
    found = re.fullmatch(
        r"opd train: interrupted after (\d+) of 100000 steps; state saved to (\S+); "
        r"rerun with --resume to continue\n",
        text,
    )
    assert found, text
    done = int(found[1])
    assert Path(found[2]) == out / "checkpoint.safetensors" and Path(found[2]).is_file()
    assert len((out / "steps.jsonl").read_text().splitlines()) == done
    assert not (out / "report.json").exists()

    steps = done + 3
    resumed = subprocess.run(
        _train_cmd(tiny_models, out, steps, "--resume"), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    logged = [json.loads(x)["step"] for x in (out / "steps.jsonl").read_text().splitlines()]
    assert logged == list(range(steps))
    assert json.loads((out / "report.json").read_text())["counts"]["rollouts"] == steps * 128
    # the step the signal cut short was replayed, not applied twice or skipped
    full = tmp_path / "full"
    s = TrainSettings(
        method="danceopd", models=tiny_models, out=full, steps=steps, checkpoint_every=0
    )
    assert run_train(s.model_copy(update={"progress": False})) == 0
    for a, b in zip(
        _params(full / "student.safetensors"), _params(out / "student.safetensors"), strict=True
    ):
        assert float((a - b).abs().max()) <= 1e-6
