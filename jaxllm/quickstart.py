"""The main job (`make demo`): offline, on a CPU, from raw built-in text to a trained, evaluated tiny LM.

1) load the built-in corpora (People's Daily 1998, product reviews, Python's documentation prose);
2) hold out 1% of the documents; 3) train a SentencePiece BPE tokenizer on the rest;
4) pretrain a tiny Llama-style model on packed rows; 5) report held-out loss, perplexity and bits per
character over every held-out token. Later stages (SFT, reward, DPO) add themselves here.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import jax

from jaxllm.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from jaxllm.data import load_documents, split_heldout
from jaxllm.trainer import train

SOURCES = ("builtin:peoples_daily", "builtin:reviews", "builtin:pydoc")


def quickstart_config(workdir: str, steps: int = 300, vocab_size: int = 8000) -> Config:
    return Config(
        model=ModelConfig.preset("tiny", vocab_size=0, d_model=128, num_heads=4, num_kv_heads=2, head_dim=32,
                                 mlp_dim=384, num_layers=4, max_seq_len=256),
        data=DataConfig(sources=SOURCES, eval_fraction=0.01, seq_len=256),
        optim=OptimConfig(lr=2e-3, warmup_steps=30, min_lr_ratio=0.1),
        train=TrainConfig(steps=steps, batch_size=16, log_every=20, eval_every=100, eval_batches=0,
                          save_every=100, z_loss=1e-4),
        workdir=workdir, tokenizer_vocab_size=vocab_size,
    ).validate()


def run_quickstart(workdir: str, steps: int = 300, vocab_size: int = 8000) -> dict:
    t0 = time.time()
    cfg = quickstart_config(workdir, steps, vocab_size)
    logging.info("quickstart: %s, %d devices; workdir %s", jax.devices()[0].device_kind, jax.device_count(), workdir)
    result = train(cfg)
    # Bits per character compare across tokenizers: total held-out NLL in bits over held-out characters.
    docs = load_documents(cfg.data.sources, jsonl_field=cfg.data.jsonl_field, text_split=cfg.data.text_split)
    _, heldout = split_heldout(docs, cfg.data.eval_fraction, cfg.train.seed)
    chars = sum(len(d) for d in heldout)
    nll_bits = result["eval/loss"] * result["eval/tokens"] / math.log(2)
    report = {
        "step": result["step"],
        "heldout_documents": len(heldout),
        "heldout_tokens": int(result["eval/tokens"]),
        "heldout_characters": chars,
        "heldout_loss": result["eval/loss"],
        "heldout_perplexity": result["eval/perplexity"],
        "bits_per_token": result["eval/loss"] / math.log(2),
        "bits_per_character": nll_bits / chars,
        "train_loss": result.get("train/loss"),
        "seconds": time.time() - t0,
    }
    out = Path(workdir) / "eval" / "quickstart.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("\n".join([
        "", "quickstart finished",
        f"  held-out loss        {report['heldout_loss']:.4f} nats/token (perplexity {report['heldout_perplexity']:.2f})",
        f"  bits per character   {report['bits_per_character']:.4f} over {chars} held-out characters",
        f"  train loss           {report['train_loss']:.4f} after {report['step']} steps, {report['seconds']:.0f} s",
        f"  loss curve           {Path(workdir) / 'plots' / 'loss.png'}",
        f"  report               {out}", ""]))
    return report
