"""Shared fixtures: pretrained checkpoints (tiny for plumbing tests, full for quality tests)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from student.pretrain import pretrain_all

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    # Tests share 2 cores with the servers they start; keep the test process to one thread.
    torch.set_num_threads(int(os.environ.get("OPD_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """Checkpoints trained for 50 steps: valid files, quick to make; for plumbing tests."""
    out = tmp_path_factory.mktemp("tiny-models")
    pretrain_all(out, seed=0, steps=50, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    """Fully pretrained checkpoints (SPEC §2). Reuses the repo's models/ when present."""
    cached = REPO / "models"
    out = tmp_path_factory.mktemp("models")
    if all(
        (cached / f).is_file()
        for f in ("base.safetensors", "teacher-a.safetensors", "teacher-b.safetensors")
    ):
        for f in cached.glob("*.safetensors"):
            shutil.copy(f, out / f.name)
    else:
        pretrain_all(out, seed=0, log=lambda *_: None)
    return out


@pytest.fixture
def opd_cli(capsys):
    """Run ``opd ARGS...`` in this process: ``(exit status, stdout, stderr)``.

    Only for commands that stop early (help, usage errors): a valid command runs for real.
    """
    from common.cli import main

    def run(*argv: object) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse and settings errors exit from inside
            code = exc.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
