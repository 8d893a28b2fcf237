"""A SentencePiece model as a Hugging Face fast tokenizer (`tokenizer.json`), built with the `tokenizers` library.

transformers loads a `tokenizer.json` directly; without one it converts `tokenizer.model` through a protobuf module
that breaks under the protobuf the [test]/[beam] environments pin (apache-beam: protobuf < 7). Exports therefore
carry this file. The construction follows transformers' SpmConverter / LlamaConverter (read, not imported):

  BPE models      tokenizers' BPE over the pieces, merges recovered from the pieces' scores (a piece made of two
                  pieces is the merge of that pair, ranked by its score), byte_fallback for <0xNN> pieces
  Unigram models  tokenizers' Unigram with the pieces' scores
  normalizer      sentencepiece's own: its precompiled character map (identity has none), then "▁" for spaces and
                  the dummy prefix; runs of spaces collapsed only where remove_extra_whitespaces says so
  specials        control pieces (<s>, </s>, <unk>) and user-defined symbols become added tokens, matched whole
  decoder         "▁" back to spaces, byte pieces fused into UTF-8, the dummy prefix stripped

tests/test_tokenizer_exports.py checks ids equal sentencepiece's on mixed Chinese / English / digits / emoji /
whitespace text for LLaMA's model, a merged Chinese-LLaMA model and jaxllm-trained ones.
"""
from __future__ import annotations

import json

from jaxllm.tokenizer.proto import model_proto_class

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6   # SentencePiece.Type
_BPE, _UNIGRAM = 2, 1                                                               # TrainerSpec.ModelType


def _merges(pieces: list[tuple[str, float]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges from the vocabulary: each piece that splits into two pieces is their merge; merges are ranked
    by the merged piece's score (higher first), and the splits of one piece by the ids of their parts."""
    ranked = []
    for order, (piece, score) in enumerate(pieces):
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked += [(-score, order, left, right) for left, right in splits]
    ranked.sort(key=lambda r: (r[0], r[1]))
    return [(left, right) for _, _, left, right in ranked]


def sentencepiece_to_tokenizer_json(model_bytes: bytes) -> str:
    """The `tokenizer.json` text that encodes exactly as the SentencePiece model `model_bytes` does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    proto = model_proto_class().FromString(model_bytes)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    unk = next((piece for piece, _, kind in pieces if kind == _UNKNOWN), None)
    if spec.model_type == _BPE:
        scored = [(piece, score) for piece, score, kind in pieces if kind in (_NORMAL, _USER_DEFINED)]
        model = models.BPE(vocab=vocab, merges=_merges(scored, vocab), unk_token=unk, fuse_unk=True,
                           byte_fallback=spec.byte_fallback)
    elif spec.model_type == _UNIGRAM:
        model = models.Unigram([(piece, score) for piece, score, _ in pieces], unk_id=vocab.get(unk),
                               byte_fallback=spec.byte_fallback)
    else:
        raise ValueError(f"SentencePiece model type {spec.model_type} (char/word) has no tokenizer.json export; "
                         f"train with model_type='bpe' or 'unigram'")
    tokenizer = Tokenizer(model)

    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(decode)
    # Control pieces are special (skipped when decoding); user-defined symbols are always one piece, as in SP.
    tokenizer.add_tokens([AddedToken(piece, special=kind != _USER_DEFINED, normalized=False)
                          for piece, _, kind in pieces if kind in (_CONTROL, _UNKNOWN, _USER_DEFINED)])
    return json.dumps(json.loads(tokenizer.to_str()), ensure_ascii=False, indent=2)
