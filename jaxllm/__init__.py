"""jaxllm: train large language models from scratch in JAX."""
