"""OpenAI Batch API files: request lines in, output and error files out.

- ``requests``: a batch input file's request lines -> pipeline rows, refusing what the pipeline
  cannot honour (``problems``: the error for one bad line; ``sampling``: the body's sampling params).
- ``results``: a finished row -> one output or error file line, with the endpoint's own body
  (``logprobs``: the engine's logprobs column in OpenAI's chat / completions shapes).
- ``files``: the output and error files themselves, each written whole or not at all.
"""

from llm_assets.openai_batch.files import export_openai_batch
from llm_assets.openai_batch.requests import BadLine, is_openai_batch_line, rows_from_openai_batch

__all__ = ["BadLine", "export_openai_batch", "is_openai_batch_line", "rows_from_openai_batch"]
