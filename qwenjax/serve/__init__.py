"""`qwenjax serve`: continuous batching (`scheduler`) behind OpenAI- and Anthropic-compatible
HTTP routes (`app`, `openai_api`, `anthropic_api`), with an incremental reply parser
(`stream_parser`), constrained decoding for `response_format` (`grammar`, llguidance) and
Prometheus metrics (`metrics`). Submodules are imported on use: the HTTP stack is not needed to
use the scheduler, nor jax to parse replies."""
