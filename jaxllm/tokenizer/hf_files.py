"""The files that let `transformers.AutoTokenizer` load a jaxllm tokenizer's directory, with no SentencePiece
protobuf parsing: tokenizer.json (the fast tokenizer; built from the SentencePiece model by fast.py), its
tokenizer_config.json and special_tokens_map.json, and the chat template (in tokenizer_config.json and as
chat_template.jinja).

Written by `jaxllm tokenizer expand` (a merged tokenizer directory) and by the Hugging Face export
(`model/convert.to_hf`), which also copies the special-token ids into its config.json.
"""
from __future__ import annotations

import json
from pathlib import Path

from jaxllm.tokenizer.fast import sentencepiece_to_tokenizer_json
from jaxllm.tokenizer.tokenizer import HFTokenizer, Tokenizer, load_tokenizer


def write_hf_tokenizer_files(tokenizer, out_dir, model_max_length: int | None = None,
                             chat_template: str | None = None) -> dict:
    """Writes the tokenizer (a path or a loaded tokenizer) into `out_dir` as transformers reads it; returns the
    config.json special-token ids (`bos_token_id`, `eos_token_id`, `pad_token_id`; None if absent).

    A SentencePiece model keeps its tokenizer.model and gains the equivalent tokenizer.json; tokenizer_class is
    the generic PreTrainedTokenizerFast, which reads tokenizer.json as it is (transformers' LlamaTokenizer would
    re-read the .model). `chat_template` (Jinja, transformers' format) goes into tokenizer_config.json and
    chat_template.jinja, so apply_chat_template renders the prompts the model was trained on."""
    tok: Tokenizer | HFTokenizer = load_tokenizer(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if Path(tok.path).parent.resolve() != out.resolve():
        tok.save(out)
    if isinstance(tok, Tokenizer):
        (out / "tokenizer.json").write_text(sentencepiece_to_tokenizer_json(Path(tok.path).read_bytes()),
                                            encoding="utf-8")
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "unk": tok.unk_id, "pad": tok.pad_id}
    special = {f"{k}_token": tok.id_to_piece(i) for k, i in ids.items() if i >= 0}
    config = json.loads((out / "tokenizer_config.json").read_text()) if isinstance(tok, HFTokenizer) and (
        out / "tokenizer_config.json").is_file() else {}
    config.update({"tokenizer_class": "PreTrainedTokenizerFast", **special,
                   "add_bos_token": isinstance(tok, Tokenizer) and tok.bos_id >= 0, "add_eos_token": False,
                   "clean_up_tokenization_spaces": False})
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if chat_template is not None:
        config["chat_template"] = chat_template
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    if isinstance(tok, Tokenizer) and tok.bos_id >= 0:
        # PreTrainedTokenizerFast adds bos through the post-processor of tokenizer.json: make it the SentencePiece
        # default (bos first) so AutoTokenizer(text) gives what encode(text, add_bos=True) gives.
        _add_bos_post_processor(out / "tokenizer.json", special["bos_token"], tok.bos_id)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False))
    return {f"{k}_token_id": (i if i >= 0 else None) for k, i in ids.items() if k != "unk"}


def _add_bos_post_processor(path: Path, bos: str, bos_id: int) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
