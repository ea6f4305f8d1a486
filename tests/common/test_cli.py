"""The ``opd`` dispatcher: help and usage errors before any command runs."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("group", ["serve", "cluster", "bench"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_group_help_lists_its_subcommands(opd_cli, group, flag):
    code, out, err = opd_cli(group, flag)
    assert code == 0 and err == ""
    listed = [line.split()[:2] for line in out.splitlines() if line.startswith("  ")]
    assert listed and all(words[0] == group for words in listed)


def test_help_lists_every_command(opd_cli):
    code, out, _ = opd_cli("--help")
    assert code == 0 and "  pretrain " in out and "  serve teacher " in out


def test_no_command_is_a_usage_error(opd_cli):
    code, out, err = opd_cli()
    assert code == 2 and out == "" and "usage: opd COMMAND" in err


def test_group_without_subcommand_is_a_usage_error(opd_cli):
    code, _, err = opd_cli("serve")
    assert code == 2 and "give a subcommand" in err and "serve router" in err
    assert "pretrain" not in err


@pytest.mark.parametrize(
    ("argv", "named"),
    [(["serve", "nonsense"], "'serve nonsense'"), (["nonsense", "x"], "'nonsense'")],
)
def test_unknown_command_is_named(opd_cli, argv, named):
    code, _, err = opd_cli(*argv)
    assert code == 2 and f"opd: unknown command {named}" in err
