"""Pretraining quality on a CPU at equal wall time: jaxllm's default config against a PyTorch GPT (issue 18).

  python benchmarks/cpu_pretrain_quality.py --minutes=6 --json=/tmp/quality.json     # the recorded run
  python benchmarks/cpu_pretrain_quality.py --minutes=0.5                            # a quick check

Both sides train on 红楼梦 + 三国演义 (../shared/data/text/zh/novels) for the same wall time, one after the other
on the same cores, and are scored in bits per character on the first 50,000 characters of 西游记, a novel
neither saw (raw text: newlines and indentation are scored too).

  jaxllm   configs/pretrain.py (model=tiny) as shipped, with only data.sources, train.steps and the workdir set:
           its tokenizer (6000-piece BPE, trained first and not timed), its data defaults (whole files cut into
           shuffled pieces), its schedule, its periodic evaluation and checkpoints. train.steps is sized to the
           budget from a short calibration run (on a shared machine the load changes, so the time it then takes
           is measured, and is what the peer gets). Scored by `text_perplexity` (`jaxllm eval ppl`) in
           windows of the 256-token rows it trained on, as the peer is.
  peer     transformers' GPT2LMHeadModel (nanoGPT's architecture) at 4 layers x 192, 6 heads, context 256,
           character-level (vocabulary: the training text's characters, plus one for unseen ones), torch with
           2 threads, nanoGPT's recipe: random 256-character windows, batch 16 (--peer_batch),
           AdamW (lr 1e-3, betas 0.9/0.99, weight decay 0.1), 10% warmup then cosine to 1e-4, both on the clock:
           it trains for exactly the seconds jaxllm's `train` took (setup, compile and evaluations included, so
           the peer trains a little longer than jaxllm steps). Scored with the same windows (256 tokens,
           overlapping by one, every character once).

Bits per character = total NLL / ln 2 / characters of the held-out text, so tokenizers compare.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
NOVELS = HERE.parent.parent / "shared" / "data" / "text" / "zh" / "novels"
TRAIN_FILES = ("hongloumeng.txt", "sanguoyanyi.txt")
HELDOUT_FILE, HELDOUT_CHARS = "xiyouji.txt", 50_000
CALIBRATION_STEPS = 40


def read_novel(name: str) -> str:
    from jaxllm.data.sources import _read_text   # the same UTF-8 / CRLF handling as training
    return _read_text(str(NOVELS / name))


# ------------------------------------------------------------------------------------------- jaxllm

OVERRIDES: list[str] = []   # --set a.b=value: a variant of the default config (the recorded run sets none)


def jaxllm_config(workdir: Path, steps: int, tokenizer: str = ""):
    from jaxllm.cli import load_config_dict
    from jaxllm.config import from_config_dict
    # The default config, and any --set as `jaxllm train` reads --config.a.b=value (same types, same errors).
    c = load_config_dict(["--config=pretrain", *(f"--config.{item}" for item in OVERRIDES)])
    c.data.sources = tuple(str(NOVELS / f) for f in TRAIN_FILES)
    c.train.steps = steps
    c.workdir = str(workdir)
    c.tokenizer = tokenizer
    return from_config_dict(c)


def run_jaxllm(budget_s: float, root: Path, heldout: str) -> dict:
    from jaxllm.weights import load_params
    from jaxllm.eval.perplexity import text_perplexity
    from jaxllm.metrics import read_metrics
    from jaxllm.run_setup import tokenizer_for_run
    from jaxllm.tokenizer import load_tokenizer
    from jaxllm.trainer import train

    t0 = time.perf_counter()
    tokenizer_for_run(jaxllm_config(root / "tokenizer", 1))   # trains the default tokenizer once (not timed)
    tok_path = str(root / "tokenizer")
    tokenizer_s = time.perf_counter() - t0
    # 1) Calibration: the trainer's steady step time and its fixed cost (setup, compile, final eval and save).
    t0 = time.perf_counter()
    train(jaxllm_config(root / "calibration", CALIBRATION_STEPS, tok_path))
    calib_s = time.perf_counter() - t0
    rows = [r for r in read_metrics(str(root / "calibration" / "metrics.jsonl")) if "tokens_per_s" in r]
    cfg = jaxllm_config(root / "run", 1, tok_path)
    step_s = float(np.median([cfg.train.batch_size * cfg.data.seq_len / r["tokens_per_s"] for r in rows[1:]]))
    fixed_s = max(calib_s - CALIBRATION_STEPS * step_s, 0.0)
    # Periodic evaluations and checkpoints (every 100 steps by default) come on top: 5% is kept for them.
    steps = max(int((budget_s - fixed_s) / (step_s * 1.05)), 1)
    # 2) The timed run.
    t0 = time.perf_counter()
    result = train(jaxllm_config(root / "run", steps, tok_path))
    train_s = time.perf_counter() - t0
    params, model_cfg, tpath = load_params(str(root / "run"))
    # Windows of the rows it trained on, as the peer is scored. The tiny config's context is its row length, so
    # this is `eval ppl`'s default; said here so that a --set variant is never scored past what it trained at.
    ppl = text_perplexity(params, model_cfg, load_tokenizer(tpath), heldout, window=cfg.data.seq_len)
    from jaxllm.tokenizer.inspect import text_stats
    stats = text_stats(load_tokenizer(tpath), [heldout])
    return {"steps": steps, "train_seconds": train_s, "tokenizer_seconds": tokenizer_s, "step_seconds": step_s,
            "fixed_seconds": fixed_s, "final_train_loss": result.get("train/loss"),
            "bits_per_character": ppl.bits_per_char, "heldout_tokens": ppl.tokens,
            "heldout_byte_fallback_share": stats["byte_fallback_share"],
            "params": int(sum(np.size(x) for x in __import__("jax").tree_util.tree_leaves(params)))}


# --------------------------------------------------------------------------------------------- peer

def run_peer(budget_s: float, train_text: str, heldout: str, threads: int = 2, seq_len: int = 256,
             batch: int = 16, seed: int = 0) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    chars = sorted(set(train_text))
    index = {c: i + 1 for i, c in enumerate(chars)}          # 0 = a character the training text lacks
    encode = lambda s: np.fromiter((index.get(c, 0) for c in s), np.int64, len(s))   # noqa: E731
    data = torch.from_numpy(encode(train_text))
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(chars) + 1, n_positions=seq_len, n_embd=192, n_layer=4,
                                       n_head=6, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=None, eos_token_id=None))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)

    def lr_at(progress: float) -> float:
        if progress < 0.1:                                     # 1) linear warmup over the first 10% of the time
            return 1e-3 * max(progress, 1e-3) / 0.1
        frac = (progress - 0.1) / 0.9                          # 2) cosine decay to 1e-4 over the rest
        return 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * min(frac, 1.0)))

    model.train()
    t0 = time.perf_counter()
    step, loss = 0, float("nan")
    while (elapsed := time.perf_counter() - t0) < budget_s:   # the schedule runs on the clock: exactly budget_s
        for g in opt.param_groups:
            g["lr"] = lr_at(elapsed / budget_s)
        starts = torch.randint(len(data) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + seq_len] for s in starts])                 # (B, T)
        y = torch.stack([data[s + 1:s + seq_len + 1] for s in starts])         # (B, T)
        logits = model(input_ids=x).logits                                      # (B, T, V)
        loss_t = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss = float(loss_t.detach())
    train_s = time.perf_counter() - t0
    return {"steps": step, "train_seconds": train_s, "final_train_loss": loss, "vocab": len(chars) + 1,
            "unseen_heldout_chars": int(sum(c not in index for c in heldout)),
            "bits_per_character": peer_bits_per_char(model, encode(heldout), seq_len),
            "params": int(sum(p.numel() for p in model.parameters()))}


def peer_bits_per_char(model, ids: np.ndarray, window: int) -> float:
    """The same windows as jaxllm's token_nll: `window` tokens, consecutive windows overlapping by one token, so
    every character after the first is scored once. (The first has no context; jaxllm scores it after <s>, so
    the peer's total is short of one character's cost: negligible over 50,000.)"""
    import torch
    model.eval()
    total, scored = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids) - 1, window - 1):
            chunk = torch.from_numpy(ids[begin:begin + window])[None]           # (1, T)
            logits = model(input_ids=chunk).logits[0, :-1]                       # (T - 1, V)
            total += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
            scored += chunk.shape[1] - 1
    assert scored == len(ids) - 1
    return total / math.log(2) / len(ids)


def run_side(side: str, minutes: float, workdir: str, seconds: float = 0.0, peer_batch: int = 16) -> dict:
    """One side in a fresh Python process, so that neither side's thread pools (XLA's, torch's) run or spin
    while the other trains."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, f"--side={side}", f"--minutes={seconds / 60 or minutes}", f"--json={result}"]
        cmd += [f"--set={item}" for item in OVERRIDES] + [f"--peer_batch={peer_batch}"]
        subprocess.run(cmd + ([f"--workdir={workdir}"] if workdir else []), check=True)
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=6.0, help="training wall time of each side")
    parser.add_argument("--workdir", default="", help="jaxllm's runs (default: a temporary directory)")
    parser.add_argument("--side", default="both", choices=("both", "jaxllm", "peer"), help="which side to run")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--set", action="append", default=[], metavar="A.B=VALUE",
                        help="jaxllm: override a field of the default config (repeatable), e.g. optim.lr=3e-3")
    parser.add_argument("--peer_batch", type=int, default=16, help="the peer's batch (nanoGPT's recipe: 16)")
    args = parser.parse_args()
    OVERRIDES.extend(args.set)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the CPU comparison, also on a machine with an accelerator
    budget = args.minutes * 60
    heldout = read_novel(HELDOUT_FILE)[:HELDOUT_CHARS]
    out = {"minutes": args.minutes, "cpus": os.cpu_count(), "heldout_characters": len(heldout),
           "overrides": OVERRIDES, "peer_batch": args.peer_batch}
    if args.side == "jaxllm":
        with tempfile.TemporaryDirectory() as tmp:
            out["jaxllm"] = run_jaxllm(budget, Path(args.workdir or tmp), heldout)
    elif args.side == "peer":
        text = "\n".join(read_novel(f) for f in TRAIN_FILES)
        out["peer"] = run_peer(budget, text, heldout, batch=args.peer_batch)
    else:
        out["jaxllm"] = run_side("jaxllm", args.minutes, args.workdir)["jaxllm"]    # one after the other,
        print("jaxllm:", json.dumps(out["jaxllm"]), flush=True)                     # each alone on the cores
        out["peer"] = run_side("peer", args.minutes, args.workdir, seconds=out["jaxllm"]["train_seconds"],
                               peer_batch=args.peer_batch)["peer"]
        print("peer:", json.dumps(out["peer"]), flush=True)
        out["jaxllm_vs_peer"] = out["jaxllm"]["bits_per_character"] / out["peer"]["bits_per_character"] - 1
        print(f"bits/character on {len(heldout):,} characters of 西游记: jaxllm {out['jaxllm']['bits_per_character']:.3f} "
              f"({out['jaxllm']['steps']} steps, {out['jaxllm']['train_seconds']:.0f} s), peer "
              f"{out['peer']['bits_per_character']:.3f} ({out['peer']['steps']} steps, "
              f"{out['peer']['train_seconds']:.0f} s): jaxllm {100 * out['jaxllm_vs_peer']:+.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
