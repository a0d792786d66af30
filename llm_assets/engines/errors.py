"""The errors of the engine pool and how it reads them out of Ray's: a start that failed, a batch
refused because of one of its rows, the user-facing error inside a Ray error, its first line."""

from __future__ import annotations

from typing import Any


class EngineStartError(RuntimeError):
    pass


class BatchFailed(Exception):
    """A batch the engine refused because of one of its rows (``error``: the RowError); ``tag``
    says which batch. The run fails that batch's partition, not the run."""

    def __init__(self, tag: Any, error: BaseException):
        super().__init__(str(error))
        self.tag, self.error = tag, error


def unwrap(exc: BaseException) -> BaseException:
    """The user-facing error inside a Ray error (a RowError raised in a worker, say)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
