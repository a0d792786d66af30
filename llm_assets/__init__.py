"""llm_assets: batch LLM inference as partitioned Dagster assets, executed with Ray Data on a
fixed pool of vLLM engines. Start with :class:`LLMPipeline` and ``definitions.py``."""

from llm_assets.config import vLLMEngineProcessorConfig
from llm_assets.pipeline import LLMPipeline
from llm_assets.sources import LocalFolderSource

__all__ = ["LLMPipeline", "LocalFolderSource", "vLLMEngineProcessorConfig"]
