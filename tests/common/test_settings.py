"""Flags generated from a settings class: precedence, help text and the errors a user sees."""

from __future__ import annotations

import argparse
from typing import Literal

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.settings import add_settings_arguments, settings_from_args


class _Demo(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPD_SETTINGSTEST_")

    method: Literal["fast", "slow"] = Field(description="how to run")
    steps: int = Field(10, ge=1, description="how many")


def _parse(argv: list[str]) -> _Demo:
    parser = argparse.ArgumentParser(prog="opd demo")
    add_settings_arguments(parser, _Demo)
    return settings_from_args(_Demo, parser.parse_args(argv))


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
