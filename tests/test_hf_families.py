"""Today's model families both ways with Hugging Face, against transformers' own PyTorch models: Llama 3.x RoPE
scaling (llama3, linear), Mistral, Qwen2/2.5 (q/k/v biases, tied embeddings) and Qwen3 (q/k RMSNorm, explicit
head_dim). Tiny random configs are built with transformers in the test; fp32 logits agree within 1e-4."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxllm.config import ModelConfig  # noqa: E402
from jaxllm.model import convert  # noqa: E402
from jaxllm.model.padding import pad_sequences  # noqa: E402
from jaxllm.model.spec import init_params  # noqa: E402
from jaxllm.model.transformer import decode_step, forward, prefill  # noqa: E402

VOCAB, LENGTH = 96, 40
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-6, initializer_range=0.2)
# Llama 3 scaling with an original context of 16 tokens, so positions up to LENGTH cross every frequency band.
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = {
    "llama3.1": lambda: transformers.LlamaConfig(**COMMON, max_position_embeddings=128, rope_parameters=LLAMA3),
    "llama-linear": lambda: transformers.LlamaConfig(**COMMON, max_position_embeddings=128, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "mistral": lambda: transformers.MistralConfig(**COMMON, max_position_embeddings=128, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, max_position_embeddings=128, tie_word_embeddings=False),
    "qwen2.5-tied": lambda: transformers.Qwen2Config(**COMMON, max_position_embeddings=128, tie_word_embeddings=True,
                                                     use_sliding_window=False, sliding_window=64),
    "qwen3": lambda: transformers.Qwen3Config(**{**COMMON, "num_key_value_heads": 1}, head_dim=24,
                                              max_position_embeddings=128, tie_word_embeddings=False),
}


def build(family: str, path):
    """A random float32 HF model of the family, biases and norm scales randomised too (transformers starts
    biases at 0 and norms at 1, which would hide a missing or misplaced one); saved as safetensors."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(path, safe_serialization=True)
    return model


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def jax_logits(params, cfg, tokens):
    return np.asarray(forward(params, jnp.asarray(tokens, jnp.int32), dataclasses.replace(cfg, attention_impl="xla")))


TOKENS = np.random.default_rng(1).integers(0, VOCAB, (2, LENGTH))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_hf_to_hf_and_back_match_transformers(tmp_path, family):
    model = build(family, tmp_path / "hf")
    params, cfg = convert.from_hf(tmp_path / "hf")
    expected = torch_logits(model, TOKENS)
    np.testing.assert_allclose(jax_logits(params, cfg, TOKENS), expected, atol=1e-4, rtol=0)

    out = convert.to_hf(params, cfg, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    # Mistral without a window is Llama's architecture, and exports as Llama.
    assert type(reloaded).__name__ == type(model).__name__.replace("Mistral", "Llama")
    np.testing.assert_allclose(torch_logits(reloaded, TOKENS), expected, atol=1e-4, rtol=0)
    again, cfg_again = convert.from_hf(out)
    assert cfg_again == cfg
    jax.tree.map(np.testing.assert_array_equal, again, params)     # bit-exact round trip


def test_the_decoders_features_are_what_the_families_declare(tmp_path):
    cfgs = {f: convert.hf_config_to_model_config(FAMILIES[f]().to_dict()) for f in FAMILIES}
    assert cfgs["llama3.1"].rope_scaling == "llama3" and cfgs["llama3.1"].rope_original_max_len == 16
    assert cfgs["llama-linear"].rope_scaling == "linear" and cfgs["llama-linear"].rope_scaling_factor == 4.0
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].qk_norm and cfgs["qwen2.5-tied"].tie_embeddings
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 24 and cfgs["qwen3"].num_kv_heads == 1


def test_our_random_qwen3_exports_to_the_logits_transformers_computes(tmp_path):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      mlp_dim=64, max_seq_len=128, qk_norm=True, rope_scaling="llama3", rope_scaling_factor=4.0,
                      rope_original_max_len=16, init_std=0.2)
    params = init_params(cfg, jax.random.key(3))
    params["layers"]["attn"]["q_norm"] = 1 + 0.3 * jax.random.normal(jax.random.key(4), (2, 16))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(convert.to_hf(params, cfg, tmp_path / "out")).eval()
    assert type(reloaded).__name__ == "Qwen3ForCausalLM"
    np.testing.assert_allclose(jax_logits(params, cfg, TOKENS), torch_logits(reloaded, TOKENS), atol=1e-4, rtol=0)


