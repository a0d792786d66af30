"""llm_assets: batch LLM inference as partitioned Dagster assets, executed on Ray with a fixed pool
of engine replicas. Start with :class:`LLMPipeline` and ``definitions.py``."""

from llm_assets.config import OfflineProcessorConfig, ProcessorConfig
from llm_assets.engines.http import HttpRequestProcessorConfig
from llm_assets.engines.serve import ServeDeploymentProcessorConfig, ServeEngine
from llm_assets.engines.sglang import SGLangEngineProcessorConfig
from llm_assets.engines.vllm import vLLMEngineProcessorConfig
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource, S3PrefixSource

__all__ = [
    "HttpRequestProcessorConfig",
    "LLMPipeline",
    "LLMPipelineComponent",
    "LocalFolderSource",
    "OfflineProcessorConfig",
    "ProcessorConfig",
    "S3PrefixSource",
    "SGLangEngineProcessorConfig",
    "ServeDeploymentProcessorConfig",
    "ServeEngine",
    "vLLMEngineProcessorConfig",
]


def __getattr__(name: str):
    # Imported on first use: the component imports Dagster, which Ray workers (they import this
    # package to run stages) should not pay for. `dg` finds it here (the registry entry point).
    if name == "LLMPipelineComponent":
        from llm_assets.defs.component import LLMPipelineComponent

        return LLMPipelineComponent
    raise AttributeError(f"module 'llm_assets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
