import dagster as dg

from llm_assets import HttpRequestProcessorConfig, LLMPipeline, LocalFolderSource

config = HttpRequestProcessorConfig(  # ray.data.llm's fields
    url="https://api.example.com/v1/chat/completions",
    headers={"Authorization": dg.EnvVar("API_AUTHORIZATION")},  # "Bearer sk-...", read when the run starts
    qps=20,  # one rate for this URL: every engine actor of every run launched from this machine
    max_retries=5,  # 429, 408, 5xx, timeouts, dropped connections; Retry-After honoured
    concurrency=2,  # engine actors (each keeps several batches in flight)
    should_continue_on_error=True,  # a row out of retries is kept with __inference_error__
)


def preprocess(row):
    messages = [{"role": "user", "content": row["text"]}]
    return {"id": row["id"], "payload": {"model": "gpt-x", "messages": messages, "max_tokens": 64}}


answers = LLMPipeline(name="answers", config=config, source=LocalFolderSource("/data/questions"), preprocess=preprocess)
