"""Serving: an OpenAI-compatible HTTP server (server.py) over a batching engine (engine.py); `jaxllm serve`
(cli.py)."""
