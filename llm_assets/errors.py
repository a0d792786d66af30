"""Errors shared across modules, kept apart so that raising one imports nothing else."""


class SourceError(ValueError):
    """An input file (or object) that cannot be read as rows: the message names it, and the line
    or row where it can."""
