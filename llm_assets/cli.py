"""`python -m llm_assets.cli add-partitions`: register one dynamic partition per new input file.

Dagster runs only partitions it knows; this adds the files that landed in each pipeline's source
folder (files already registered are skipped), so `dagster job execute ... --tags
'{"dagster/partition": "FILE"}'` can run them.
"""

from __future__ import annotations

import argparse
import runpy
import sys

import dagster as dg

from llm_assets.defs.component import PipelineYamlError
from llm_assets.defs.factory import add_partitions_for_new_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_assets.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add-partitions", help="register a partition for each new input file")
    add.add_argument("-f", "--file", default="definitions.py", help="the code location file that defines PIPELINES")
    add.add_argument("--pipeline", action="append", help="only these pipelines (default: all)")
    add.add_argument("--verbose", action="store_true", help="show the whole traceback when the file fails to load")
    args = parser.parse_args(argv)

    try:
        namespace = runpy.run_path(args.file)
    except PipelineYamlError as exc:  # already `file:line: field: problem` and the lines around it
        if args.verbose:
            raise
        print(f"{exc}\n(while loading {args.file}; --verbose for the traceback)", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.verbose:
            raise
        # The user's mistake in one line (an unknown config field says which field it meant),
        # not the import machinery's traceback around it.
        print(
            f"error: {args.file} failed to load: {type(exc).__name__}: {exc}{_causes(exc)} "
            "(--verbose for the traceback)",
            file=sys.stderr,
        )
        return 2
    if "PIPELINES" not in namespace:
        parser.error(f"{args.file} defines no PIPELINES list (the pipelines whose input files become partitions)")
    pipelines = namespace["PIPELINES"]
    chosen = [p for p in pipelines if not args.pipeline or p.name in args.pipeline]
    unknown = set(args.pipeline or []) - {p.name for p in pipelines}
    if unknown:
        parser.error(f"no pipeline named {sorted(unknown)} in {args.file}; known: {[p.name for p in pipelines]}")
    instance = dg.DagsterInstance.get()
    for pipeline in chosen:
        missing = pipeline.source.missing()
        if missing:
            print(f"warning: {pipeline.name}: {missing}: create it, or fix the pipeline's source", file=sys.stderr)
        new = add_partitions_for_new_files(instance, pipeline)
        known = instance.get_dynamic_partitions(pipeline.name)
        print(f"{pipeline.name}: {len(new)} new partition(s) {new}; {len(known)} in all")
    return 0


def _causes(exc: BaseException) -> str:
    """What a wrapped error says underneath (a YAML pipeline's located mistake inside Dagster's
    "Error while loading component")."""

    def underneath(error: BaseException):  # as Python's traceback shows it: `raise ... from None` hides the context
        return error.__cause__ or (None if error.__suppress_context__ else error.__context__)

    lines, cause = [], underneath(exc)
    while cause is not None and len(lines) < 5:
        lines.append(f"\n  caused by {type(cause).__name__}: {cause}")
        cause = underneath(cause)
    return "".join(lines)


if __name__ == "__main__":
    sys.exit(main())
