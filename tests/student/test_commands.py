"""``opd pretrain|train|eval``: mistakes in flags are one-line errors with exit status 2."""

from __future__ import annotations

import pytest


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "somefile.txt"
    path.write_text("not a directory")
    return path


def _commands(models, out):
    return {
        "pretrain": ["pretrain", "--out", out],
        "train": ["train", "--method", "danceopd", "--models", models, "--out", out],
        "eval": [
            "eval",
            "--checkpoint",
            models / "base.safetensors",
            "--models",
            models,
            "--out",
            out,
        ],
    }


@pytest.mark.parametrize("command", ["pretrain", "train", "eval"])
def test_out_that_is_a_file_or_uncreatable_names_the_flag(opd_cli, tiny_models, a_file, command):
    for out, why in ((a_file, "exists and is not a directory"), (a_file / "x", "cannot create")):
        code, _, err = opd_cli(*_commands(tiny_models, out)[command])
        assert code == 2, err
        assert err.startswith(f"opd {command}: error: --out {out}: {why}"), err
        assert "Traceback" not in err and len(err.splitlines()) == 1


def test_router_url_without_scheme_is_refused_before_any_request(opd_cli, tmp_path):
    flags = ["--method", "danceopd", "--backend", "http", "--router-url", "notaurl"]
    code, _, err = opd_cli("train", *flags, "--out", tmp_path / "run")
    assert code == 2
    assert err == (
        "opd train: error: --router-url: must be an http:// or https:// base URL, "
        "e.g. http://127.0.0.1:8000; got 'notaurl'\n"
    )
    assert not (tmp_path / "run").exists()


def test_eval_of_a_directory_says_so(opd_cli, tiny_models, tmp_path):
    code, _, err = opd_cli(
        "eval", "--checkpoint", tiny_models, "--models", tiny_models, "--out", tmp_path / "e"
    )
    assert code == 2 and "is a directory; give a .safetensors file" in err
