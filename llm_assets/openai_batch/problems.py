"""What is wrong with one request line, and how an error message shows a value: shared by the
request and sampling-parameter checks."""

from __future__ import annotations

import json
from typing import Any


class _Problem(ValueError):
    """What is wrong with one line; the reader adds the file and line number."""


def _short(value: Any) -> str:
    """A value for an error message: JSON's spelling of true, false and null (what the user wrote),
    else its repr when short, else its type."""
    text = json.dumps(value) if value is None or isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"
