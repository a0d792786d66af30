"""Before any stage runs: each input file the run reads, read whole by the run's own process.

A bad file (not JSON, empty, a field whose type changes, a repeated row id, bad OpenAI Batch lines)
is found here, seconds after the run starts, before any engine does (Ray starts meanwhile, once
one file has passed: a run whose every file is bad starts no Ray); so is a preprocess
function that cannot take the file's rows (a missing column), by running Preprocess on the first
rows of each file. The bad files are left out of the run with their first problem, the good
ones go on. The row counts found are each partition's total, for the commits.

Preprocess runs here only when its stage has no ``runtime_env`` of its own: what it needs may
exist only in the Ray workers that env builds. A preprocess function that calls Ray (its node id,
an actor) is not checked here: Ray may not be up yet, and is not started for it.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pyarrow as pa

from llm_assets.errors import SourceError
from llm_assets.private_apis import RayNeededBeforeItStarted, ray_auto_init_refused
from llm_assets.rows import RowError

# Rows of each file that Preprocess runs on here: enough for a missing column, few enough that a
# slow preprocess function costs little.
PREPROCESS_ROWS = 8
# Rows of each file kept, spread over it, for the response cache to tell whether the run has rows
# to generate (the first rows of a file are not enough: a new file often starts with old questions).
SAMPLE_ROWS = 16
SAMPLED_FILES = 4
CHUNK_ROWS = 4096
THREADS = 8  # S3 downloads overlap; local parsing takes the GIL anyway


@dataclass
class InputCheck:
    rows: dict[str, int] = field(default_factory=dict)  # partition -> rows of its file
    problems: dict[str, str] = field(default_factory=dict)  # partition -> its file's first problem
    samples: list[pa.Table] = field(default_factory=list)  # rows spread over each good file, as read

    @property
    def sample(self) -> Optional[pa.Table]:
        """Rows spread over the run's first good files whose columns' types agree, or None. Files
        (partitions) may differ there (a column of numbers in one day's file, of text in the next):
        each is its own partition, and the sample needs no more than the files that agree."""
        picked, schema = [], None
        for table in self.samples:
            try:
                schema = (
                    pa.unify_schemas([schema, table.schema], promote_options="permissive") if picked else table.schema
                )
            except (pa.ArrowTypeError, pa.ArrowInvalid):
                continue
            picked.append(table)
            if len(picked) == SAMPLED_FILES:
                break
        return pa.concat_tables(picked, promote_options="permissive") if picked else None


def check_sources(
    pipeline, partitions: list[str], copies: Optional[str], passed: Optional[threading.Event] = None
) -> InputCheck:
    """Read each partition's source file whole (``copies``: where S3 objects are kept for the
    run's own read) and run Preprocess on its first rows. ``passed`` is set as soon as one file
    passes: the run has work for Ray then."""
    plan = pipeline.plan(pipeline.stage_names()[0])
    preprocess = plan.udf(**plan.udf_kwargs) if plan.udf is not None and not plan.settings.runtime_env else None

    def check(partition: str) -> tuple[str, int, Optional[str], Optional[pa.Table]]:
        checked = _check(pipeline, partition, copies, preprocess)
        if checked[2] is None and passed is not None:
            passed.set()
        return checked

    found = InputCheck()
    with ray_auto_init_refused(), ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="input-check") as threads:
        for partition, rows, problem, sample in threads.map(check, partitions):
            found.rows[partition] = rows
            if problem is not None:
                found.problems[partition] = problem
            else:
                found.samples.append(sample)
    return found


def check_sources_while_ray_starts(
    pipeline, partitions: list[str], copies: Optional[str], start_ray: Callable[[], Any]
) -> InputCheck:
    """check_sources in a thread; once one file has passed, ``start_ray`` here meanwhile (seconds of
    Ray's processes starting, overlapping the reads). Here, not in a thread: Ray ties its head
    processes to the thread that starts them, and the caller's lives as long as the run. A run
    whose every file is bad starts no Ray."""
    passed = threading.Event()  # also set when the check ends: the run goes on as before then
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="input-check-run") as checker:
        checking = checker.submit(check_sources, pipeline, partitions, copies, passed)
        checking.add_done_callback(lambda _: passed.set())
        if passed.wait() and not checking.done():
            start_ray()
        return checking.result()


def _check(
    pipeline, partition: str, copies: Optional[str], preprocess
) -> tuple[str, int, Optional[str], Optional[pa.Table]]:
    rows, first = 0, None
    kept: list[pa.Table] = []  # a reservoir of one-row slices, seeded: the same file gives the same sample
    chooser = random.Random(partition)
    try:
        for chunk in pipeline.source.read(partition, chunk_rows=CHUNK_ROWS, copies=copies):
            first = chunk.slice(0, PREPROCESS_ROWS) if first is None else first
            for index in range(chunk.num_rows):
                seen = rows + index
                if seen < SAMPLE_ROWS:
                    kept.append(chunk.slice(index, 1))
                elif (slot := chooser.randrange(seen + 1)) < SAMPLE_ROWS:
                    kept[slot] = chunk.slice(index, 1)
            rows += chunk.num_rows
        if preprocess is not None and first is not None:
            preprocess(first)
    except RayNeededBeforeItStarted:
        pass  # a preprocess function that uses Ray is checked where it runs, in Ray
    except (SourceError, RowError) as exc:
        return partition, rows, str(exc), None
    return partition, rows, None, pa.concat_tables(kept, promote_options="permissive")
