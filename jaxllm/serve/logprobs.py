"""Token logprobs in OpenAI's two shapes (legacy completions and chat), with each token shown as the text
it adds in context, so the pieces concatenate to the returned text and `text_offset` indexes into it.

A token's raw piece is not that text: SentencePiece writes a leading space as "▁" and drops it at the start
of a text, and a byte-fallback piece such as "<0xE9>" is one byte of a character that only the next piece or
two complete. So a token's text is what decoding the sequence up to and including it adds to decoding the
sequence before it; a token that leaves a character unfinished adds "" (the character goes to the token
that finishes it), unless it is the last one, which shows the replacement character the decoder gives.
"""
from __future__ import annotations

import os
from typing import Sequence


def _settled(text: str, final: bool) -> str:
    """Decoded text without the replacement characters of an unfinished last character (unless final)."""
    return text if final else text.rstrip("\ufffd")


def _added(before: str, after: str) -> str:
    """What `after` adds to `before` (decoding is local, so `after` normally starts with `before`)."""
    if after.startswith(before):
        return after[len(before):]
    return after[len(os.path.commonprefix([before, after])):]


def token_texts(tokenizer, ids: Sequence[int], first: int = 0,
                alternatives: Sequence[Sequence[int]] | None = None) -> tuple[list[str], list[list[str]]]:
    """(text of each token ids[first:], text of each alternative token at those positions).

    ids[:first] is context only (the prompt, when it is not echoed). alternatives[k] are the candidate
    tokens at position first + k (the top logprobs); each is shown as it would read in the same place.
    Costs one decode of the prefix per token: fine for the lengths a model's context allows."""
    ids = [int(t) for t in ids]
    before = _settled(tokenizer.decode(ids[:first]), False)
    texts, alt_texts = [], []
    for i in range(first, len(ids)):
        after = _settled(tokenizer.decode(ids[:i + 1]), i == len(ids) - 1)
        texts.append(_added(before, after))
        if alternatives is not None:
            alt_texts.append([texts[-1] if a == ids[i] else _added(before, tokenizer.decode(ids[:i] + [int(a)]))
                              for a in alternatives[i - first]])
        before = after
    return texts, alt_texts


def legacy_logprobs(tokenizer, ids: Sequence[int], first: int, logprobs: Sequence, tops: Sequence,
                    n_top: int, text_start: int = 0) -> dict:
    """The completions API's `logprobs` for ids[first:]: tokens, token_logprobs, top_logprobs and
    text_offset (each token's start in the returned text; text_start where the first token starts)."""
    alternatives = [[] if t is None else [a for a, _ in t[:n_top]] for t in tops]
    texts, alt_texts = token_texts(tokenizer, ids, first, alternatives)
    offsets, pos = [], text_start
    for text in texts:
        offsets.append(pos)
        pos += len(text)
    top = [None if t is None else {name: lp for name, (_, lp) in zip(names, t[:n_top])}
           for t, names in zip(tops, alt_texts)]
    return {"tokens": texts, "token_logprobs": list(logprobs), "text_offset": offsets, "top_logprobs": top}


def chat_logprobs(tokenizer, prompt: Sequence[int], tokens: Sequence[int], logprobs: Sequence, tops: Sequence,
                  n_top: int) -> dict:
    """The chat API's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}, each token shown as
    the text it adds after the prompt and the tokens before it."""
    ids = list(prompt) + list(tokens)
    alternatives = [[a for a, _ in t[:n_top]] for t in tops]
    texts, alt_texts = token_texts(tokenizer, ids, len(prompt), alternatives)

    def entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(text, lp), "top_logprobs": [entry(name, b) for name, (_, b) in zip(names, top)]}
                        for text, lp, top, names in zip(texts, logprobs, tops, alt_texts)]}
