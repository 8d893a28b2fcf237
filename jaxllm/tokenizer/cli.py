"""`jaxllm tokenizer ...`: flag parsing for the tokenizer room; the work is done by library functions."""
from __future__ import annotations

import argparse

from jaxllm.cli import DefaultsHelpFormatter


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm tokenizer", description="SentencePiece tokenizers",
                                     formatter_class=DefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("train", help="train a SentencePiece BPE model with byte fallback",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--input", action="append", required=True,
                   help="text file, directory, glob, .jsonl or builtin:NAME; repeat for several")
    p.add_argument("--out", required=True, help="output directory (tokenizer.model, tokenizer.vocab)")
    p.add_argument("--vocab_size", type=int, default=8000, help="number of pieces")
    p.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"], help="SentencePiece algorithm")
    p.add_argument("--character_coverage", type=float, default=0.99995,
                   help="share of characters covered by pieces; the rest fall back to bytes (LLaMA's 0.99995)")
    p.add_argument("--user_defined_symbols", default="", help="comma-separated pieces kept whole, e.g. <|im_start|>")
    p.add_argument("--jsonl_field", default="text", help="text field of .jsonl inputs")
    p.add_argument("--text_split", default="file", choices=["file", "paragraph", "line"],
                   help="what a document is in .txt inputs: the whole file as written, paragraphs, or lines")
    _add_vocabulary_parsers(sub)
    args = parser.parse_args(argv)
    if args.action != "train":
        return _run_vocabulary_command(args)
    from jaxllm.data import load_documents
    from jaxllm.tokenizer import train_tokenizer
    docs = load_documents(args.input, jsonl_field=args.jsonl_field, text_split=args.text_split)
    symbols = tuple(s for s in args.user_defined_symbols.split(",") if s)
    tok = train_tokenizer(docs, out_dir=args.out, vocab_size=args.vocab_size, model_type=args.model_type,
                          character_coverage=args.character_coverage, user_defined_symbols=symbols)
    print(f"wrote {tok.path} ({tok.vocab_size} pieces, trained on {len(docs)} documents)")
    return 0


def _add_vocabulary_parsers(sub) -> None:
    """expand / stats / show (vocabulary expansion, issue 3)."""
    p = sub.add_parser("expand", help="merge another SentencePiece model's pieces or a word list into a base model",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--base", required=True, help="base tokenizer.model (or its directory); its ids stay unchanged")
    p.add_argument("--add", action="append", default=[], help="SentencePiece model whose new pieces are appended; "
                   "repeat for several")
    p.add_argument("--add_words", action="append", default=[], help="UTF-8 word list, one word per line, each "
                   "added as one piece; repeat for several")
    p.add_argument("--out", required=True, help="output directory (tokenizer.model + Hugging Face tokenizer files)")
    p.add_argument("--skip_ascii_pieces", action="store_true", help="add only pieces with a non-ASCII character, "
                   "so pure-ASCII text (English, code, numbers) encodes exactly as with the base")
    p = sub.add_parser("stats", help="tokens per character / byte / word, byte fallback, unknowns, round trip",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--tokenizer", action="append", required=True, help="tokenizer.model or directory; repeat")
    p.add_argument("--text", action="append", required=True, help="text file, directory, glob, .jsonl or "
                   "builtin:NAME (a document per line); repeat")
    p.add_argument("--jsonl_field", default="text", help="text field of .jsonl inputs")
    p.add_argument("--json", default="", help="also write the results as JSON to this file ('-' = stdout)")
    p = sub.add_parser("show", help="print each token of a text with its id, marking byte-fallback pieces",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--tokenizer", action="append", required=True, help="tokenizer.model or directory; repeat "
                   "to compare")
    p.add_argument("text", help="the text to tokenize")


def _run_vocabulary_command(args) -> int:
    from pathlib import Path

    from jaxllm.tokenizer import inspect
    if args.action == "expand":
        from jaxllm.tokenizer.expand import expand_tokenizer
        result = expand_tokenizer(args.base, args.out, add=args.add, add_words_from=args.add_words,
                                  skip_ascii_pieces=args.skip_ascii_pieces)
        print(result.summary())
    elif args.action == "stats":
        from jaxllm.data import load_documents
        from jaxllm.tokenizer import load_tokenizer
        texts = {spec: load_documents([spec], jsonl_field=args.jsonl_field) for spec in args.text}
        rows = [inspect.text_stats(load_tokenizer(t), docs, name=Path(spec).name or spec)
                for t in args.tokenizer for spec, docs in texts.items()]
        print(inspect.stats_table(rows))
        if args.json == "-":
            print(inspect.stats_json(rows))
        elif args.json:
            Path(args.json).write_text(inspect.stats_json(rows) + "\n", encoding="utf-8")
            print(f"wrote {args.json}")
    else:
        print("\n\n".join(inspect.format_pieces(t, args.text) for t in args.tokenizer))
    return 0
