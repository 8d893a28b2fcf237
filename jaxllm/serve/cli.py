"""`jaxllm serve`: flag parsing only; the server is server.py, the model comes from inference.py."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from jaxllm.cli import DefaultsHelpFormatter
from jaxllm.eval.cli import add_inference_flags, model_on_mesh

API_KEY_ENV = "JAXLLM_API_KEY"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm serve", description="OpenAI-compatible HTTP server over a checkpoint",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run workdir, step dir, converted or Hugging Face dir")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the checkpoint's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0 = any free port)")
    parser.add_argument("--model_name", default=None, help="the model id clients send (default: checkpoint dir name)")
    parser.add_argument("--template", default=None, help="chat template for /v1/chat/completions: a built-in name, a "
                        ".jinja file or a folder carrying one (default: the model's own, else chat)")
    add_inference_flags(parser)
    parser.add_argument("--max_batch", type=int, default=8, help="most rows decoded together")
    parser.add_argument("--max_tokens", type=int, default=256, help="default completion length for chat")
    parser.add_argument("--api_key", default=None,
                        help=f"require 'Authorization: Bearer <key>' on /v1 requests (401 otherwise); default: the "
                        f"{API_KEY_ENV} environment variable (which keeps the key out of the process list), else none")
    args = parser.parse_args(argv)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.warning("serving on %s without an API key: anyone who can reach it can use it (--api_key or %s)",
                        args.host, API_KEY_ENV)
    from jaxllm.data.templates import chosen_template
    from jaxllm.serve.server import Server
    with model_on_mesh(args) as model:
        server = Server(model.params, model.cfg, model.tokenizer,
                        model_name=args.model_name or Path(args.checkpoint).absolute().name,
                        template=chosen_template(args.template, model.template, "serve", fallback="chat"),
                        host=args.host, port=args.port,
                        max_batch=args.max_batch, default_max_tokens=args.max_tokens, api_key=api_key)
        auth = "a bearer API key required" if api_key else "no API key"
        print(f"serving {server.app.model_name} at {server.url} ({auth})", flush=True)
        server.serve_forever()
    return 0
