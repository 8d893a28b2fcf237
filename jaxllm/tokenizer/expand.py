"""Vocabulary expansion: merge another SentencePiece model's pieces, or a word list, into a base model.

This is the Chinese-LLaMA / BELLE recipe (Chinese-LLaMA-Alpaca `merge_tokenizers.py`): parse both
models' protobufs, append every piece of the added model that the base lacks, write the merged protobuf.
Base ids never change, so a model trained with the base tokenizer keeps every embedding row it has; the
new ids come after them, in the added model's order (jaxllm.resize_vocab grows the embedding to match).

Scores. A BPE model's score is a merge priority: sentencepiece repeatedly merges the adjacent pair whose
concatenation is the highest-scoring piece. Chinese-LLaMA gives every new piece score 0, above all of
LLaMA's merges (-1 .. -31740). We instead continue *below* the base's lowest merge score, in the added
model's order: base merges keep their priority and the new pieces only extend what the base stopped at.
Measured on LLaMA + chinese_sp: 红楼梦 tokens per character 0.8801 vs 0.8794 with score 0, but without
--skip_ascii_pieces plain English re-encodes in 30 instead of 225 of 5030 lines (ids compared line by line on
text/en/wiki_demo.txt and the first 5000 lines of tinyshakespeare.txt): score 0 lets a new ASCII piece pre-empt
LLaMA's own merges inside ordinary English words. For a unigram base the score is a log-probability: pieces from a
unigram model keep their own (comparable) log-probabilities, others get the base's lowest.

A word list's words are added as USER_DEFINED pieces: with a BPE base a new NORMAL piece is only produced
when a chain of merges leads to it, which a hand-written word (深度学习) usually lacks; user-defined pieces
are matched whole wherever they occur (the same mechanism as sentencepiece's --user_defined_symbols).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
from google.protobuf.message import DecodeError

from jaxllm.tokenizer.hf_files import write_hf_tokenizer_files
from jaxllm.tokenizer.proto import model_proto_class
from jaxllm.tokenizer.tokenizer import (HF_FILENAME, MODEL_FILENAME, Tokenizer, is_tokenizer_json, load_tokenizer,
                                        not_a_model_error, resolve_model_file)

log = logging.getLogger(__name__)

ModelProto = model_proto_class()
_PIECE = ModelProto.SentencePiece
_TRAINER_SPEC = type(ModelProto().trainer_spec)   # .BPE, .UNIGRAM
# LLaMA gives its 15 runs of spaces ("▁▁", "▁▁▁▁", ...) and "▁" a score of -1e9: a sentinel (merged last),
# not a merge rank. Sentinels are left out when finding the base's lowest real score.
_DISABLED_SCORE = -1e8


@dataclasses.dataclass
class ExpandResult:
    """What a merge did. Every candidate is either added or counted under one skip reason."""
    path: str                  # the merged tokenizer.model
    base_size: int             # pieces of the base model (ids 0..base_size-1 are unchanged)
    vocab_size: int            # pieces of the merged model
    added: int = 0
    already_present: int = 0   # the base (or an earlier candidate) has the piece
    ascii_skipped: int = 0     # pure-ASCII pieces left out by skip_ascii_pieces
    special_skipped: int = 0   # control / unknown / byte / unused pieces of the added model
    blank: int = 0             # word list: empty lines
    duplicate: int = 0         # word list: a word listed twice
    too_long: int = 0          # word list: longer than the base's max_sentencepiece_length characters

    def summary(self) -> str:
        skipped = {k: getattr(self, k) for k in ("already_present", "ascii_skipped", "special_skipped", "blank",
                                                  "duplicate", "too_long") if getattr(self, k)}
        why = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items()) or "none"
        return (f"{self.path}: {self.vocab_size} pieces = {self.base_size} base + {self.added} added; "
                f"skipped: {why}")


def load_model_proto(path: str | os.PathLike, role: str = "model") -> ModelProto:
    """Parses a SentencePiece .model (or a directory holding tokenizer.model); ValueError naming the file when
    it is not one. Parsing alone is not proof (protobuf accepts many byte strings), so sentencepiece loads it too."""
    file = resolve_model_file(path)
    data = file.read_bytes()
    proto = ModelProto()
    try:
        proto.ParseFromString(data)
        ok = len(proto.pieces) > 0
        if ok:
            spm.SentencePieceProcessor(model_proto=data)
    except (DecodeError, RuntimeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise not_a_model_error(file, data, role)
    return proto


def is_ascii_piece(piece: str) -> bool:
    """True when the piece's text is pure ASCII; "▁" (sentencepiece's space) counts as the ASCII space."""
    return piece.replace("▁", " ").isascii()


def _lowest_score(base: ModelProto) -> float:
    scores = [p.score for p in base.pieces if p.type == _PIECE.NORMAL and p.score > _DISABLED_SCORE]
    return min(scores, default=0.0)


def merge_pieces(base: ModelProto, added: ModelProto, *, skip_ascii_pieces: bool = False,
                 result: ExpandResult | None = None) -> ExpandResult:
    """Appends the pieces of `added` that `base` lacks to `base` (in place), in `added`'s order."""
    result = result or ExpandResult(path="", base_size=len(base.pieces), vocab_size=len(base.pieces))
    have = {p.piece for p in base.pieces}
    base_is_bpe = base.trainer_spec.model_type == _TRAINER_SPEC.BPE
    added_is_unigram = added.trainer_spec.model_type == _TRAINER_SPEC.UNIGRAM
    floor = _lowest_score(base)
    for p in added.pieces:
        if p.piece in have:
            result.already_present += 1
        elif p.type not in (_PIECE.NORMAL, _PIECE.USER_DEFINED):
            result.special_skipped += 1      # <unk>, <s>, <0x41>: their meaning is the base's to define
        elif skip_ascii_pieces and is_ascii_piece(p.piece):
            result.ascii_skipped += 1
        else:
            if base_is_bpe:
                score = floor - 1 - result.added           # next merge rank after every base merge
            else:
                score = p.score if added_is_unigram else floor
            base.pieces.append(_PIECE(piece=p.piece, score=score, type=p.type))
            have.add(p.piece)
            result.added += 1
    result.vocab_size = len(base.pieces)
    return result


