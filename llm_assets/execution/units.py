"""The Ray task that carries one unit (a batch of one partition) through consecutive CPU stages.

For each stage it applies the stage's UDF in slices of the stage's ``batch_size`` and writes the
stage's output for this unit as one Parquet file into the stage's attempt folder, from this task:
Parquet writing runs on the cluster's CPUs, in parallel, never queued on the driver. It returns
the last stage's output (left in Ray's object store for the next step) and, separately, what it
wrote and how the task spent its time (small: the driver waits on this one only): when it
started, how long it ran, on CPU, and building the stages (a tokenizer loaded: a cold worker).

The stage marked ``udf=None`` writes its input as it is: that is how the engine's output, coming
back from an engine actor, is written by the first task after the engine.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa

from llm_assets.atomic import write_parquet
from llm_assets.execution.cache import CacheSettings, complete
from llm_assets.execution.stats import batch_counts, batch_summary
from llm_assets.secret_env import applied as secret_env_applied


@dataclass(frozen=True)
class StageCall:
    name: str
    udf: Optional[type]
    udf_kwargs: dict[str, Any]
    batch_size: int
    partition_dir: str  # where this stage's output of the unit's partition goes
    attempt: str
    count_columns: dict = field(default_factory=dict)  # the engine's own count columns (Engine.count_columns)


def _apply(udf, table: pa.Table, batch_size: int) -> pa.Table:
    if table.num_rows <= batch_size:
        return udf(table)
    outputs = [udf(table.slice(offset, batch_size)) for offset in range(0, table.num_rows, batch_size)]
    return pa.concat_tables(outputs, promote_options="permissive")


def run_unit(
    table: pa.Table,
    calls: list[StageCall],
    file_name: str,
    filesystem,
    secret_env: dict[str, str],
    cached_rows: Optional[pa.Table] = None,
    cache: Optional[CacheSettings] = None,
    order: Optional[list] = None,
) -> tuple[pa.Table, dict[str, Any]]:
    started, cpu_started, setup_s = time.time(), time.process_time(), 0.0
    size_tokenizer_threads()
    if cache is not None:  # the engine's output of a unit that passed the response cache
        table = complete(table, cached_rows, cache, order, filesystem)
    written = []
    with secret_env_applied(secret_env):
        for call in calls:
            if call.udf is not None:
                # Built per task: cheap, since the tokenizer a stage loads is cached per process.
                building = time.monotonic()
                udf = call.udf(**call.udf_kwargs)
                setup_s += time.monotonic() - building
                table = _apply(udf, table, call.batch_size)
            name = f"{call.attempt}/{file_name}"
            write_parquet(filesystem, f"{call.partition_dir}/{name}", table)
            written.append(
                {"stage": call.name, "file": name, **batch_counts(table, call.count_columns), **batch_summary(table)}
            )
    return table, {
        "written": written,
        "started": started,
        "run_s": time.time() - started,
        "cpu_s": time.process_time() - cpu_started,
        "setup_s": setup_s,
    }


def size_tokenizer_threads() -> None:
    """Hugging Face tokenizers encode and decode batches on a Rayon pool of one thread per core of
    the machine, whatever CPUs the task reserved: a few stage tasks beside the engine then run
    dozens of threads that compete with the engine's step loop for cores. As Ray sizes OpenMP
    (``OMP_NUM_THREADS``: the task's CPUs), so is the pool sized, unless the stage's runtime_env
    sets ``RAYON_NUM_THREADS``. Rayon reads it once, when a process first tokenizes."""
    os.environ.setdefault("RAYON_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
