"""Where a run's held-out bits go: per-token NLL on cpu_pretrain_quality.py's held-out text, by kind of target.

  python benchmarks/cpu_pretrain_quality.py --side=jaxllm --minutes=6 --workdir=/tmp/q6   # keeps the run
  python benchmarks/heldout_breakdown.py /tmp/q6/run

Kinds: byte-fallback tokens, whitespace pieces, multi-character pieces, and single characters by how often they
occur in the training novels. Windows as `jaxllm eval ppl` (the model's context, overlapping by one token), so the
total equals the benchmark's bits per character.
"""
from __future__ import annotations

import argparse
import math
from collections import Counter

import jax
import numpy as np

from cpu_pretrain_quality import HELDOUT_CHARS, HELDOUT_FILE, TRAIN_FILES, read_novel
from jaxllm.weights import load_params
from jaxllm.eval.perplexity import sliding_windows
from jaxllm.model.padding import pad_sequences
from jaxllm.model.transformer import hidden_states, target_log_z
from jaxllm.tokenizer import load_tokenizer


def per_token_nll(params, cfg, ids: list[int]) -> np.ndarray:
    """NLL in nats of ids[j] given ids[:j] (within its window), for j >= 1; entry 0 is 0 (never a target)."""
    @jax.jit
    def window_nll(tokens, segment_ids, positions, targets):           # each (1, window)
        h = hidden_states(params, tokens, cfg, segment_ids=segment_ids, positions=positions)  # (1, window, embed)
        log_z, target_logit = target_log_z(params, h, targets, cfg)    # each (1, window)
        return log_z - target_logit

    window, ids_np, nll = cfg.max_seq_len, np.asarray(ids, np.int32), np.zeros(len(ids))
    for begin, end, first in sliding_windows(len(ids), window, window - 1):
        tokens, seg, pos = pad_sequences([ids_np[begin:end]], window, batch=1)
        targets, _, _ = pad_sequences([ids_np[begin + 1:end]], window, batch=1)   # position j predicts j + 1
        out = np.asarray(window_nll(tokens, seg, pos, targets))[0]
        nll[first:end] = out[first - begin - 1:end - begin - 1]                  # targets no earlier window scored
    return nll


def kind(piece: str, train_counts: Counter) -> str:
    if piece.startswith("<0x") and piece.endswith(">"):
        return "byte fallback"
    body = piece.replace("\u2581", " ")
    if not body.strip():
        return "spaces / newlines"
    if len(body.strip()) > 1:
        return "multi-character piece"
    n = train_counts.get(body.strip(), 0)
    return "char seen < 10x" if n < 10 else "char seen 10-999x" if n < 1000 else "char seen >= 1000x"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a jaxllm workdir (its newest checkpoint and tokenizer)")
    args = p.parse_args()
    params, cfg, tokenizer_path = load_params(args.run)
    tokenizer = load_tokenizer(tokenizer_path)
    text = read_novel(HELDOUT_FILE)[:HELDOUT_CHARS]
    train_counts = Counter("".join(read_novel(f) for f in TRAIN_FILES))
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    nll = per_token_nll(params, cfg, ids)
    nats, tokens = Counter(), Counter()
    for j in range(1, len(ids)):
        k = kind(tokenizer.id_to_piece(ids[j]), train_counts)
        nats[k] += nll[j]
        tokens[k] += 1
    bits_per_char = lambda x: x / math.log(2) / len(text)   # noqa: E731
    print(f"{args.run}: {bits_per_char(nll.sum()):.3f} bits/char over {len(text):,} characters, {len(ids) - 1:,} tokens")
    print(f"{'target':24s} {'tokens':>7s} {'nats/token':>10s} {'bits/char':>9s}")
    for k in sorted(nats, key=lambda k: -nats[k]):
        print(f"{k:24s} {tokens[k]:7d} {nats[k] / tokens[k]:10.2f} {bits_per_char(nats[k]):9.3f}")


if __name__ == "__main__":
    main()
