"""Code versions: what a stage's output depends on, hashed, so Dagster can tell which stages are
stale after a change (the UI marks a stage and everything downstream of it).

A stage's version covers the version of the stage before it (so a change marks that stage and
every later one: Dagster does not propagate staleness to downstream partitions by itself), the
code it runs (its UDF module and the shared stage helpers; for the engine its replica, engine loop
and build differences, and the engine library's installed version), the settings that change its
output (model, chat template, engine kwargs, error handling) and, for Preprocess and Postprocess,
the user's function and the values it closes over. Code is hashed as its syntax tree without
docstrings, so a comment, a docstring or reformatting changes no version. Execution settings
that do not change the output (batch_size, concurrency, num_cpus, memory) are left out, and so is
runtime_env (it may carry secrets). Sampling params come from the preprocess function, so changing
them makes Preprocess stale and, through it, every later stage.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import json
import os
import textwrap
from typing import Any, Callable, Optional

VERSION_CHARS = 12


def normalized_code(text: str) -> str:
    """The code's syntax tree without docstrings (comments and layout never reach the tree);
    the text itself when it does not parse alone (a lambda cut out of a larger expression)."""
    try:
        tree = ast.parse(textwrap.dedent(text))
    except SyntaxError:
        return " ".join(line.split("#", 1)[0].strip() for line in text.splitlines() if line.strip())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(getattr(body[0], "value", None), ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False)


def function_fingerprint(fn: Optional[Callable]) -> str:
    """The function's code plus the values it closes over and its defaults."""
    if fn is None:
        return "none"
    if hasattr(fn, "fingerprint"):  # a callable object that says what changes it (the pipeline's row checks)
        return fn.fingerprint()
    if isinstance(fn, functools.partial):  # its repr holds an address: the function and its bound arguments instead
        return function_fingerprint(fn.func) + repr(fn.args) + repr(sorted(fn.keywords.items()))
    try:
        text = normalized_code(inspect.getsource(fn))
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


def module_code(name: str) -> str:
    """A module's normalized code, by module name."""
    module = importlib.import_module(name)
    try:
        return normalized_code(inspect.getsource(module))
    except (OSError, TypeError):  # no source shipped (a compiled module): its name must do
        return name


def folder_fingerprint(path: str) -> str:
    """What identifies a model: a local folder's files (relative names, sizes, modification
    times: no file is read), else the name itself (a hub id)."""
    if not os.path.isdir(path):
        return path
    entries = []
    for folder, _, files in os.walk(path):
        for name in files:
            stat = os.stat(os.path.join(folder, name))
            entries.append([os.path.relpath(os.path.join(folder, name), path), stat.st_size, stat.st_mtime_ns])
    return digest({"files": sorted(entries)})


def digest(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=repr).encode()
    return hashlib.sha256(blob).hexdigest()[:VERSION_CHARS]
