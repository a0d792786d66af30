"""Code versions: what a stage's output depends on, hashed, so Dagster can tell which stages are
stale after a change (the UI marks a stage and everything downstream of it).

A stage's version covers the version of the stage before it (so a change marks that stage and
every later one: Dagster does not propagate staleness to downstream partitions by itself), the
stage's own code (its UDF module), the settings that change its output (model, chat template, engine kwargs, error handling) and, for Preprocess and Postprocess,
the source of the user's function and the values it closes over. Execution settings that do not
change the output (batch_size, concurrency, num_cpus, memory) are left out, and so is
runtime_env (it may carry secrets; hashing keeps values out of sight anyway). Sampling params
come from the preprocess function, so changing them makes Preprocess stale and, through it,
every later stage.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from typing import Any, Callable, Optional

VERSION_CHARS = 12


def function_fingerprint(fn: Optional[Callable]) -> str:
    """The function's source plus the values it closes over and its defaults."""
    if fn is None:
        return "none"
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):  # defined in a REPL or built at run time: fall back to bytecode
        code = getattr(fn, "__code__", None)
        text = repr((code.co_code, code.co_consts)) if code is not None else repr(fn)
    closure = [cell.cell_contents for cell in (getattr(fn, "__closure__", None) or ()) if _has_contents(cell)]
    return text + repr(closure) + repr(getattr(fn, "__defaults__", None))


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:  # an empty cell
        return False


def module_source(cls: Optional[type]) -> str:
    if cls is None:
        return ""
    module = sys.modules.get(cls.__module__)
    try:
        return inspect.getsource(module) if module is not None else cls.__qualname__
    except (OSError, TypeError):
        return cls.__qualname__


def digest(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=repr).encode()
    return hashlib.sha256(blob).hexdigest()[:VERSION_CHARS]
