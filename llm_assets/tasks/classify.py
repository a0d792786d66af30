"""Classification: a prompt in, a sequence-classification model's class probabilities out (in
``embeddings``, as ray.data.llm writes them). The same stages and columns as embeddings; the
engine runs the model's classification head instead of its pooler's embedding."""

import dataclasses

from llm_assets.tasks.embed import EMBED

CLASSIFY = dataclasses.replace(EMBED, name="classify", openai_urls=())