def add_words(base: ModelProto, words: Iterable[str], *, skip_ascii_pieces: bool = False,
              result: ExpandResult | None = None) -> ExpandResult:
    """Appends each word as a USER_DEFINED piece (in place). Blank lines, duplicates, words already in the
    vocabulary and words longer than the base's max_sentencepiece_length are skipped and counted."""
    result = result or ExpandResult(path="", base_size=len(base.pieces), vocab_size=len(base.pieces))
    have = {p.piece for p in base.pieces}
    listed: set[str] = set()
    max_len = base.trainer_spec.max_sentencepiece_length or 16
    for line in words:
        word = line.strip().replace(" ", "▁")      # a piece spells the space as "▁"
        if not word:
            result.blank += 1
        elif word in listed:
            result.duplicate += 1
        elif word in have:
            listed.add(word)
            result.already_present += 1
        elif len(word) > max_len:
            result.too_long += 1
        elif skip_ascii_pieces and is_ascii_piece(word):
            result.ascii_skipped += 1
        else:
            base.pieces.append(_PIECE(piece=word, score=0.0, type=_PIECE.USER_DEFINED))
            listed.add(word)
            have.add(word)
            result.added += 1
    result.vocab_size = len(base.pieces)
    return result


def _read_words(path: str | os.PathLike) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"word list {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def expand_tokenizer(base: str | os.PathLike, out_dir: str | os.PathLike, *,
                     add: Iterable[str | os.PathLike] = (), add_words_from: Iterable[str | os.PathLike] = (),
                     skip_ascii_pieces: bool = False) -> ExpandResult:
    """Merges SentencePiece models (`add`) and word lists (`add_words_from`, one word per line) into `base`.

    Writes `out_dir/tokenizer.model` plus tokenizer_config.json / special_tokens_map.json (transformers loads the
    directory with AutoTokenizer). Returns the counts, which are also logged."""
    add, add_words_from = list(add), list(add_words_from)
    if not add and not add_words_from:
        raise ValueError("expand needs a SentencePiece model to add (--add) or a word list (--add_words)")
    if is_tokenizer_json(base):   # decided by name, so a bad .model fails below naming it the base
        return _expand_tokenizer_json(base, out_dir, add, add_words_from, skip_ascii_pieces)
    proto = load_model_proto(base, "base")
    result = ExpandResult(path="", base_size=len(proto.pieces), vocab_size=len(proto.pieces))
    for path in add:
        merge_pieces(proto, load_model_proto(path, "added model"), skip_ascii_pieces=skip_ascii_pieces,
                     result=result)
    for path in add_words_from:
        add_words(proto, _read_words(path), skip_ascii_pieces=skip_ascii_pieces, result=result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / MODEL_FILENAME
    target.write_bytes(proto.SerializeToString())
    Tokenizer(target)                                # the merged model must load, or fail here naming the file
    write_hf_tokenizer_files(target, out)
    result.path = str(target)
    log.info("%s", result.summary())
    return result


def _expand_tokenizer_json(base, out_dir, add, add_words_from, skip_ascii_pieces: bool) -> ExpandResult:
    """A Hugging Face tokenizer.json base (Qwen, Llama 3): the new words (and the normal pieces of added
    SentencePiece models, "▁" read as a space) become added tokens through the `tokenizers` library, with ids after
    the base's; a word the base already encodes as one token counts as present. Same report as the SentencePiece
    path; the embedding resize then grows the model by `added` rows."""
    from tokenizers import AddedToken

    tokenizer = load_tokenizer(base)
    backend = tokenizer._tok
    words = [line for path in add_words_from for line in _read_words(path)]
    for path in add:
        words += [p.piece.replace("▁", " ") for p in load_model_proto(path, "added model").pieces
                  if p.type == _PIECE.NORMAL]
    result = ExpandResult(path="", base_size=tokenizer.vocab_size, vocab_size=tokenizer.vocab_size)
    listed: set[str] = set()
    new = []
    for line in words:
        word = line.strip()
        if not word:
            result.blank += 1
        elif word in listed:
            result.duplicate += 1
        elif len(backend.encode(word, add_special_tokens=False).ids) == 1:
            listed.add(word)
            result.already_present += 1
        elif skip_ascii_pieces and is_ascii_piece(word):
            result.ascii_skipped += 1
        else:
            listed.add(word)
            new.append(AddedToken(word, normalized=False, special=False))
    result.added = backend.add_tokens(new)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / HF_FILENAME).write_text(backend.to_str(), encoding="utf-8")
    config = Path(tokenizer.path).parent / "tokenizer_config.json"
    if config.is_file() and config.resolve() != (out / "tokenizer_config.json").resolve():
        (out / "tokenizer_config.json").write_bytes(config.read_bytes())
    write_hf_tokenizer_files(out / HF_FILENAME, out)
    result.path, result.vocab_size = str(out / HF_FILENAME), load_tokenizer(out).vocab_size
    log.info("%s", result.summary())
    return result
