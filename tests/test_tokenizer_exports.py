"""Tokenizers behind one interface, and exports that transformers loads anywhere.

`load_tokenizer` reads SentencePiece .model files and Hugging Face tokenizer.json files; every directory jaxllm
writes for Hugging Face (`convert to-hf`, `tokenizer expand`) carries a tokenizer.json, so `AutoTokenizer` loads it
without parsing a SentencePiece protobuf (which fails under the protobuf apache-beam pins). The check runs
transformers in a subprocess that never imports jaxllm: what a user's own script sees."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxllm.weights import export_hf, save_params
from jaxllm.config import ModelConfig
from jaxllm.data import templates
from jaxllm.model.spec import init_params
from jaxllm.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

TEXTS = ["Hello world! 你好，世界。", "  two  spaces\tand a tab\nnew line\n\n", "数字 12345 和 3.14159 ",
         "emoji 😀🎉 and 𝔘nicode ǅ Ünïcödé", "红楼梦第一回 甄士隐梦幻识通灵", "def f(x):\n    return x  # indent",
         " leading", "trailing ", "a", "   "]
CONVERSATIONS = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
]

# Run by a fresh interpreter that imports transformers, never jaxllm: ids, decoded text and chat renderings.
AUTO_TOKENIZER = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts, conversations = json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {"ids": [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
       "with_special": tok(texts[0])["input_ids"]}
out["decoded"] = [tok.decode(ids) for ids in out["ids"]]
if tok.chat_template:
    out["chat"] = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=c[-1]["role"] == "user")
                   for c in conversations]
print(json.dumps(out))
"""


def auto_tokenizer(directory) -> dict:
    proc = subprocess.run([sys.executable, "-c", AUTO_TOKENIZER, str(directory), json.dumps(TEXTS),
                           json.dumps(CONVERSATIONS)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "jaxllm" not in proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_same_as_jaxllm(hf: dict, tok) -> None:
    assert hf["ids"] == [tok.encode(t) for t in TEXTS]
    assert hf["decoded"] == [tok.decode(tok.encode(t)) for t in TEXTS]
    assert hf["with_special"] == tok.encode(TEXTS[0], add_bos=tok.bos_id >= 0)


def test_minimind_tokenizer_json_loads_and_encodes_like_transformers(shared_data):
    path = shared_data / "tokenizers" / "minimind"
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer) and load_tokenizer(path / "tokenizer.json").vocab_size == tok.vocab_size
    assert tok.special_tokens["<|im_end|>"] == tok.encode("<|im_end|>")[0] == tok.eos_id
    assert tok.token_id("<|im_start|>") == tok.encode("<|im_start|>user")[0] != tok.token_id("<|im_end|>")
    hf = auto_tokenizer(path)
    assert hf["ids"] == [tok.encode(t) for t in TEXTS]
    again = pickle.loads(pickle.dumps(tok))                 # Grain workers get it pickled
    assert again.encode(TEXTS[0]) == tok.encode(TEXTS[0]) and again.special_tokens == tok.special_tokens


def test_export_of_a_trained_sentencepiece_model_with_its_chat_template(tmp_path, tokenizer_path):
    cfg = ModelConfig.preset("tiny", vocab_size=Tokenizer(tokenizer_path).vocab_size)
    checkpoint = save_params(str(tmp_path / "ckpt"), init_params(cfg, jax.random.key(0)), cfg, tokenizer_path)
    templates.save_template(checkpoint, templates.get_template("chatml"))
    out = export_hf(checkpoint, str(tmp_path / "hf"))
    assert (out / "tokenizer.json").exists() and (out / "tokenizer.model").exists()
    tok = load_tokenizer(tokenizer_path)
    hf = auto_tokenizer(out)
    assert_same_as_jaxllm(hf, tok)
    chatml = templates.get_template("chatml")
    specials = templates.special_token_texts(tok)
    assert hf["chat"] == [chatml.render(c, add_generation_prompt=c[-1]["role"] == "user", **specials)
                          for c in CONVERSATIONS]


def test_expanded_llama_tokenizer_loads_in_transformers(tmp_path, shared_data):
    from jaxllm.tokenizer.expand import expand_tokenizer
    tokenizers_dir = shared_data / "tokenizers"
    result = expand_tokenizer(str(tokenizers_dir / "llama" / "tokenizer.model"), str(tmp_path / "merged"),
                              add=[str(tokenizers_dir / "chinese_llama_sp" / "chinese_sp.model")])
    assert result.vocab_size == 49953
    assert_same_as_jaxllm(auto_tokenizer(tmp_path / "merged"), load_tokenizer(tmp_path / "merged"))


def test_a_hugging_face_tokenizer_exports_as_it_came(tmp_path, shared_data):
    tok = load_tokenizer(shared_data / "tokenizers" / "minimind")
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size)
    checkpoint = save_params(str(tmp_path / "ckpt"), init_params(cfg, jax.random.key(0)), cfg, tok.path)
    assert isinstance(load_tokenizer(checkpoint), HFTokenizer)
    out = export_hf(checkpoint, str(tmp_path / "hf"))
    hf = auto_tokenizer(out)
    assert hf["ids"] == [tok.encode(t) for t in TEXTS]
    own = templates.model_template(shared_data / "tokenizers" / "minimind")
    assert hf["chat"] == [own.render(c, add_generation_prompt=c[-1]["role"] == "user",
                                     **templates.special_token_texts(tok)) for c in CONVERSATIONS]


def test_expand_a_tokenizer_json_with_whole_chinese_words(tmp_path, shared_data):
    from jaxllm.tokenizer.expand import expand_tokenizer
    words = tmp_path / "words.txt"
    words.write_text("红楼梦\n贾宝玉\n林黛玉\n贾宝玉\n\n的\n", encoding="utf-8")
    base = load_tokenizer(shared_data / "tokenizers" / "minimind")
    result = expand_tokenizer(shared_data / "tokenizers" / "minimind", tmp_path / "out", add_words_from=[words])
    assert (result.added, result.duplicate, result.blank, result.already_present) == (3, 1, 1, 1)
    assert result.vocab_size == base.vocab_size + 3
    merged = load_tokenizer(tmp_path / "out")
    ids = merged.encode("贾宝玉读红楼梦")
    assert merged.encode("红楼梦") == [base.vocab_size] and len(ids) < len(base.encode("贾宝玉读红楼梦"))
    assert merged.decode(ids) == "贾宝玉读红楼梦"
    assert merged.eos_id == base.eos_id                       # the special tokens come along
    assert auto_tokenizer(tmp_path / "out")["ids"] == [merged.encode(t) for t in TEXTS]

    # The embedding resize works from it: a new word's row is the mean of the base rows of the tokens it was.
    from jaxllm.model.resize import resize_vocab
    cfg = ModelConfig.preset("tiny", vocab_size=base.vocab_size)
    params = init_params(cfg, jax.random.key(0))
    grown, grown_cfg = resize_vocab(params, cfg, merged.vocab_size, method="subword_mean",
                                    base_tokenizer=base, new_tokenizer=merged)
    assert grown_cfg.vocab_size >= merged.vocab_size
    table = np.asarray(params["embed"]["embedding"], np.float32)                      # (vocab, embed)
    np.testing.assert_allclose(np.asarray(grown["embed"]["embedding"])[merged.piece_to_id("红楼梦")],
                               table[base.encode("红楼梦")].mean(axis=0), rtol=1e-6, atol=1e-6)
