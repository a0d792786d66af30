"""The OpenAI Batch API endpoints a batch input file's lines may name (each line's ``url``)."""

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
EMBEDDINGS = "/v1/embeddings"
URLS = (CHAT, COMPLETIONS, RESPONSES, EMBEDDINGS)
