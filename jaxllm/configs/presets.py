"""Model presets: the architecture of each named model size, in one place.

`ModelConfig.preset(name)` and the configs' `:model=<name>` argument read this table; the fields not named
here keep their ModelConfig defaults (jaxllm/config.py).
"""
from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # Fast CPU tests and the main job: a few hundred thousand parameters.
    "tiny": dict(vocab_size=1024, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 mlp_dim=192, max_seq_len=512),
    # GPT-2 small's size with Llama's blocks: the first model worth pretraining on one accelerator.
    "125m": dict(vocab_size=32000, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, head_dim=64,
                 mlp_dim=2048, max_seq_len=2048),
    # TinyLlama-1.1B's architecture (GQA with 4 KV heads): Hugging Face weights load into it.
    "tinyllama-1.1b": dict(vocab_size=32000, d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                           head_dim=64, mlp_dim=5632, max_seq_len=2048, norm_eps=1e-5),
    # Llama 2 7B's architecture: the size the memory planner and the pod launchers are sized for.
    "llama2-7b": dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                      head_dim=128, mlp_dim=11008, max_seq_len=4096, norm_eps=1e-5),
}
