"""The files beside a SentencePiece `tokenizer.model` that let `transformers.AutoTokenizer` load its directory.

Written by `jaxllm tokenizer expand` (a merged tokenizer directory) and by the Hugging Face export
(`model/convert.to_hf`), which also copies the special-token ids into its config.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm


def write_hf_tokenizer_files(model_file: str | Path, model_max_length: int | None = None) -> dict:
    """Writes tokenizer_config.json and special_tokens_map.json beside a SentencePiece `tokenizer.model`;
    returns the config.json special-token ids (`bos_token_id`, `eos_token_id`, `pad_token_id`; None if absent).

    tokenizer_class is the generic PreTrainedTokenizerFast: transformers 5 builds it from tokenizer.model's
    own proto (unigram or BPE, with its normaliser), reproducing sentencepiece's ids exactly, whereas its
    LlamaTokenizer re-reads any .model as byte-level BPE and mis-tokenises unigram models."""
    model_file = Path(model_file)
    out = model_file.parent
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    special = {f"{k}_token": sp.id_to_piece(i) for k, i in ids.items() if i >= 0}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": sp.bos_id() >= 0,
                        "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        tokenizer_config["model_max_length"] = model_max_length
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return {f"{k}_token_id": (i if i >= 0 else None) for k, i in ids.items() if k != "unk"}
