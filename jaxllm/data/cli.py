"""`jaxllm data plan | prepare | clean`: flag parsing only; the work is in plan.py, prepare.py, clean.py."""
from __future__ import annotations

import argparse

from jaxllm.cli import DefaultsHelpFormatter

PLAN_FLAGS = ("--tokenizer", "--sample", "--tokens", "--warn_epochs")


def _number(text: str) -> float:
    """'300B', '1.5T', '2e9' → a float."""
    units = {"k": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    return float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)


def cmd_plan(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm data plan", description="the mixture table of a config: source, "
                                     "tokens, weight, epochs over the run",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--tokenizer", default="", help="tokenizer to count text with (default: the config's)")
    parser.add_argument("--sample", type=int, default=1000, help="documents tokenised per large text source")
    parser.add_argument("--tokens", type=_number, default=None,
                        help="token budget (e.g. 300B); default steps x batch_size x seq_len")
    parser.add_argument("--warn_epochs", type=float, default=4.0, help="warn when a source repeats more often")
    mine = [a for a in argv if a.split("=", 1)[0] in PLAN_FLAGS or a in ("-h", "--help")]
    args = parser.parse_args(mine)
    from jaxllm.cli import load_config
    from jaxllm.data.plan import format_table, plan
    config_argv = [a for a in argv if a not in mine]
    if not any(a.startswith("--config.workdir") for a in config_argv):
        config_argv.append("--config.workdir=(plan)")   # validation wants one; plan writes nothing
    cfg = load_config(config_argv)
    tokenizer = None
    if args.tokenizer or cfg.tokenizer:
        from jaxllm.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer or cfg.tokenizer)
    rows, warnings, run_tokens = plan(cfg, tokenizer, sample=args.sample, budget_tokens=args.tokens,
                                      warn_epochs=args.warn_epochs)
    print(format_table(rows, warnings, run_tokens, args.sample))
    return 0


def cmd_prepare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm data prepare", description="tokenise once into ArrayRecord "
                                     "shards of token ids (resumable)",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--input", action="append", required=True, help="source spec (repeatable): file, dir, "
                        "glob, builtin:NAME, tfds:NAME:SPLIT")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model (or a directory holding one)")
    parser.add_argument("--out", required=True, help="output directory (a rerun resumes it)")
    parser.add_argument("--workers", type=int, default=0, help="processes; 0 = one per CPU")
    parser.add_argument("--docs_per_shard", type=int, default=50_000, help="documents per shard of a built-in, "
                        "TFDS or ArrayRecord source (files are one shard each)")
    parser.add_argument("--jsonl_field", default="text", help="text field of .jsonl / .json / .parquet / TFDS "
                        "records (a list of lines, as chinese-poetry's paragraphs, is joined with newlines)")
    parser.add_argument("--text_split", default="line", choices=("line", "paragraph", "file"),
                        help="documents of .txt files")
    parser.add_argument("--on_error", default="raise", choices=("raise", "skip"), help="a malformed record")
    parser.add_argument("--max_doc_chars", type=int, default=0, help="skip (and count) longer documents; 0 = none")
    args = parser.parse_args(argv)
    from jaxllm.data.prepare import prepare
    manifest = prepare(args.input, args.tokenizer, args.out, workers=args.workers,
                       docs_per_shard=args.docs_per_shard, jsonl_field=args.jsonl_field,
                       text_split=args.text_split, on_error=args.on_error, max_doc_chars=args.max_doc_chars)
    print(f"{args.out}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens in "
          f"{len(manifest['shards'])} shards ({manifest['skipped_long']} over-long skipped)")
    return 0


def cmd_clean(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm data clean", description="quality filters, exact and near "
                                     "dedup, report; unknown flags go to the Beam runner as pipeline options",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--input", action="append", required=True, help="source spec (repeatable)")
    parser.add_argument("--out", required=True, help="output directory: clean-*.jsonl and report.json")
    parser.add_argument("--lang", default="any", help="keep only this script-detected language (zh, en, ja, ...)")
    parser.add_argument("--runner", default="local", help="local (default) or a Beam runner: DirectRunner, "
                        "DataflowRunner, FlinkRunner, SparkRunner, ...")
    parser.add_argument("--threshold", type=float, default=0.8, help="near-duplicate shingle Jaccard")
    parser.add_argument("--num_perm", type=int, default=128, help="MinHash permutations")
    parser.add_argument("--shingle", type=int, default=5, help="words (Latin) or characters (CJK) per shingle")
    parser.add_argument("--skip_filters", default="", help="comma-separated filter names not to apply")
    parser.add_argument("--min_units", type=int, default=50, help="shortest document, in words / CJK characters")
    parser.add_argument("--jsonl_field", default="text", help="text field of .jsonl / .json / .parquet records (a "
                        "list of lines, as chinese-poetry's paragraphs, is joined with newlines)")
    parser.add_argument("--text_split", default="line", choices=("line", "paragraph", "file"),
                        help="documents of .txt files")
    parser.add_argument("--strict", action="store_true", help="abort on an unreadable file (empty, not UTF-8, not "
                        "records) or a malformed record; default: skip and count them in the report")
    parser.add_argument("--read_mb", type=int, default=64, help="Beam: MiB of a text / JSON Lines / Parquet file "
                        "read by one task (large files are split across workers)")
    args, beam_args = parser.parse_known_args(argv)
    if args.runner == "local" and beam_args:
        parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    from jaxllm.data.clean import CleanOptions, clean, format_report
    from jaxllm.data.filters import FILTERS, FilterConfig
    skip = tuple(s for s in args.skip_filters.split(",") if s)
    unknown = [s for s in skip if s not in FILTERS]
    if unknown:
        parser.error(f"unknown filter(s) {unknown}; known: {', '.join(FILTERS)}")
    opts = CleanOptions(lang=args.lang, threshold=args.threshold, num_perm=args.num_perm, shingle=args.shingle,
                        filters=FilterConfig(min_units=args.min_units), skip_filters=skip,
                        jsonl_field=args.jsonl_field, text_split=args.text_split, strict=args.strict,
                        read_bytes=args.read_mb << 20)
    report = clean(args.input, args.out, opts, runner=args.runner, pipeline_args=beam_args)
    print(format_report(report))
    return 0


COMMANDS = {"plan": cmd_plan, "prepare": cmd_prepare, "clean": cmd_clean}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: jaxllm data {plan,prepare,clean} [flags]\n\n"
              "  plan     the mixture table of a config (--config=pretrain ...)\n"
              "  prepare  tokenise once into ArrayRecord shards of token ids\n"
              "  clean    quality filters + exact and near-duplicate removal, with a report\n\n"
              "`jaxllm data <command> --help` lists its flags.")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])
