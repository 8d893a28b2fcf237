"""RL step throughput on the tiny preset: rollout (sampling, scoring, old / reference log-probabilities) and
update time per step, sampled tokens/s and update tokens/s, for GRPO (one update per step) and PPO (value head,
rl.epochs x rl.minibatches updates per step).

  python benchmarks/rl_step.py --steps=8 --out=/tmp/rl_bench            # CPU, a few minutes

A random tiny decoder with a SentencePiece tokenizer trained on the built-in reviews, 64 prompts, a rule reward
(benchmarks.rl_step:short_answer), the trainer itself (train()). Each step's time is the trainer's step_seconds
(log_every=1: every step is fetched, so dispatch runs no further ahead than one step), its rollout part
rollout/seconds (the rollout waits for the previous update first, so the update's tail is not in it); the first
step (compilation) is left out and the median of the rest reported. Update tokens/s is the trainer's tokens_per_s:
the padded rows every pass runs over (batch x seq_len x rl.epochs) per second of the step less its rollout.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from jaxllm.weights import save_params
from jaxllm.config import Config, DataConfig, ModelConfig, OptimConfig, RewardConfig, RLConfig, TrainConfig
from jaxllm.data import load_documents
from jaxllm.metrics import read_metrics
from jaxllm.model.spec import init_params
from jaxllm.tokenizer import train_tokenizer
from jaxllm.trainer import train

SEQ_LEN, BATCH, NEW_TOKENS = 64, 32, 16


def short_answer(prompts, completions, completion_ids, **_):
    """A rule reward: 1 for a completion of at most 4 tokens."""
    return [float(len(ids) <= 4) for ids in completion_ids]


def setup(out: Path) -> tuple[str, Path]:
    """(base checkpoint, prompts file)."""
    docs = [d for d in load_documents(["builtin:reviews_pos", "builtin:reviews_neg"]) if 8 <= len(d) <= 40][:800]
    tok = train_tokenizer(docs, out_dir=str(out / "tok"), vocab_size=1500, character_coverage=0.98)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_seq_len=SEQ_LEN)
    base = save_params(str(out / "base"), init_params(cfg, jax.random.key(0)), cfg, tok.path)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": d[:10]}, ensure_ascii=False) + "\n" for d in docs[:64]))
    return base, prompts


def measure(name: str, out: Path, base: str, prompts: Path, steps: int, rl: RLConfig) -> dict:
    workdir = out / name
    cfg = Config(objective="rl", workdir=str(workdir), init_from=base, model=ModelConfig.preset("tiny"),
                 data=DataConfig(train=(str(prompts),), seq_len=SEQ_LEN, eval_fraction=0.0, template="chat"),
                 optim=OptimConfig(lr=1e-3, warmup_steps=0, decay="constant", weight_decay=0.0),
                 train=TrainConfig(steps=steps, batch_size=BATCH, log_every=1, eval_every=0, save_every=0,
                                   async_checkpointing=False),
                 rl=rl, reward=RewardConfig(functions=("benchmarks.rl_step:short_answer",))).validate()
    train(cfg)
    rows = [r for r in read_metrics(str(workdir / "metrics.jsonl")) if "tokens_per_s" in r][1:]   # compiled
    step_s = np.median([r["step_seconds"] for r in rows])
    rollout_s = np.median([r["rollout/seconds"] for r in rows])
    updates = rl.epochs * rl.minibatches
    return {"run": name, "updates_per_step": updates, "step_s": step_s, "rollout_s": rollout_s,
            "update_s": step_s - rollout_s,
            "sampled_tokens_per_s": np.median([r["rollout/tokens_per_s"] for r in rows]),
            "response_length": np.median([r["rollout/response_length"] for r in rows]),
            "update_tokens_per_s": np.median([r["tokens_per_s"] for r in rows])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="/tmp/rl_bench")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, prompts = setup(out)
    results = [measure("grpo", out, base, prompts, args.steps, RLConfig(group_size=8, max_new_tokens=NEW_TOKENS)),
               measure("ppo", out, base, prompts, args.steps,
                       RLConfig(algorithm="ppo", group_size=1, max_new_tokens=NEW_TOKENS, epochs=2, minibatches=2))]
    print(f"tiny preset, batch {BATCH} completions x seq_len {SEQ_LEN}, max_new_tokens {NEW_TOKENS}, "
          f"{jax.default_backend()}")
    print(f"{'run':6} {'updates':>7} {'step s':>7} {'rollout s':>9} {'update s':>8} {'sampled tok/s':>13} "
          f"{'resp len':>8} {'update tok/s':>12}")
    for r in results:
        print(f"{r['run']:6} {r['updates_per_step']:7d} {r['step_s']:7.2f} {r['rollout_s']:9.2f} {r['update_s']:8.2f} "
              f"{r['sampled_tokens_per_s']:13.0f} {r['response_length']:8.1f} {r['update_tokens_per_s']:12.0f}")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
