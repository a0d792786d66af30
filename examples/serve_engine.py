from llm_assets import LLMPipeline, LocalFolderSource, ServeDeploymentProcessorConfig, vLLMEngineProcessorConfig
from llm_assets.engines.serve import ServeEngine

chat = ServeEngine(
    app_name="chat",  # one app per engine; a different engine under this name fails the run
    engine=vLLMEngineProcessorConfig(model_source="Qwen/Qwen2.5-7B-Instruct", engine_kwargs={"max_model_len": 4096}),
    num_replicas=1,  # Serve replicas, each one engine with its own GPUs
    idle_timeout_s=600,  # None: keep it until ray.serve.delete("chat")
)


def ask(row):
    return {"question": row["question"], "messages": [{"role": "user", "content": row["question"]}]}


def answer(row):
    return {"question": row["question"], "answer": row["generated_text"]}


def follow_up(row):  # turn 2's input is turn 1's output
    return {
        "messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": row["answer"]},
            {"role": "user", "content": "Say more."},
        ]
    }


turn1 = LLMPipeline(
    name="turn1",
    config=ServeDeploymentProcessorConfig(engine=chat, batch_size=64),
    source=LocalFolderSource("/data/questions"),
    preprocess=ask,
    postprocess=answer,
)
turn2 = LLMPipeline(
    name="turn2",
    config=ServeDeploymentProcessorConfig(engine=chat, batch_size=64),
    source=LocalFolderSource("/data/turn1_answers"),
    preprocess=follow_up,
)