def test_cached_decode_equals_forward_for_a_qwen_shaped_model():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=48, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=24,
                      mlp_dim=64, max_seq_len=64, qk_norm=True, qkv_bias=True, attention_impl="xla", init_std=0.2)
    params = init_params(cfg, jax.random.key(0))
    params["layers"]["attn"]["k_bias"] = 0.5 * jax.random.normal(jax.random.key(1), (2, 1, 24))
    prompt, more = TOKENS[0, :7].tolist(), TOKENS[0, 7:12].tolist()
    tokens, seg, pos = pad_sequences([prompt], 8, side="left")
    logits, cache = prefill(params, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos), cfg, cache_len=16)
    steps = [np.asarray(logits[0])]
    for t, token in enumerate(more):
        logits, cache = decode_step(params, cache, jnp.asarray([token]), jnp.asarray([7 + t]), 8 + t, cfg)
        steps.append(np.asarray(logits[0]))
    full = np.asarray(forward(params, jnp.asarray([prompt + more]), cfg))[0, 6:]
    np.testing.assert_allclose(np.stack(steps), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("change, message", [
    ({"sliding_window": 32, "use_sliding_window": True}, r"sliding_window = 32 is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     r"rope_parameters\.rope_type = 'dynamic' is not supported"),
])
def test_unsupported_fields_are_named(tmp_path, change, message):
    config = {**FAMILIES["qwen2"]().to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        convert.hf_config_to_model_config(config, tmp_path / "config.json")


@pytest.mark.parametrize("preset, parameters", [("qwen2.5-0.5b", 494_032_768), ("qwen2.5-7b", 7_615_616_512),
                                                ("qwen3-8b", 8_190_735_360), ("llama3.1-8b", 8_030_261_248)])
def test_presets_have_the_published_parameter_counts(preset, parameters):
    """The counts the model cards state (transformers' num_parameters() of each released checkpoint)."""
    from jaxllm.model.spec import count_params
    assert count_params(ModelConfig.preset(preset)) == parameters


def test_sft_of_a_tiny_qwen3_with_its_chat_template_then_generate(tmp_path, shared_data, caplog):
    """The road of a user starting from Qwen3: an HF folder (here tiny, random, with minimind's byte-level BPE
    tokenizer and chatml template) fine-tuned by SFT with data.template=auto, then generated from with the
    template it was trained with, which the run saved."""
    import logging
    import shutil

    from jaxllm.cli import load_config
    from jaxllm.data import templates
    from jaxllm.eval.cli import generate_main
    from jaxllm.inference import load_for_inference
    from jaxllm.trainer import train

    minimind = shared_data / "tokenizers" / "minimind"
    base = tmp_path / "qwen3"
    hf_cfg = FAMILIES["qwen3"]()
    hf_cfg.vocab_size = 6400
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(base, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(minimind / name, base / name)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"第{i}个问题", "output": "好的。"}, ensure_ascii=False) + "\n"
                            for i in range(40)), encoding="utf-8")
    workdir = tmp_path / "run"
    train(load_config(["--config=sft:model=tiny", f"--config.init_from={base}", f"--config.data.train=('{data}',)",
                       f"--config.workdir={workdir}", "--config.data.seq_len=64", "--config.train.steps=3",
                       "--config.train.batch_size=4", "--config.train.eval_every=0", "--config.train.save_every=3"]))
    own = templates.model_template(minimind)
    model = load_for_inference(str(workdir))
    assert model.cfg.qk_norm and model.cfg.head_dim == 24
    assert model.template.source == own.source                 # saved with the run: serve and score use it too
    with caplog.at_level(logging.INFO):
        assert generate_main([f"--checkpoint={workdir}", "--prompt=你好", "--max_new_tokens=4", "--attention=xla"]) == 0
    assert "chat_template.jinja, the model's own" in caplog.text     # generate logs which template it applies
