"""The response cache: an engine answer reused for an identical request, across partitions and runs.

A request's key hashes what decides the engine's answer: the cache scope (the model folder's
fingerprint, the engine library and code, the engine settings that change outputs, the task) and
the row's request columns (prompt token ids or prompt, sampling or pooling params, tokenization
kwargs, a LoRA model name). The chat template is in the token ids. Answers are Parquet segments
(the key and the engine's output columns) under ``{storage root}/_response_cache/{scope}/``,
written by the first task after the engine; a segment is complete or absent (``atomic.py``).

Each unit on its way to the engine passes a lookup task first: rows whose key is stored are
answered from the cache (``time_taken_llm`` 0, ``request_id`` ``<row_id>#cached``), the others go
to the engine with their key, and the first task after the engine stores their answers and puts
the unit's rows back in order. Only deterministic requests are cached by default (greedy, a
fixed ``seed``, or pooling: embeddings, classification); ``response_cache="all"`` caches every
request, ``"off"`` none. The run reads the stored keys once, when it starts: answers stored during
a run serve later runs.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llm_assets import versions
from llm_assets.atomic import write_parquet
from llm_assets.engines.pool import unwrap
from llm_assets.execution.stats import batch_counts
from llm_assets.rows import ERROR_COLUMN, ROW_ID, column_or_none, failed_mask, loads_params

CACHE_DIR = "_response_cache"
KEY = "__response_cache_key__"
KEY_TYPE = pa.binary(16)
# What decides an engine's answer besides the scope: the columns the model engines read.
REQUEST_COLUMNS = (
    "tokenized_prompt",
    "token_type_ids",
    "prompt",
    "sampling_params",
    "pooling_params",
    "tokenization_kwargs",
    "model",
    "multimodal_data",
)
# The model engines leave the token ids and media out of their output (earlier stages persisted them): so do hits.
NOT_IN_ENGINE_OUTPUT = ("tokenized_prompt", "token_type_ids", "multimodal_data")
# Per request, not per answer: a hit gets its own.
NOT_STORED = ("time_taken_llm", "request_id")


@dataclass(frozen=True)
class CacheSettings:
    scope: str
    folder: str  # the scope's segments
    mode: str
    pooling: bool  # embeddings or classification: every request is deterministic
    answer_columns: tuple[str, ...]  # the engine's output columns a segment stores
    per_request_columns: tuple[str, ...]  # the engine's output columns a hit gets its own value of


def cache_settings(pipeline, model_path: Optional[str], storage) -> Optional[CacheSettings]:
    """The run's cache, or None: switched off, or an engine without a model of its own (an HTTP
    endpoint's answers can change under the same request)."""
    if pipeline.response_cache == "off" or model_path is None:
        return None
    scope = versions.digest({"model": versions.folder_fingerprint(model_path), "engine": pipeline.engine_identity()})
    columns = [*pipeline.task.engine_columns, *(["generated_text"] if pipeline.engine_detokenizes() else [])]
    return CacheSettings(
        scope,
        storage.response_cache_dir(scope),
        pipeline.response_cache,
        pipeline.config.task_type != "generate",
        tuple(c for c in columns if c not in NOT_STORED),
        tuple(c for c in columns if c in NOT_STORED),
    )


def request_keys(table: pa.Table, settings: CacheSettings) -> pa.Array:
    """Each row's key; null where the row is not cached (failed upstream, or not deterministic)."""
    present = [name for name in REQUEST_COLUMNS if name in table.column_names]
    values = {name: table.column(name).to_pylist() for name in present}
    errors = column_or_none(table, ERROR_COLUMN)
    keys: list[Optional[bytes]] = []
    for i in range(table.num_rows):
        request = {name: values[name][i] for name in present}
        for name in ("sampling_params", "pooling_params"):
            if isinstance(request.get(name), str):  # JSON text: keyed by its content, not its spelling
                request[name] = loads_params(request[name])
        if request.get(
            "multimodal_data"
        ):  # the prompt's tokens hold one placeholder per image: key the media by content
            request["multimodal_data"] = [(item["modality"], item["sha256"]) for item in request["multimodal_data"]]
        if errors[i] or not (
            settings.pooling or settings.mode == "all" or _deterministic(request.get("sampling_params"))
        ):
            keys.append(None)
            continue
        blob = json.dumps([settings.scope, request], sort_keys=True, separators=(",", ":"), default=str)
        keys.append(hashlib.sha256(blob.encode()).digest()[:16])
    return pa.array(keys, KEY_TYPE)


