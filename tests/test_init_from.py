"""Starting a run from a Hugging Face Llama directory: its architecture, weights and tokenizer are used."""
from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from jaxllm.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from jaxllm.model.convert import from_hf
from jaxllm.trainer import train

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_train_from_hf_dir_uses_its_weights_architecture_and_tokenizer(tmp_path, english_corpus, shared_data):
    sp_model = shared_data / "tokenizers" / "sentencepiece_test" / "test_model.model"   # 1000 pieces
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf_dir = tmp_path / "hf"
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(hf_dir, safe_serialization=True)
    shutil.copyfile(sp_model, hf_dir / "tokenizer.model")

    cfg = Config(model=ModelConfig.preset("tiny"),      # a different architecture: the checkpoint's wins
                 data=DataConfig(sources=(str(english_corpus),), seq_len=32),
                 optim=OptimConfig(lr=1e-12, warmup_steps=0, decay="constant", weight_decay=0.0),
                 train=TrainConfig(steps=2, batch_size=2, eval_every=0, eval_batches=1, save_every=0,
                                   async_checkpointing=False),
                 workdir=str(tmp_path / "run"), init_from=str(hf_dir)).validate()
    result = train(cfg)
    want, hf_model_cfg = from_hf(hf_dir)
    assert hf_model_cfg.d_model == 32 and hf_model_cfg.vocab_size == 1000
    # lr 1e-12: after two steps the weights are still the Hugging Face ones.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-8), result["state"]["params"], want)
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    assert result["eval/loss"] == pytest.approx(np.log(1000), abs=0.5)     # a random model: about ln(V)
