"""Engines by processor config class. A new engine is a module (or package) here and one line below."""

from llm_assets.engines.base import ENGINES, Engine, EngineReplica, engine_for, register_engine
from llm_assets.engines.fake import FakeEngine
from llm_assets.engines.http import HttpRequestEngine
from llm_assets.engines.serve import ServeDeploymentEngine
from llm_assets.engines.sglang import SGLangEngine
from llm_assets.engines.vllm import vLLMEngine

register_engine(vLLMEngine)
register_engine(SGLangEngine)
register_engine(HttpRequestEngine)
register_engine(ServeDeploymentEngine)
register_engine(FakeEngine)

__all__ = ["ENGINES", "Engine", "EngineReplica", "engine_for", "register_engine"]
