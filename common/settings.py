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
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, ValidationError
from pydantic_settings import BaseSettings

from common.names import is_http_base_url

S = TypeVar("S", bound=BaseSettings)


class UsageError(Exception):
    """A mistake of the caller's: printed as ``opd CMD: error: ...`` with exit status 2."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def out_dir(path: Path, flag: str = "--out") -> Path:
    """Create the output directory ``path`` (and parents) now, or say why it cannot be one.

    Called before a command does any work, so that a file in the way or an unwritable place
    costs the user a one-line error instead of a traceback after minutes of training.
    """
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot create it ({exc.strerror or exc})") from None
    return path


def http_base_url(value: str) -> str:
    """``value`` if it is an http(s) base URL; for field validators of URL settings.

    Checked up front: the clients would otherwise retry a URL they can never reach.
    """
    if not is_http_base_url(value):
        raise ValueError(
            f"must be an http:// or https:// base URL, e.g. http://127.0.0.1:8000; got {value!r}"
        )
    return value


#: A settings field holding an http(s) base URL, checked as the settings are read.
BaseUrl = Annotated[str, AfterValidator(http_base_url)]


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
            default = field.get_default(call_default_factory=True)
            # A path reads as the user would type it ('models'), not PosixPath('models').
            default = str(default) if isinstance(default, PurePath) else default
            given_as = f"default {default!r}"
        help_text = f"{field.description or ''} [env {env}; {given_as}]".strip()
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            kwargs["choices"] = [str(c) for c in typing.get_args(tp)]
        elif typing.get_origin(tp) is list:
            kwargs["action"] = "append"  # repeatable flag, e.g. --teacher a=URL --teacher b=URL
        parser.add_argument(_flag(name), **kwargs)


def _problem(err: Any, prefix: str) -> str:
    """One pydantic error as the user should read it: the flag, then what is wrong."""
    # pydantic puts "Value error, " before a validator's message: noise to the user.
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a model validator: the problem spans flags, its "input" is all of them
        return msg
    name = str(err["loc"][0])  # a list flag's item error adds its index; the flag is the name
    flag = _flag(name)
    if err["type"] == "missing":  # its "input" is the whole settings dict: no help
        return f"{flag}: required; give {flag} or set {f'{prefix}{name}'.upper()}"
    got = repr(err.get("input"))
    # Validators that quote the value already (", got 'abc'") need no second copy of it.
    return f"{flag}: {msg}" if got in msg else f"{flag}: {msg} (got {got})"


def settings_from_args(cls: type[S], args: argparse.Namespace, prog: str = "opd") -> S:
    """Build ``cls`` from the flags that were given (plus env and defaults); exit 2 on bad values.

    Problems are printed like :class:`UsageError`: ``PROG: error: ...``, one line each.
    """
    given = {k: v for k, v in vars(args).items() if k in cls.model_fields and v is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "")
        problems = [_problem(err, prefix) for err in exc.errors()]
        if len(problems) == 1:
            sys.stderr.write(f"{prog}: error: {problems[0]}\n")
        else:
            lines = "".join(f"  {p}\n" for p in problems)
            sys.stderr.write(f"{prog}: error: invalid settings:\n{lines}")
        raise SystemExit(2) from None
