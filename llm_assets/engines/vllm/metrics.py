"""``log_engine_metrics``: vLLM's engine metrics, exported as ray.data.llm exports them, and one
summary per engine for the run.

With it on, the engine keeps vLLM's stats: Ray's Prometheus endpoint gets vLLM's metrics
(``RayPrometheusStatLogger``, what ray.data.llm 2.60 installs), and ``EngineMetrics`` sums what a
run's report needs (prefix cache hits, preemptions, peak KV cache use, time to first token); the
engine's shutdown report carries that into the run's log and the engine stage's metadata. Off
(the default here, where ray.data.llm's is on), vLLM keeps no stats, as its offline ``LLM`` class:
recording them costs the engine's step loop time on every step.
"""

from __future__ import annotations

from typing import Any


class EngineMetrics:
    """A vLLM stat logger (duck-typed: vLLM calls the factory with its config and engine index,
    then ``record`` after every step) that keeps totals instead of logging them."""

    def __init__(self) -> None:
        self.prefix_queries = self.prefix_hits = self.preempted = self.first_tokens = 0
        self.kv_cache_peak = self.first_token_s = 0.0

    def factory(self, vllm_config: Any = None, engine_index: int = 0) -> "EngineMetrics":
        return self

    def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
        if scheduler_stats is not None:
            self.kv_cache_peak = max(self.kv_cache_peak, scheduler_stats.kv_cache_usage)
            self.prefix_queries += scheduler_stats.prefix_cache_stats.queries
            self.prefix_hits += scheduler_stats.prefix_cache_stats.hits
        if iteration_stats is not None:
            self.preempted += iteration_stats.num_preempted_reqs
            self.first_tokens += len(iteration_stats.time_to_first_tokens_iter)
            self.first_token_s += sum(iteration_stats.time_to_first_tokens_iter)

    def log_engine_initialized(self) -> None:
        pass  # nothing to say until the engine shuts down

    def log(self) -> None:
        pass  # totals, reported once by summary()

    def record_sleep_state(self, *args: Any) -> None:
        pass  # batch engines do not sleep

    def summary(self) -> dict[str, float]:
        return {
            "prefix_cache_hit_rate": round(self.prefix_hits / self.prefix_queries, 4) if self.prefix_queries else 0.0,
            "preempted_requests": self.preempted,
            "kv_cache_peak_usage": round(self.kv_cache_peak, 4),
            "mean_time_to_first_token_s": round(self.first_token_s / self.first_tokens, 4)
            if self.first_tokens
            else 0.0,
        }


def stat_loggers(metrics: EngineMetrics) -> list:
    """The loggers vLLM gets with ``log_engine_metrics``: Ray's Prometheus export and the summary."""
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    return [RayPrometheusStatLogger, metrics.factory]
