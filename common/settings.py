"""Command-line flags generated from pydantic-settings classes.

Every command's settings are one ``BaseSettings`` class: its fields become ``--flags`` and its
``env_prefix`` gives the ``OPD_*`` environment variables. A flag given on the command line wins
over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from typing import Any, Literal, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


class UsageError(Exception):
    """A mistake of the caller's: printed as ``opd CMD: error: ...`` with exit status 2."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[BaseSettings]) -> None:
    """Add one flag per field of ``cls`` to ``parser`` (default ``None`` = not given)."""
    prefix = cls.model_config.get("env_prefix", "")
    for name, field in cls.model_fields.items():
        tp = _unwrap_optional(field.annotation)
        env = f"{prefix}{name}".upper()
        if field.is_required():
            given_as = "required"
        else:
            given_as = f"default {field.get_default(call_default_factory=True)!r}"
        help_text = f"{field.description or ''} [env {env}; {given_as}]".strip()
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            kwargs["choices"] = [str(c) for c in typing.get_args(tp)]
        elif typing.get_origin(tp) is list:
            kwargs["action"] = "append"  # repeatable flag, e.g. --teacher a=URL --teacher b=URL
        parser.add_argument(_flag(name), **kwargs)


def settings_from_args(cls: type[S], args: argparse.Namespace) -> S:
    """Build ``cls`` from the flags that were given (plus env and defaults); exit 2 on bad values."""
    given = {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "")
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "settings"
            if err["type"] == "missing":  # its "input" is the whole settings dict: no help
                env = f"{prefix}{loc}".upper()
                lines.append(f"  {_flag(loc)}: required; give {_flag(loc)} or set {env}")
            else:
                lines.append(f"  {_flag(loc)}: {err['msg']} (got {err.get('input')!r})")
        sys.stderr.write("opd: invalid settings:\n" + "\n".join(lines) + "\n")
        raise SystemExit(2) from None
