"""The response cache: an engine answer reused for an identical request, across partitions and runs.

A request's key hashes what decides the engine's answer: the cache scope (the model folder's
fingerprint, the engine library and code, the engine settings that change outputs, the task) and
the row's request columns (prompt token ids or prompt, sampling or pooling params, tokenization
kwargs, a LoRA model name). The chat template is in the token ids. Answers are Parquet segments
(the key and the engine's output columns) under ``{storage root}/_response_cache/{scope}/``,
written by the first task after the engine; a segment is complete or absent (``atomic.py``).

Each batch on its way to the engine passes a lookup first (``CacheLookup``, a Ray Data stage):
rows whose key is stored get their answer there (``time_taken_llm`` 0, ``request_id``
``<row_id>#cached``) and pass the engine by; the others go to the engine with their key, and the
first stage after the engine stores their answers. Only deterministic requests are cached by default (greedy, a
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
from llm_assets.execution.reads import KEPT
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
    """Each row's key; null where the row is not looked up: failed upstream, not deterministic, or
    answered already (a row of a resumed attempt's files)."""
    present = [name for name in REQUEST_COLUMNS if name in table.column_names]
    values = {name: table.column(name).to_pylist() for name in present}
    errors = column_or_none(table, ERROR_COLUMN)
    kept = column_or_none(table, KEPT)
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
        if (
            errors[i]
            or kept[i]
            or not (settings.pooling or settings.mode == "all" or _deterministic(request.get("sampling_params")))
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


class CacheLookup:
    """A Ray Data UDF before the engine: each row gets its key (``KEY``) and, where the cache holds
    its answer, the answer's columns and ``__cached__`` set (``time_taken_llm`` 0, ``request_id``
    ``<row_id>#cached``); the engine stage passes those rows by."""

    def __init__(self, index, settings: CacheSettings, filesystem):
        import ray

        # The stored keys: put once by the run (in a list, so that Ray hands the reference over),
        # or the table itself.
        self.index = ray.get(index[0]) if isinstance(index, list) else index
        self.settings, self.filesystem = settings, filesystem

    def __call__(self, table: pa.Table) -> pa.Table:
        from llm_assets.execution.engine_stage import CACHED

        keys = request_keys(table, self.settings)
        found = pc.fill_null(pc.is_in(keys, value_set=self.index.column(KEY)), False) if self.index.num_rows else None
        answers = (
            _stored_answers(keys.filter(found), self.index, self.settings, self.filesystem)
            if found is not None and pc.any(found).as_py()
            else None
        )
        table = table.append_column(KEY, keys)
        if answers is None:
            return table.append_column(CACHED, pa.array([False] * table.num_rows))
        # A key whose segment is gone since the run started (the cache was cleared) is a miss.
        at = pc.index_in(keys, value_set=answers.column(KEY))
        hit = pc.fill_null(pc.is_valid(at), False)
        for name in answers.column_names[1:]:
            table = _answered(table, name, answers.column(name).take(at), hit)
        if "time_taken_llm" in self.settings.per_request_columns:
            table = _answered(table, "time_taken_llm", pa.array([0.0] * table.num_rows), hit)
        if "request_id" in self.settings.per_request_columns:
            ids = pc.binary_join_element_wise(pc.cast(table.column(ROW_ID), pa.string()), "#cached", "")
            table = _answered(table, "request_id", ids, hit)
        return table.append_column(CACHED, hit)


def _answered(table: pa.Table, name: str, values, hit) -> pa.Table:
    """The column ``name`` with ``values`` where ``hit``, and what it held before elsewhere: a batch
    that also holds rows of a resumed attempt's files has the engine's columns already."""
    if name not in table.column_names:
        return table.append_column(name, pc.if_else(hit, values, pa.scalar(None, values.type)))
    before = table.column(name)
    merged = pc.if_else(hit, values.cast(before.type), before)
    return table.set_column(table.schema.get_field_index(name), name, merged)


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


def store_answers(table: pa.Table, settings: CacheSettings, filesystem) -> None:
    """The engine's new answers (rows with a key and no error), as one segment."""
    keep = pc.is_valid(table.column(KEY))
    if ERROR_COLUMN in table.column_names:
        keep = pc.and_(keep, pc.invert(failed_mask(table.column(ERROR_COLUMN))))
    answers = table.filter(keep).select([KEY, *(c for c in settings.answer_columns if c in table.column_names)])
    if answers.num_rows:
        write_parquet(filesystem, f"{settings.folder}/seg-{uuid.uuid4().hex}.parquet", answers)


class RunCache:
    """The run's side: the stored keys, read in a thread while the run starts."""

    def __init__(self, settings: CacheSettings, index: Future, filesystem, log):
        self.settings, self._index, self.filesystem, self.log = settings, index, filesystem, log
        self._index_ref = None
        self.stored = 0

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

    def index_ref(self):
        """The stored keys in Ray's object store (read once, logged once)."""
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
