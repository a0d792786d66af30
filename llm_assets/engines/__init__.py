"""Engines by processor config class. A new engine is a module (or package) here and one line below."""

from llm_assets.engines.base import EngineReplica, EngineSpec
from llm_assets.engines.http import HTTP
from llm_assets.engines.serve import SERVE
from llm_assets.engines.sglang import SGLANG
from llm_assets.engines.vllm import VLLM

ENGINES: dict[type, EngineSpec] = {spec.config_class: spec for spec in (VLLM, SGLANG, HTTP, SERVE)}


def engine_for(config) -> EngineSpec:
    try:
        return ENGINES[type(config)]
    except KeyError:
        known = ", ".join(cls.__name__ for cls in ENGINES)
        raise TypeError(f"no engine is registered for {type(config).__name__}: expected one of {known}") from None


__all__ = ["ENGINES", "EngineReplica", "EngineSpec", "engine_for"]
