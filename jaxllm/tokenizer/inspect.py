"""How well a tokenizer fits a text (`stats`) and how it splits one string (`show`).

Tokens per character is the number that matters for a Chinese LLM: LLaMA's tokenizer spends about 1.6
tokens on each character of 红楼梦 (most characters fall back to 2-3 UTF-8 byte tokens), so its sequences
are long and an undertrained model can emit invalid byte sequences. Per byte and per word are given too, so
English and Chinese can be compared; a "word" is a run of letters/digits, or one CJK ideograph (Chinese is
written without spaces, and per-character is the usual unit there).
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Sequence

from jaxllm.tokenizer.tokenizer import Tokenizer, load_tokenizer

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"   # CJK ideographs, incl. extensions
_WORD = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")    # sentencepiece's byte-fallback pieces, <0x00> .. <0xFF>


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


def cjk_share(text: str) -> float:
    """Share of a text's non-space characters that are CJK ideographs (to tell Chinese from English docs)."""
    chars = [c for c in text if not c.isspace()]
    return sum(bool(re.match(f"[{_CJK}]", c)) for c in chars) / max(len(chars), 1)


def is_byte_piece(piece: str) -> bool:
    return bool(_BYTE_PIECE.fullmatch(piece))


def _as_tokenizer(tokenizer) -> Tokenizer:
    return load_tokenizer(tokenizer)


def text_stats(tokenizer: Tokenizer | str | os.PathLike, documents: Sequence[str] | str, name: str = "") -> dict:
    """Token counts of `documents` (a list of strings, or one string) under `tokenizer` (a Tokenizer or a path).

    Returns a JSON-ready dict: documents, characters, bytes, words, tokens, tokens_per_{char,byte,word},
    byte_fallback_tokens and byte_fallback_share (of all tokens), unknown_tokens, and roundtrip_failures (documents
    whose decode(encode(doc)) differs from doc) with the first such document in roundtrip_example."""
    tok = _as_tokenizer(tokenizer)
    docs = [documents] if isinstance(documents, str) else list(documents)
    ids = tok.encode_batch(docs)
    byte_ids = {i for i in range(tok.vocab_size) if is_byte_piece(tok.id_to_piece(i))}
    chars = sum(len(d) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    words = sum(count_words(d) for d in docs)
    tokens = sum(len(x) for x in ids)
    failures = [d for d, x in zip(docs, ids) if tok.decode(x) != d]
    return {
        "tokenizer": tok.path, "vocab_size": tok.vocab_size, "text": name, "documents": len(docs),
        "characters": chars, "bytes": nbytes, "words": words, "tokens": tokens,
        "tokens_per_char": tokens / max(chars, 1), "tokens_per_byte": tokens / max(nbytes, 1),
        "tokens_per_word": tokens / max(words, 1),
        "byte_fallback_tokens": sum(i in byte_ids for x in ids for i in x),
        "byte_fallback_share": sum(i in byte_ids for x in ids for i in x) / max(tokens, 1),
        "unknown_tokens": sum(i == tok.unk_id for x in ids for i in x),
        "roundtrip_failures": len(failures), "roundtrip_example": failures[0][:200] if failures else None,
    }


def stats_table(rows: Iterable[dict]) -> str:
    """A fixed-width table of `text_stats` results, one row per (tokenizer, text)."""
    cols = [("tokenizer", "{}", 28), ("vocab", "{}", 6), ("text", "{}", 22), ("tokens", "{}", 9),
            ("tok/char", "{:.3f}", 8), ("tok/byte", "{:.3f}", 8), ("tok/word", "{:.3f}", 8),
            ("byte-fb", "{:.1%}", 7), ("unk", "{}", 5), ("rt-fail", "{}", 7)]
    keys = ["tokenizer", "vocab_size", "text", "tokens", "tokens_per_char", "tokens_per_byte", "tokens_per_word",
            "byte_fallback_share", "unknown_tokens", "roundtrip_failures"]
    lines = ["  ".join(f"{name:>{w}}" if i > 2 or i == 1 else f"{name:<{w}}" for i, (name, _, w) in enumerate(cols))]
    for r in rows:
        cells = []
        for i, ((_, fmt, w), key) in enumerate(zip(cols, keys)):
            text = fmt.format(r[key])
            if i in (0, 2) and len(text) > w:      # long paths: keep their informative end
                text = "…" + text[-(w - 1):]
            cells.append(f"{text:>{w}}" if i > 2 or i == 1 else f"{text:<{w}}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def stats_json(rows: Iterable[dict]) -> str:
    return json.dumps(list(rows), ensure_ascii=False, indent=2)


def show_pieces(tokenizer: Tokenizer | str | os.PathLike, text: str) -> list[dict]:
    """Each token of `text`: {"id", "piece", "byte": is a byte-fallback piece}, in order."""
    tok = _as_tokenizer(tokenizer)
    return [{"id": i, "piece": (p := tok.id_to_piece(i)), "byte": is_byte_piece(p)} for i in tok.encode(text)]


def format_pieces(tokenizer: Tokenizer | str | os.PathLike, text: str) -> str:
    """`show_pieces` as text: one token per line, byte-fallback runs marked and labelled with the characters they
    spell, e.g. LLaMA's <0xE5> <0xBE> <0x85> for 待."""
    tok = _as_tokenizer(tokenizer)
    pieces = show_pieces(tok, text)
    lines = [f"{tok.path} ({tok.vocab_size} pieces): {len(pieces)} tokens for {len(text)} characters, "
             f"{sum(p['byte'] for p in pieces)} of them byte fallback"]
    run: list[int] = []                     # bytes of the current byte-fallback run
    for k, p in enumerate(pieces):
        line = f"  {p['id']:>7}  {p['piece']}"
        if p["byte"]:
            run.append(int(p["piece"][3:5], 16))
            line = f"{line:<24}byte"
            if k + 1 == len(pieces) or not pieces[k + 1]["byte"]:
                line += f"  = {bytes(run).decode('utf-8', errors='replace')!r}"
                run = []
        lines.append(line)
    return "\n".join(lines)


def tokens_per_char_by_language(tokenizer: Tokenizer | str | os.PathLike, documents: Sequence[str]) -> dict:
    """{"zh": ..., "en": ...}: tokens per character over the documents that are mostly Chinese (at least half CJK
    ideographs) and over those without any; each {"documents", "characters", "tokens_per_char",
    "byte_fallback_share"}. A language with no documents is left out."""
    groups = {"zh": [d for d in documents if cjk_share(d) >= 0.5], "en": [d for d in documents if cjk_share(d) == 0]}
    out = {}
    for lang, docs in groups.items():
        if docs:
            s = text_stats(tokenizer, docs)
            out[lang] = {k: s[k] for k in ("documents", "characters", "tokens_per_char", "byte_fallback_share")}
    return out
