"""The ``opd`` command: a thin dispatcher that imports only the module of the command it runs."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic_settings import BaseSettings

# UsageError lives in common.settings: this module also runs as __main__ (python -m common.cli),
# and a class defined here would then exist twice and escape the except clause below.
from common.settings import UsageError, add_settings_arguments, settings_from_args

__all__ = ["COMMANDS", "Command", "UsageError", "main"]


@dataclass(frozen=True)
class Command:
    """One ``opd`` sub-command: its settings class (flags + ``OPD_*`` env) and what it runs."""

    help: str
    settings: type[BaseSettings]
    run: Callable[[Any], int | None]


#: command words -> (one-line help, "module:attribute" of its :class:`Command`)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("pretrain",): (
        "train the base student and teachers a, b (SPEC §2)",
        "student.commands:PRETRAIN",
    ),
    ("train",): ("run OPD: roll out the student, query teachers, update", "student.commands:TRAIN"),
    ("eval",): ("evaluate any checkpoint against teachers' target", "student.commands:EVAL"),
    ("serve", "teacher"): (
        "serve one teacher checkpoint over OIP v2 (uvicorn)",
        "services.teacher.command:TEACHER",
    ),
    ("serve", "router"): (
        "route states to teachers: registry, policies, fan-out (uvicorn)",
        "services.router.command:ROUTER",
    ),
    ("serve", "ray"): (
        "deploy teachers (and router) on Ray Serve from a config",
        "services.teacher.ray_command:RAY",
    ),
    ("latent",): (
        "the latent world: pretrain SD3 base + LoRA teachers, OPD rows, quality table",
        "student.latent.run:COMMAND",
    ),
    ("demo",): (
        "the main job: cluster up, all SPEC §5 runs over HTTP, tables, report",
        "student.demo:DEMO",
    ),
    ("cluster", "up"): (
        "start teachers a, b, base and the router on loopback",
        "services.cluster_command:UP",
    ),
    ("cluster", "status"): ("show the local cluster's services", "services.cluster_command:STATUS"),
    ("cluster", "restart"): (
        "restart one service of the local cluster on its port",
        "services.cluster_command:RESTART",
    ),
    ("cluster", "down"): ("stop the local cluster", "services.cluster_command:DOWN"),
    ("bench", "serve"): (
        "throughput/latency sweep against any OIP v2 endpoint",
        "services.bench.command:BENCH_SERVE",
    ),
    ("bench", "overload"): (
        "flood a teacher and a router: statuses, Retry-After, latency, RSS",
        "services.bench.overload:OVERLOAD",
    ),
    ("bench", "cost"): (
        "rollout vs query vs update cost per OPD method",
        "student.bench_cost:COST",
    ),
    ("bench", "contention"): (
        "the same training quiet and beside busy processes",
        "student.bench_contention:CONTENTION",
    ),
}


def _usage(group: str | None = None) -> str:
    """Every command, or with ``group`` (``serve``, ``cluster``, ``bench``) only its own."""
    name = f"opd {group}" if group else "opd"
    what = "SUBCOMMAND" if group else "COMMAND"
    lines = [f"usage: {name} {what} [flags]   ({name} {what} --help for its flags)", ""]
    lines.append("subcommands:" if group else "commands:")
    for words, (help_text, _) in COMMANDS.items():
        if group is None or words[0] == group:
            lines.append(f"  {' '.join(words):<16} {help_text}")
    return "\n".join(lines)


def _find(argv: Sequence[str]) -> tuple[tuple[str, ...], str] | None:
    for n in (2, 1):
        words = tuple(argv[:n])
        if words in COMMANDS:
            return words, COMMANDS[words][1]
    return None


_HELP = ("-h", "--help")


def _no_command(argv: Sequence[str]) -> int:
    """``argv`` names no command: help (exit 0) if asked for, else a usage error (exit 2)."""
    groups = {words[0] for words in COMMANDS if len(words) > 1}
    group = argv[0] if argv and argv[0] in groups else None
    rest = argv[1:] if group else argv
    if rest and rest[0] in _HELP:  # `opd --help`, `opd serve --help`
        sys.stdout.write(_usage(group) + "\n")
        return 0
    if rest:
        unknown = " ".join(argv[:2]) if group else argv[0]
        sys.stderr.write(f"opd: unknown command {unknown!r}\n")
    elif group:
        sys.stderr.write(f"opd {group}: give a subcommand\n")
    # `opd` alone is a usage error too: scripts that forget the command should not pass.
    sys.stderr.write(_usage(group) + "\n")
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    found = _find(argv)
    if found is None:
        return _no_command(argv)
    words, target = found
    module, attr = target.split(":")
    command: Command = getattr(importlib.import_module(module), attr)
    parser = argparse.ArgumentParser(prog="opd " + " ".join(words), description=command.help)
    add_settings_arguments(parser, command.settings)
    args = parser.parse_args(argv[len(words) :])
    settings = settings_from_args(command.settings, args, prog=parser.prog)
    from common.checkpoint import CheckpointError
    from common.routing import RoutingError

    try:
        return int(command.run(settings) or 0)
    except (UsageError, CheckpointError, RoutingError) as exc:
        sys.stderr.write(f"opd {' '.join(words)}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("opd: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
