"""Flags generated from a settings class: precedence, help text and the errors a user sees."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.settings import (
    UsageError,
    add_settings_arguments,
    http_base_url,
    out_dir,
    settings_from_args,
)


class _Demo(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_SETTINGSTEST_")

    method: Literal["fast", "slow"] = Field(description="how to run")
    steps: int = Field(10, ge=1, description="how many")
    out: Path = Field(Path("runs"), description="where")
    sizes: str = Field("1", description="comma-separated sizes")
    fast_only: bool = Field(False, description="refuse slow")

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: str) -> str:
        if not v.replace(",", "").isdigit():
            raise ValueError(f"must be whole numbers, got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> _Demo:
        if self.fast_only and self.method == "slow":
            raise ValueError("give --method fast with --fast-only")
        return self


def _parse(argv: list[str]) -> _Demo:
    parser = argparse.ArgumentParser(prog="opd demo")
    add_settings_arguments(parser, _Demo)
    return settings_from_args(_Demo, parser.parse_args(argv), prog=parser.prog)


def test_flag_beats_env_beats_default(monkeypatch):
    monkeypatch.setenv("OPD_SETTINGSTEST_STEPS", "7")
    assert _parse(["--method", "fast"]).steps == 7
    assert _parse(["--method", "fast", "--steps", "3"]).steps == 3
    monkeypatch.delenv("OPD_SETTINGSTEST_STEPS")
    assert _parse(["--method", "slow"]).steps == 10


def test_help_says_required_or_the_default():
    parser = argparse.ArgumentParser(prog="opd demo")
    add_settings_arguments(parser, _Demo)
    text = " ".join(parser.format_help().split())
    assert "[env OPD_SETTINGSTEST_METHOD; required]" in text
    assert "[env OPD_SETTINGSTEST_STEPS; default 10]" in text
    assert "Undefined" not in text
    assert "[env OPD_SETTINGSTEST_OUT; default 'runs']" in text  # a path as typed, not its repr
    assert "PosixPath" not in text


def test_missing_setting_names_its_flag_and_env(capsys, monkeypatch):
    monkeypatch.delenv("OPD_SETTINGSTEST_METHOD", raising=False)
    with pytest.raises(SystemExit) as exc:
        _parse(["--steps", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--method: required; give --method or set OPD_SETTINGSTEST_METHOD" in err
    assert "steps" not in err  # the given flags are not echoed back as the "input"


def test_bad_value_says_what_was_given(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(["--method", "fast", "--steps", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--steps:" in err and "'0'" in err


def test_model_validator_error_reads_as_one_line_without_internals(capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(["--method", "slow", "--fast-only"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "opd demo: error: give --method fast with --fast-only\n"


def test_value_quoted_by_its_validator_is_not_repeated(capsys):
    with pytest.raises(SystemExit):
        _parse(["--method", "fast", "--sizes", "abc"])
    err = capsys.readouterr().err
    assert err == "opd demo: error: --sizes: must be whole numbers, got 'abc'\n"


def test_several_problems_are_listed_one_per_line(capsys):
    with pytest.raises(SystemExit):
        _parse(["--method", "fast", "--steps", "0", "--sizes", "x"])
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "opd demo: error: invalid settings:"
    assert [line.split(":")[0] for line in lines[1:]] == ["  --steps", "  --sizes"]


def test_out_dir_refuses_a_file_or_an_uncreatable_path(tmp_path):
    assert out_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert (tmp_path / "new" / "run").is_dir()
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UsageError, match=r"^--out .*file.txt: exists and is not a directory$"):
        out_dir(tmp_path / "file.txt")
    with pytest.raises(UsageError, match=r"^--models .*file.txt/sub: cannot create it \("):
        out_dir(tmp_path / "file.txt" / "sub", "--models")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "https://router.example/prefix"])
def test_http_base_url_accepts(url):
    assert http_base_url(url) == url


@pytest.mark.parametrize("url", ["notaurl", "127.0.0.1:8000", "ftp://host", "http://"])
def test_http_base_url_refuses(url):
    with pytest.raises(ValueError, match="http:// or https:// base URL"):
        http_base_url(url)