def _deterministic(params: Any) -> bool:
    params = params if isinstance(params, dict) else {}
    return params.get("temperature") == 0 or params.get("seed") is not None


def load_index(settings: CacheSettings, filesystem, read: bool = True) -> pa.Table:
    """Every stored key and its segment (the keys only: 16 bytes a row); none unless ``read``."""
    import pyarrow.fs as pafs

    infos = filesystem.get_file_info(pafs.FileSelector(settings.folder, allow_not_found=True)) if read else []
    tables = []
    for info in infos:
        if info.is_file and info.base_name.startswith("seg-") and info.base_name.endswith(".parquet"):
            keys = pq.read_table(info.path, columns=[KEY], filesystem=filesystem).column(KEY)
            tables.append(pa.table({KEY: keys, "segment": pa.array([info.path] * len(keys), pa.string())}))
    return (
        pa.concat_tables(tables)
        if tables
        else pa.table({KEY: pa.array([], KEY_TYPE), "segment": pa.array([], pa.string())})
    )


def lookup(
    table: pa.Table, index: pa.Table, settings: CacheSettings, filesystem
) -> tuple[Optional[pa.Table], Optional[pa.Table], dict]:
    """A Ray task before the engine: (the rows answered from the cache, in the engine's output
    shape; the rows for the engine, with their key; counts and, when both, the rows' order)."""
    keys = request_keys(table, settings)
    with_keys = table.append_column(KEY, keys)
    found = pc.fill_null(pc.is_in(keys, value_set=index.column(KEY)), False) if index.num_rows else None
    answers = (
        _stored_answers(keys.filter(found), index, settings, filesystem)
        if found is not None and pc.any(found).as_py()
        else None
    )
    if answers is None:
        return None, with_keys, {"hits": 0, "misses": table.num_rows, "order": None, "hit_tokens": 0}
    # A key whose segment is gone since the run started (the cache was cleared) is a miss.
    at = pc.index_in(keys, value_set=answers.column(KEY))
    hit = pc.fill_null(pc.is_valid(at), False)
    hits = table.filter(hit).drop_columns([c for c in NOT_IN_ENGINE_OUTPUT if c in table.column_names])
    taken = answers.take(at.filter(hit))
    for name in taken.column_names[1:]:
        hits = hits.append_column(name, taken.column(name))
    if "time_taken_llm" in settings.per_request_columns:
        hits = hits.append_column("time_taken_llm", pa.array([0.0] * hits.num_rows, pa.float64()))
    if "request_id" in settings.per_request_columns:
        hits = hits.append_column(
            "request_id", pa.array([f"{row_id}#cached" for row_id in hits.column(ROW_ID).to_pylist()], pa.string())
        )
    misses = with_keys.filter(pc.invert(hit))
    order = table.column(ROW_ID).to_pylist() if misses.num_rows else None
    # Tokens the cached rows carry: not generated by this run.
    hit_tokens = batch_counts(hits)["generated_tokens"]
    return (
        hits,
        (misses if misses.num_rows else None),
        {"hits": hits.num_rows, "misses": misses.num_rows, "order": order, "hit_tokens": hit_tokens},
    )


def _stored_answers(keys: pa.Array, index: pa.Table, settings: CacheSettings, filesystem) -> Optional[pa.Table]:
    at = pc.index_in(keys, value_set=index.column(KEY))
    segments = pc.unique(index.column("segment").take(at)).to_pylist()
    parts = []
    for segment in segments:
        try:
            stored = pq.read_table(segment, columns=[KEY, *settings.answer_columns], filesystem=filesystem)
        except FileNotFoundError:  # cleared since the run started: its rows go to the engine
            continue
        except (pa.ArrowInvalid, OSError) as exc:
            raise RuntimeError(
                f"the response cache's file {segment} cannot be read ({exc}): delete it, or run the pipeline "
                f"with response_cache='off'"
            ) from exc
        parts.append(stored.filter(pc.is_in(stored.column(KEY), value_set=keys)))
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


