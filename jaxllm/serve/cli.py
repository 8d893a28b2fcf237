"""`jaxllm serve`: flag parsing only; the server is server.py, the model comes from inference.py."""
from __future__ import annotations

import argparse
from pathlib import Path

from jaxllm.cli import DefaultsHelpFormatter


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm serve", description="OpenAI-compatible HTTP server over a checkpoint",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run workdir, step dir, converted or Hugging Face dir")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the checkpoint's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0 = any free port)")
    parser.add_argument("--model_name", default=None, help="the model id clients send (default: checkpoint dir name)")
    parser.add_argument("--template", default=None, help="chat template for /v1/chat/completions (default: the one "
                        "the run was post-trained with, else chat)")
    parser.add_argument("--max_batch", type=int, default=8, help="most rows decoded together")
    parser.add_argument("--max_tokens", type=int, default=256, help="default completion length for chat")
    args = parser.parse_args(argv)
    from jaxllm.inference import load_for_inference
    from jaxllm.serve.server import Server
    model = load_for_inference(args.checkpoint, tokenizer=args.tokenizer)
    server = Server(model.params, model.cfg, model.tokenizer,
                    model_name=args.model_name or Path(args.checkpoint).absolute().name,
                    template=args.template or model.template or "chat", host=args.host, port=args.port,
                    max_batch=args.max_batch, default_max_tokens=args.max_tokens)
    print(f"serving {server.app.model_name} at {server.url}", flush=True)
    server.serve_forever()
    return 0
