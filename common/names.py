"""Identifiers users type that travel in URLs: model / teacher names and base URLs.

One rule for each, shared by the teacher service, the router and the CLI, so a name one accepts
is never refused by another.
"""

from __future__ import annotations

import re

#: Names appear in ``/v2/models/NAME`` and in response parameter keys (``NAME.rows``).
PLAIN_NAME_RULE = (
    "1-64 characters of letters, digits, '_', '-' or '.', starting with a letter or digit"
)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_BASE_URL = re.compile(r"https?://[^/\s]+")


def is_plain_name(name: str) -> bool:
    """Whether ``name`` follows :data:`PLAIN_NAME_RULE` (whole string: no trailing newline)."""
    return _PLAIN_NAME.fullmatch(name) is not None


def is_http_base_url(url: str) -> bool:
    """Whether ``url`` starts like an http(s) base URL: scheme and a host."""
    return _BASE_URL.match(url) is not None
