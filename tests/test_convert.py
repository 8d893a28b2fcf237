"""Hugging Face Llama <-> jaxllm conversion, checked against transformers' own PyTorch Llama as reference."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from jaxllm.model import convert  # noqa: E402
from jaxllm.model.transformer import forward  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPM_MODEL = SHARED_DATA / "tokenizers" / "sentencepiece_test" / "test_model.model"
VOCAB = 128
# name -> (num_attention_heads, num_key_value_heads, tie_word_embeddings)
VARIANTS = {"mha": (4, 4, False), "gqa": (4, 2, False), "mqa": (4, 1, False), "tied": (4, 2, True)}


def save_hf_llama(path, variant="gqa", seed=0, **save_kwargs):
    """A random float32 LlamaForCausalLM saved as safetensors; returns the torch model (eval mode)."""
    heads, kv_heads, tied = VARIANTS[variant]
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=tied, initializer_range=0.2)   # large init: non-trivial attention patterns
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    return model


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def jax_logits(params, cfg, tokens, **kwargs):
    cfg = dataclasses.replace(cfg, attention_impl="xla")
    return np.asarray(forward(params, jnp.asarray(tokens, jnp.int32), cfg, **kwargs))


def random_tokens(shape, seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, shape)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_from_hf_and_back_matches_torch_logits(tmp_path, variant):
    model = save_hf_llama(tmp_path / "hf", variant)
    params, cfg = convert.from_hf(tmp_path / "hf")
    heads, kv_heads, tied = VARIANTS[variant]
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.tie_embeddings) == (heads, kv_heads, tied)
    assert cfg.rope_theta == 500000.0 and cfg.norm_eps == 1e-5 and cfg.max_seq_len == 256
    assert ("lm_head" in params) == (not tied)
    tokens = random_tokens((2, 24))
    expected = torch_logits(model, tokens)
    np.testing.assert_allclose(jax_logits(params, cfg, tokens), expected, atol=1e-4, rtol=0)

    out = convert.to_hf(params, cfg, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.rope_parameters["rope_theta"] == 500000.0
    np.testing.assert_allclose(torch_logits(reloaded, tokens), expected, atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads_through_index_and_writes_shards(tmp_path):
    model = save_hf_llama(tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    params, cfg = convert.from_hf(tmp_path / "hf")
    tokens = random_tokens((1, 16))
    np.testing.assert_allclose(jax_logits(params, cfg, tokens), torch_logits(model, tokens), atol=1e-4, rtol=0)

    out = convert.to_hf(params, cfg, tmp_path / "out", max_shard_bytes=50_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    again, _ = convert.from_hf(out)
    np.testing.assert_allclose(jax_logits(again, cfg, tokens), torch_logits(model, tokens), atol=1e-4, rtol=0)


# (first document, second document) lengths; 150 + 106 is a full 256-token row, the first document crossing the
# boundary of the blocks of 128 queries that the xla attention runs on a CPU (each against its prefix of keys).
@pytest.mark.parametrize("lengths", [(11, 9), (150, 106)])
def test_packed_documents_match_hf_on_each_document_alone(tmp_path, lengths):
    """Document masking against an independent reference: without segment ids the second document's logits
    differ by ~9. (RoPE scores depend only on relative positions, so once masking holds, restarting positions
    changes nothing measurable; this test checks they are accepted, not that they matter.)"""
    model = save_hf_llama(tmp_path / "hf")
    params, cfg = convert.from_hf(tmp_path / "hf")
    assert cfg.attention_block == 128 and cfg.max_seq_len == 256
    (n1, n2) = lengths
    doc1, doc2 = random_tokens((1, n1), seed=2), random_tokens((1, n2), seed=3)
    packed = np.concatenate([doc1, doc2], axis=1)                                   # (1, n1 + n2)
    segment_ids = np.array([[1] * n1 + [2] * n2])
    positions = np.array([list(range(n1)) + list(range(n2))])
    got = jax_logits(params, cfg, packed, segment_ids=jnp.asarray(segment_ids), positions=jnp.asarray(positions))
    expected = np.concatenate([torch_logits(model, doc1), torch_logits(model, doc2)], axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_unsupported_architecture_names_file_and_field(tmp_path):
    save_hf_llama(tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"config\.json: architecture 'GPT2LMHeadModel' is not supported") as e:
        convert.from_hf(tmp_path / "hf")
    assert str(config_path) in str(e.value)

    config_path.write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5,
                                                                     "factor": 8.0}}))
    with pytest.raises(ValueError, match=r"config\.json: rope_parameters\.rope_type = 'yarn' is not supported"):
        convert.from_hf(tmp_path / "hf")
    config_path.write_text(json.dumps({**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5,
                                                                     "factor": 8.0}}))
    with pytest.raises(ValueError, match=r"config\.json: rope_parameters\.high_freq_factor = None .*needs it"):
        convert.from_hf(tmp_path / "hf")
    for field, value in (("hidden_act", "gelu"), ("attention_bias", True), ("mlp_bias", True)):
        with pytest.raises(ValueError, match=rf"config\.json: {field} = {value!r}"):
            convert.hf_config_to_model_config({**config, field: value}, config_path)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    save_hf_llama(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(weights)                      # float32, so the numpy API reads it
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        convert.from_hf(tmp_path / "hf")
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert "model.layers.0.self_attn.k_proj.weight: expected shape (32, 64), found (64, 64)" in str(e.value)


def test_bfloat16_checkpoint_loads_without_torch_tensors(tmp_path):
    model = save_hf_llama(tmp_path / "f32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    params, cfg = convert.from_hf(tmp_path / "bf16", dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16" and params["layers"]["attn"]["q"].dtype == jnp.bfloat16
    reference, _ = convert.from_hf(tmp_path / "f32")
    np.testing.assert_allclose(np.asarray(params["embed"]["embedding"], np.float32),
                               np.asarray(reference["embed"]["embedding"]), rtol=1e-2, atol=1e-6)


def test_to_hf_with_sentencepiece_tokenizer_loads_in_auto_tokenizer(tmp_path):
    if not SPM_MODEL.exists():
        pytest.skip(f"shared test data absent: {SPM_MODEL}")
    spm = pytest.importorskip("sentencepiece")
    save_hf_llama(tmp_path / "hf")
    params, cfg = convert.from_hf(tmp_path / "hf")
    cfg = dataclasses.replace(cfg, vocab_size=1000)    # the test model has 1000 pieces
    params["embed"]["embedding"] = jnp.zeros((1000, cfg.d_model))
    params["lm_head"]["kernel"] = jnp.zeros((cfg.d_model, 1000))
    out = convert.to_hf(params, cfg, tmp_path / "out", tokenizer_path=SPM_MODEL)
    sp = spm.SentencePieceProcessor(model_file=str(SPM_MODEL))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in ("Hello world", "The cat sat on the mat, twice!"):
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == sp.bos_id() and ids[1:] == sp.encode(text), text
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (sp.bos_id(), sp.eos_id())
