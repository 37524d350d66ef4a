"""An OpenAI-compatible HTTP server for a causal LM (`llmctl serve`): FastAPI + uvicorn, an optional extra.

- `schema`: the request bodies of `/v1/completions` and `/v1/chat/completions` (pydantic) and OpenAI's error shape.
- `batcher`: requests wait in a bounded queue; one worker thread takes every request waiting (up to a batch size)
  and decodes them together (`core.generation.decode`: one forward pass per token for the whole batch, each
  request its own sampling, stops and budget), streaming each token back to its request as it is made.
- `app`: the FastAPI app: `/health`, `/v1/models`, `/v1/completions` (echo, logprobs), `/v1/chat/completions`,
  server-sent events for `stream=true`, usage counts, an API key, 429 with Retry-After when the queue is full,
  one log line per request.
"""
