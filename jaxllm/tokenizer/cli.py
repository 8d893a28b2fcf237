"""`jaxllm tokenizer ...`: flag parsing for the tokenizer room; the work is done by library functions."""
from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm tokenizer", description="SentencePiece tokenizers")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("train", help="train a SentencePiece BPE model with byte fallback")
    p.add_argument("--input", action="append", required=True,
                   help="text file, directory, glob, .jsonl or builtin:NAME; repeat for several")
    p.add_argument("--out", required=True, help="output directory (tokenizer.model, tokenizer.vocab)")
    p.add_argument("--vocab_size", type=int, default=8000, help="number of pieces")
    p.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"], help="SentencePiece algorithm")
    p.add_argument("--character_coverage", type=float, default=0.9995,
                   help="share of characters covered by pieces; the rest fall back to bytes (Chinese: 0.9995)")
    p.add_argument("--user_defined_symbols", default="", help="comma-separated pieces kept whole, e.g. <|im_start|>")
    p.add_argument("--jsonl_field", default="text", help="text field of .jsonl inputs")
    p.add_argument("--text_split", default="line", choices=["line", "paragraph", "file"],
                   help="what a document is in .txt inputs")
    args = parser.parse_args(argv)
    from jaxllm.data import load_documents
    from jaxllm.tokenizer import train_tokenizer
    docs = load_documents(args.input, jsonl_field=args.jsonl_field, text_split=args.text_split)
    symbols = tuple(s for s in args.user_defined_symbols.split(",") if s)
    tok = train_tokenizer(docs, out_dir=args.out, vocab_size=args.vocab_size, model_type=args.model_type,
                          character_coverage=args.character_coverage, user_defined_symbols=symbols)
    print(f"wrote {tok.path} ({tok.vocab_size} pieces, trained on {len(docs)} documents)")
    return 0
