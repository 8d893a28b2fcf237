"""`jaxllm instruct generate`: flag parsing for self-instruct; the work is in instruct/self_instruct.py."""
from __future__ import annotations

import argparse
from pathlib import Path

from jaxllm.cli import DefaultsHelpFormatter


def _default_prompt(seed_tasks: str) -> str:
    """The generation prompt kept beside the seed tasks (Alpaca: prompt.txt, BELLE: prompt_cn.txt)."""
    for name in ("prompt.txt", "prompt_cn.txt"):
        candidate = Path(seed_tasks).parent / name
        if candidate.exists():
            return str(candidate)
    raise ValueError(f"no prompt.txt or prompt_cn.txt beside {seed_tasks}; pass --prompt_file")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm instruct", description="instruction data generation",
                                     formatter_class=DefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("generate", help="self-instruct: seed tasks -> teacher -> filtered Alpaca-format JSONL",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--seed_tasks", required=True, help="Alpaca seed_tasks.jsonl or BELLE zh_seed_tasks.json")
    p.add_argument("--prompt_file", default=None, help="generation prompt (default: prompt*.txt beside the seeds)")
    p.add_argument("--teacher_url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--teacher_model", required=True, help="model id to send")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--num", type=int, required=True, help="records to keep")
    p.add_argument("--out", required=True, help="output JSONL (appended to; a rerun resumes)")
    p.add_argument("--lang", default=None, choices=["en", "zh"], help="default: from the prompt's language")
    p.add_argument("--k", type=int, default=3, help="seed tasks per request")
    p.add_argument("--seed", type=int, default=0, help="seed of the seed-task sampling")
    p.add_argument("--max_requests", type=int, default=None, help="give up after this many requests (default 10*num)")
    p.add_argument("--temperature", type=float, default=1.0, help="teacher sampling temperature")
    p.add_argument("--max_tokens", type=int, default=3072, help="teacher reply length limit")
    args = parser.parse_args(argv)
    from jaxllm.eval.client import ChatClient
    from jaxllm.instruct import self_instruct as si
    seeds = si.load_seed_tasks(args.seed_tasks)
    prompt = si.load_prompt(args.prompt_file or _default_prompt(args.seed_tasks))
    client = ChatClient(args.teacher_url, args.teacher_model, api_key_env=args.api_key_env)
    # A teacher that keeps failing raises ClientError: jaxllm.cli.main prints it in one line and exits 1.
    stats = si.generate_instructions(seeds, prompt, client, args.out, num=args.num, lang=args.lang, k=args.k,
                                     seed=args.seed, max_requests=args.max_requests, temperature=args.temperature,
                                     max_tokens=args.max_tokens)
    print(f"kept {stats['kept']} records after {stats['requests']} requests in {stats['out']}; "
          f"dropped: {stats['dropped']}")
    return 0
