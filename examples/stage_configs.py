# Engine configs import from the package, as from ray.data.llm; the stage config classes from llm_assets.config.
from llm_assets import vLLMEngineProcessorConfig  # also SGLang-, HttpRequest-, ServeDeploymentProcessorConfig
from llm_assets.config import TokenizerStageConfig

config = vLLMEngineProcessorConfig(
    model_source="Qwen/Qwen2.5-0.5B-Instruct",
    batch_size=64,
    tokenize_stage=TokenizerStageConfig(batch_size=256, num_cpus=1),  # or {"batch_size": 256, "num_cpus": 1}
    chat_template_stage=True,  # True/False, a dict, or the stage's config class
)
