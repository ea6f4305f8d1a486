"""``opd serve teacher`` flags that are wrong fail before anything loads: exit 2, one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CHECKPOINT = Path("teacher-a.safetensors")  # never read: every case fails in the settings


@pytest.mark.parametrize("flags", [[], ["--checkpoint", str(CHECKPOINT), "--synthetic"]])
def test_one_source_is_required(opd_cli, flags):
    code, _, err = opd_cli("serve", "teacher", *flags)
    assert code == 2
    assert err == (
        "opd serve teacher: error: give either --checkpoint FILE or --synthetic or "
        "--model-dir DIR (exactly one of them)\n"
    )


def test_cuda_without_cuda_names_the_flag(opd_cli, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = opd_cli("serve", "teacher", "--synthetic", "--device", "cuda")
    assert code == 2
    assert err.startswith("opd serve teacher: error: --device: CUDA is not available")


@pytest.mark.parametrize("name", ["bad name/..", "../x", "-a", "x" * 65, "a\nb", "a\n"])
def test_served_name_must_be_plain(opd_cli, name):
    code, _, err = opd_cli("serve", "teacher", "--synthetic", f"--name={name}")
    assert code == 2
    assert err.startswith("opd serve teacher: error: --name: must be 1-64 characters"), err


def test_checkpoint_stem_that_is_no_plain_name_asks_for_name(opd_cli):
    code, _, err = opd_cli("serve", "teacher", "--checkpoint", "my model.safetensors")
    assert code == 2 and "'my model' (the checkpoint's file stem)" in err and "--name" in err


def test_model_root_must_be_a_directory(opd_cli, tmp_path):
    code, _, err = opd_cli("serve", "teacher", "--synthetic", "--model-root", tmp_path / "nope")
    assert code == 2
    assert err == f"opd serve teacher: error: --model-root: '{tmp_path / 'nope'}' does not exist\n"
    (tmp_path / "f").write_text("")
    code, _, err = opd_cli("serve", "teacher", "--synthetic", "--model-root", tmp_path / "f")
    assert code == 2 and "is not a directory" in err


def test_empty_name_means_the_default(monkeypatch):
    from services.teacher.settings import TeacherSettings

    monkeypatch.setenv("OPD_TEACHER_NAME", "")
    assert TeacherSettings(synthetic=True).served_name() == "synthetic"