def complete(
    table: pa.Table, hits: Optional[pa.Table], settings: Optional[CacheSettings], order: Optional[list], filesystem
) -> pa.Table:
    """In the first task after the engine: store the engine's new answers (rows with a key and no
    error), drop the key, and put the unit's cached rows back among them, in the unit's order."""
    if KEY in table.column_names:
        if settings is not None:
            _store(table, settings, filesystem)
        table = table.drop_columns([KEY])
    if hits is None:
        return table
    table = pa.concat_tables([table, hits], promote_options="permissive")
    ids = pa.array(order, table.schema.field(ROW_ID).type)
    return table.take(pc.index_in(ids, value_set=table.column(ROW_ID))) if order else table


def _store(table: pa.Table, settings: CacheSettings, filesystem) -> None:
    keep = pc.is_valid(table.column(KEY))
    if ERROR_COLUMN in table.column_names:
        keep = pc.and_(keep, pc.invert(failed_mask(table.column(ERROR_COLUMN))))
    answers = table.filter(keep).select([KEY, *(c for c in settings.answer_columns if c in table.column_names)])
    if answers.num_rows:
        write_parquet(filesystem, f"{settings.folder}/seg-{uuid.uuid4().hex}.parquet", answers)


class RunCache:
    """The driver's side: the stored keys (read in a thread while the run starts) and the lookups
    in flight."""

    def __init__(self, settings: CacheSettings, index: Future, filesystem, log):
        self.settings, self._index, self.filesystem, self.log = settings, index, filesystem, log
        self._index_ref = None
        self.stored = 0
        self.lookups: dict = {}  # counts ref -> (unit, hits ref, misses ref)

    @classmethod
    def start(cls, pipeline, model_path: Optional[str], storage, recompute: bool, log) -> Optional["RunCache"]:
        """The run's cache (None where there is none): the stored keys are read in a thread while
        the CPU stages start, and the first unit for the engine waits for them. A run asked to
        recompute reads none (it still stores its answers)."""
        settings = cache_settings(pipeline, model_path, storage)
        if settings is None:
            return None
        filesystem = storage.filesystem()
        filesystem.create_dir(settings.folder, recursive=True)  # the tasks after the engine write into it
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="response-cache")
        index = reader.submit(load_index, settings, filesystem, not recompute)
        reader.shutdown(wait=False)
        return cls(settings, index, filesystem, log)

    def _ref(self):
        import ray

        if self._index_ref is None:
            index = self._index.result()
            self.stored, self._index_ref = index.num_rows, ray.put(index)
            self.log(
                f"Response cache ({self.settings.mode} requests): {self.stored} answers stored for this model "
                f"and engine settings in {self.settings.folder}"
            )
        return self._index_ref

    def misses(self, sample: pa.Table) -> bool:
        """Whether any of these rows (as they reach the engine) asks what no stored answer answers."""
        index = self._index.result()
        keys = request_keys(sample, self.settings)
        return keys.null_count > 0 or not pc.all(pc.is_in(keys, value_set=index.column(KEY))).as_py()

    def submit(self, unit) -> None:
        import ray

        hits_ref, misses_ref, counts_ref = (
            ray.remote(lookup)
            .options(num_cpus=0.25, num_returns=3)
            .remote(unit.ref, self._ref(), self.settings, self.filesystem)
        )
        self.lookups[counts_ref] = (unit, hits_ref, misses_ref)

    def settle(self, ref) -> tuple[Any, dict[str, int]]:
        """A finished lookup: (its unit, now holding the rows for the engine, or all its rows
        when every one was cached; the lookup's counts: rows answered from the cache ``hits``,
        the tokens they carry ``hit_tokens``, rows for the engine ``misses``)."""
        import ray

        unit, hits_ref, misses_ref = self.lookups.pop(ref)
        try:
            counts = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            raise unwrap(exc) from None
        if not counts["misses"]:
            unit.ref = hits_ref
        else:
            unit.ref, unit.looked_up, unit.rows = misses_ref, True, counts["misses"]  # what goes to the engine
            unit.hits, unit.order = (hits_ref if counts["hits"] else None), counts["order"]
        return unit, counts

    def task_args(self, unit) -> tuple:
        """For a unit back from the engine after a lookup: its rows the cache answered, the cache
        (to store the new answers) and the unit's row order; the task after the engine puts them
        together."""
        args = (unit.hits, self.settings, unit.order)
        unit.looked_up, unit.hits, unit.order = False, None, None
        return args

    def rows_in_flight(self) -> int:
        return sum(unit.rows for unit, _, _ in self.lookups.values())
