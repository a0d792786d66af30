"""The CPU stages, by name: one small Ray Data UDF class each (``__call__(pyarrow.Table) -> Table``).

Each declares what it works on: ``NEEDS`` (columns it reads; ``a|b`` means either), ``ADDS``
(columns it writes), and how the plan builds it: ``USER_FN`` (the pipeline function it applies),
``CONFIG_KWARGS`` (fields of its stage config passed to its constructor); a stage whose
constructor takes ``model_source`` loads the model's tokenizer. Nothing here imports an engine.
"""

from llm_assets.stages.chat_template import ChatTemplateStage
from llm_assets.stages.detokenize import DetokenizeStage
from llm_assets.stages.postprocess import PostprocessStage
from llm_assets.stages.prepare_multimodal import PrepareMultimodalStage
from llm_assets.stages.preprocess import PreprocessStage
from llm_assets.stages.tokenize import TokenizeStage

STAGES: dict[str, type] = {
    "preprocess": PreprocessStage,
    "prepare_multimodal": PrepareMultimodalStage,
    "chat_template": ChatTemplateStage,
    "tokenize": TokenizeStage,
    "detokenize": DetokenizeStage,
    "postprocess": PostprocessStage,
}
# Stage name -> the processor config field that enables and configures it.
OPTIONAL_STAGES = {
    "prepare_multimodal": "prepare_multimodal_stage",
    "chat_template": "chat_template_stage",
    "tokenize": "tokenize_stage",
    "detokenize": "detokenize_stage",
}

__all__ = ["OPTIONAL_STAGES", "STAGES"]
