"""`jaxllm eval ppl|mcq|judge` and `jaxllm generate`: flag parsing only; the work is in the library modules."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
from pathlib import Path

from jaxllm import storage
from jaxllm.cli import DefaultsHelpFormatter


def _write(report: dict, out: str | None, checkpoint: str | None, name: str) -> None:
    """Writes the JSON report to --out, or to <workdir>/eval/<name>.json when the checkpoint is a run workdir."""
    if out is None and _is_workdir(checkpoint):
        out = str(storage.as_path(checkpoint) / "eval" / f"{name}.json")
    if out:
        storage.write_text(out, json.dumps(report, ensure_ascii=False, indent=2))
        print(f"wrote {out}")


def _is_workdir(checkpoint: str | None) -> bool:
    return bool(checkpoint) and (storage.as_path(checkpoint) / "config.json").exists()


def _add_model_flags(p) -> None:
    p.add_argument("--checkpoint", required=True, help="run workdir, step dir, converted or Hugging Face dir")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model or tokenizer.json (default: the "
                   "checkpoint's)")
    add_inference_flags(p)


def add_inference_flags(p) -> None:
    """--attention and the mesh of a command that runs a model: eval, generate, serve."""
    from jaxllm.config import ATTENTION_IMPLS
    p.add_argument("--attention", default=None, choices=ATTENTION_IMPLS,
                   help="attention kernel (default: the checkpoint's model.attention_impl); auto takes the fastest "
                        "one that can run each call, xla always runs")
    p.add_argument("--fsdp", type=int, default=1, help="mesh.fsdp: parameters split over this many devices "
                   "(a model larger than one device's memory); the data axis takes the devices left over")
    p.add_argument("--tensor", type=int, default=1, help="mesh.tensor: heads, MLP and vocabulary split over this "
                   "many devices")


@contextlib.contextmanager
def model_on_mesh(args, checkpoint: str | None = None, **kw):
    """Loads --checkpoint sharded over the mesh of --fsdp / --tensor and runs the body under its rules."""
    from jaxllm import sharding
    from jaxllm.config import MeshConfig
    from jaxllm.inference import inference_mesh, load_for_inference
    mesh = inference_mesh(args.fsdp, args.tensor)
    model = load_for_inference(checkpoint or args.checkpoint, tokenizer=getattr(args, "tokenizer", None), mesh=mesh,
                               attention_impl=args.attention, **kw)
    with sharding.use_rules(mesh, MeshConfig().rules):
        yield model


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm eval", description="evaluate a checkpoint",
                                     formatter_class=DefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)

    p = sub.add_parser("ppl", help="perplexity, bits per token / character / byte of text files",
                       formatter_class=DefaultsHelpFormatter)
    _add_model_flags(p)
    p.add_argument("--text", action="append", required=True, help=".txt or .jsonl file; repeat for a per-source table")
    p.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's max_seq_len)")
    p.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default: window - 1)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--max_chars", type=int, default=None, help="score only the first N characters of each file")
    p.add_argument("--jsonl_field", default="text", help="text field of .jsonl files")
    p.add_argument("--out", default=None, help="JSON report path (default: <workdir>/eval/ppl.json for a workdir)")

    p = sub.add_parser("mcq", help="k-shot multiple-choice accuracy (C-Eval / CMMLU / MMLU CSV layouts)",
                       formatter_class=DefaultsHelpFormatter)
    _add_model_flags(p)
    p.add_argument("--data", required=True, help="directory with dev/ and val/ or test/ CSVs (+ subject_mapping.json)")
    p.add_argument("--shots", type=int, default=5, help="solved dev questions in each prompt (needs <data>/dev; "
                   "0 = zero-shot)")
    p.add_argument("--split", default=None, help="split to score (default: val, else test, else dev)")
    p.add_argument("--style", default=None, choices=["ceval", "mmlu"],
                   help="prompt form (default: by the questions' language: Chinese -> ceval, else mmlu)")
    p.add_argument("--predict_only", action="store_true",
                   help="do not score: write each question's predicted letter in C-Eval's submission format "
                   "(JSON: subject -> question id -> letter), e.g. for C-Eval's test split whose answers are hidden")
    p.add_argument("--subjects", default="", help="comma-separated subjects (default: all)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per forward pass")
    p.add_argument("--max_len", type=int, default=None, help="prompt token limit (default: the model's max_seq_len)")
    p.add_argument("--out", default=None, help="JSON report path (default: <workdir>/eval/mcq.json for a workdir); "
                   "with --predict_only the submission file (default: <workdir>/eval/mcq_submission.json)")

    p = sub.add_parser("judge", help="pairwise LLM-as-judge of two answer files",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--questions", required=True, help="BELLE eval_set.json or FastChat question.jsonl")
    p.add_argument("--answers_a", required=True, help="JSON Lines answers of model A")
    p.add_argument("--answers_b", required=True, help="JSON Lines answers of model B")
    p.add_argument("--judge_url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge_model", default=None, help="model id to send (with --judge_url)")
    p.add_argument("--judge_checkpoint", default=None, help="judge with this checkpoint in-process instead of an "
                   "endpoint (run workdir, step dir, converted or Hugging Face dir)")
    p.add_argument("--template", default=None, help="--judge_checkpoint's chat template (a built-in name, a .jinja "
                   "file or a folder carrying one; default: the checkpoint's own, else chat)")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--out", default="judge", help="directory for judgements.jsonl and summary.json (resumes)")
    p.add_argument("--parallel", type=int, default=4, help="judge calls in flight")
    p.add_argument("--max_questions", type=int, default=None, help="judge only the first N questions")
    p.add_argument("--max_tokens", type=int, default=512, help="judge reply length limit")
    args = parser.parse_args(argv)

    if args.what == "judge":
        from jaxllm.eval import judge
        from jaxllm.eval.client import ChatClient
        if bool(args.judge_url) == bool(args.judge_checkpoint) or (args.judge_url and not args.judge_model):
            parser.error("judge with --judge_url and --judge_model (an endpoint) or --judge_checkpoint (in-process)")
        questions = judge.load_questions(args.questions)[:args.max_questions]
        answers_a, answers_b = judge.load_answers(args.answers_a), judge.load_answers(args.answers_b)
        if args.judge_url:
            logging.info("judge: %s at %s; the endpoint applies its own chat template", args.judge_model,
                         args.judge_url)
            client = ChatClient(args.judge_url, args.judge_model, api_key_env=args.api_key_env)
        else:
            from jaxllm.data.templates import chosen_template
            from jaxllm.inference import load_for_inference
            model = load_for_inference(args.judge_checkpoint)
            client = judge.LocalJudge(model.params, model.cfg, model.tokenizer,
                                      chosen_template(args.template, model.template, "judge", fallback="chat"))
        try:
            summary = judge.run_judge(questions, answers_a, answers_b, client, args.out, parallel=args.parallel,
                                      max_tokens=args.max_tokens)
        finally:
            getattr(client, "close", lambda: None)()
        print(judge.format_table(summary))
        print(f"wrote {Path(args.out) / 'summary.json'} and judgements.jsonl")
        return 0

    if args.what == "mcq" and args.shots < 0:
        parser.error(f"--shots={args.shots}: must be >= 0")
    if args.what == "mcq" and args.predict_only and args.out is None and not _is_workdir(args.checkpoint):
        # Say so before minutes of loading and scoring, not after.
        parser.error("--predict_only needs --out=<file.json> (or a run workdir as --checkpoint)")
    if args.what == "ppl":   # read (and check) the texts before minutes of loading the model
        from jaxllm.eval import perplexity as ppl
        sources = {}
        for path in args.text:
            sources[Path(path).name if Path(path).name not in sources else path] = ppl.read_text(
                path, args.jsonl_field, args.max_chars)
    with model_on_mesh(args) as model:
        if args.what == "ppl":
            report = ppl.evaluate_perplexity(model.params, model.cfg, model.tokenizer, sources, window=args.window,
                                             stride=args.stride, batch_size=args.batch_size)
            print(ppl.format_table(report))
            _write(report, args.out, args.checkpoint, "ppl")
        else:
            from jaxllm.eval import multiple_choice as mc
            report = mc.evaluate_mcq(model.params, model.cfg, model.tokenizer, args.data, shots=args.shots,
                                     split=args.split, style=args.style,
                                     subjects=[s for s in args.subjects.split(",") if s] or None,
                                     batch_size=args.batch_size, max_len=args.max_len, predict_only=args.predict_only)
            if args.predict_only:
                print(mc.format_submission_summary(report))
                _write(report["submission"], args.out, args.checkpoint, "mcq_submission")
            else:
                print(mc.format_table(report))
                _write(report, args.out, args.checkpoint, "mcq")
    return 0


def generate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm generate", description="sample continuations from a checkpoint",
                                     formatter_class=DefaultsHelpFormatter)
    _add_model_flags(parser)
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate per prompt")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("--top_p", type=float, default=0.95, help="nucleus: smallest set with this probability")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    parser.add_argument("--stop", action="append", default=[], help="stop string; repeat for several")
    parser.add_argument("--template", default=None, help="wrap each prompt as a user turn of this chat template (a "
                        "built-in name, a .jinja file or a folder carrying one; default: the model's own; none: raw)")
    args = parser.parse_args(argv)
    from jaxllm.data.templates import chosen_template, encode_prompt, stop_markers
    from jaxllm.model.generate import SamplingParams, generate
    with model_on_mesh(args) as model:
        tok = model.tokenizer
        template = chosen_template(args.template, model.template, "generate")
        if template is not None:
            prompts = [encode_prompt([{"role": "user", "content": p}], template, tok) for p in args.prompt]
            stop_ids, stops = stop_markers(template, tok)
        else:
            prompts = [tok.encode(p, add_bos=tok.bos_id >= 0) for p in args.prompt]
            stop_ids, stops = ((tok.eos_id,) if tok.eos_id >= 0 else ()), ()
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, seed=args.seed, stop_strings=tuple(args.stop) + stops,
                                  stop_ids=stop_ids)
        for prompt, c in zip(args.prompt, generate(model.params, model.cfg, prompts, sampling, tokenizer=tok)):
            print(f"--- {prompt!r} ({len(c.tokens)} tokens, {c.finish_reason})")
            print(prompt + c.text if template is None else c.text)
    return 0
