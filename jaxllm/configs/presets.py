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
    # Today's base models that already speak Chinese (numbers from each model's published config.json):
    # `convert from-hf` gives the same architecture, and plan-memory sizes runs on them.
    "qwen2.5-0.5b": dict(vocab_size=151936, d_model=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                         mlp_dim=4864, max_seq_len=32768, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True,
                         qkv_bias=True),
    "qwen2.5-7b": dict(vocab_size=152064, d_model=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                       mlp_dim=18944, max_seq_len=32768, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True),
    "qwen3-8b": dict(vocab_size=151936, d_model=4096, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
                     mlp_dim=12288, max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6, qk_norm=True),
    "llama3.1-8b": dict(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                        mlp_dim=14336, max_seq_len=131072, rope_theta=5e5, norm_eps=1e-5, rope_scaling="llama3",
                        rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_len=8192),
}
