"""llm_assets: batch LLM inference as partitioned Dagster assets, executed on Ray with a fixed pool
of engine replicas. Start with :class:`LLMPipeline` and ``definitions.py``."""

from llm_assets.config import OfflineProcessorConfig, ProcessorConfig
from llm_assets.engines.vllm import vLLMEngineProcessorConfig
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource, S3PrefixSource

__all__ = ["LLMPipeline", "LocalFolderSource", "OfflineProcessorConfig", "ProcessorConfig", "S3PrefixSource", "vLLMEngineProcessorConfig"]
