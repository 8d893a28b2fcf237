"""Serving: an OpenAI-compatible HTTP server (server.py: HTTP, API keys, request log) for the OpenAI API
(api.py, token logprobs in logprobs.py) over a batching engine (engine.py); `jaxllm serve` (cli.py)."""
