"""The main job (`make demo`): offline, on a CPU, every stage from raw built-in text to a preference-tuned
tiny model, each stage starting from the previous one's checkpoint.

1) pretrain: a SentencePiece BPE tokenizer and a tiny Llama-style LM on the built-in corpora (People's Daily
   1998, product reviews, Python's documentation prose); held-out loss, perplexity, bits per character.
2) sft: "判断下面评论的情感倾向" -> 正面/负面 on the reviews; held-out accuracy of the answered label.
3) reward: prompt "下面是一条正面的评论：", chosen a positive review, rejected a negative one; held-out
   accuracy and the reward-gap plots.
4) dpo: the same pairs from the SFT model, with LoRA adapters (the frozen SFT model is also the reference);
   implicit-reward accuracy and margin.
5) rl: GRPO from the SFT model against stage 3's reward model on "下面是一条正面的评论：" and its variants;
   held-out prompts scored by the reward model before and after, and the KL to the SFT model.
After pretraining and SFT: sliding-window perplexity and bits per character, a 2-shot multiple-choice
accuracy on held-out reviews (C-Eval prompt form), and sampled continuations.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import random
import time
from pathlib import Path

import jax
import numpy as np

from jaxllm.weights import load_params
from jaxllm.config import (Config, DataConfig, DPOConfig, LoraConfig, ModelConfig, OptimConfig, RewardConfig,
                           RLConfig, TrainConfig, from_config_dict)
from jaxllm.configs.pretrain import get_config as pretrain_config
from jaxllm.data import load_documents, split_heldout
from jaxllm.data.chat_pipeline import encode_pairs, pair_batch
from jaxllm.data.formats import load_sft
from jaxllm.eval.multiple_choice import Question, evaluate_questions
from jaxllm.eval.perplexity import text_perplexity
from jaxllm.model.generate import SamplingParams, generate_text
from jaxllm.model.heads import pair_logprobs
from jaxllm.objectives.lm import lm_documents
from jaxllm.tokenizer import load_tokenizer
from jaxllm.tokenizer.inspect import tokens_per_char_by_language
from jaxllm.trainer import train

SOURCES = ("builtin:peoples_daily", "builtin:reviews", "builtin:pydoc")
STAGES = ("pretrain", "sft", "reward", "dpo", "rl")
SENTIMENT_INSTRUCTION = "判断下面评论的情感倾向，回答正面或负面。"
LABELS = ("正面", "负面")
POSITIVE_PROMPT = "下面是一条正面的评论："
TEMPLATE = "alpaca_zh"


PRETRAIN_STEPS = 1200   # ~4 minutes of the tiny default on a 2-core CPU (README, "The quickstart runs ...")


def quickstart_config(workdir: str, steps: int = PRETRAIN_STEPS, vocab_size: int = 0) -> Config:
    """`jaxllm train --config=pretrain` as shipped (the tiny model, its batch, rate and tokenizer size, on the
    built-in corpora), with the quickstart's length, 1% held out and its logging; vocab_size 0 keeps the config's."""
    c = pretrain_config("model=tiny")
    c.workdir, c.train.steps, c.data.sources, c.data.eval_fraction = workdir, steps, SOURCES, 0.01
    c.train.log_every, c.train.eval_every, c.train.eval_batches = 50, max(steps // 4, 1), 0   # 0: all held out
    c.train.save_every = max(steps // 4, 1)
    c.tokenizer_vocab_size = vocab_size or c.tokenizer_vocab_size
    return from_config_dict(c)


def _post_config(objective: str, workdir: Path, init_from: Path, train_file: Path, steps: int, **kw) -> Config:
    seq_len = kw.pop("seq_len", 128)
    return Config(objective=objective, workdir=str(workdir), init_from=str(init_from),
                  # The architecture comes from init_from; these are the runtime fields (unrolled layers: CPU).
                  model=ModelConfig.preset("tiny", max_seq_len=seq_len, scan_layers=False),
                  data=DataConfig(train=(str(train_file),), eval_fraction=0.1, seq_len=seq_len, template=TEMPLATE,
                                  overlong="truncate_prompt"),
                  optim=kw.pop("optim", OptimConfig(lr=1e-3, warmup_steps=10, weight_decay=0.0)),
                  train=TrainConfig(steps=steps, batch_size=16, log_every=10, eval_every=max(steps // 3, 1),
                                    eval_batches=0, save_every=0, eval_at_start=True),
                  **kw).validate()


def _short_reviews(name: str, n: int, seed: int) -> list[str]:
    docs = [d for d in load_documents([f"builtin:{name}"]) if 6 <= len(d) <= 60]
    random.Random(seed).shuffle(docs)
    return docs[:n]


def write_review_data(out: Path, n: int = 1200) -> tuple[Path, Path]:
    """The built-in review experiments as record files: an SFT sentiment set and preference pairs."""
    out.mkdir(parents=True, exist_ok=True)
    pos, neg = _short_reviews("reviews_pos", n, 1), _short_reviews("reviews_neg", n, 2)
    sft, pairs = out / "sentiment_sft.jsonl", out / "positive_pairs.jsonl"
    rows = [{"instruction": SENTIMENT_INSTRUCTION, "input": r, "output": label}
            for r, label in [(p, LABELS[0]) for p in pos] + [(q, LABELS[1]) for q in neg]]
    random.Random(0).shuffle(rows)
    sft.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    pairs.write_text("".join(json.dumps({"prompt": POSITIVE_PROMPT, "chosen": p, "rejected": q}, ensure_ascii=False)
                             + "\n" for p, q in zip(pos, neg)), encoding="utf-8")
    return sft, pairs


RL_PROMPTS = ("下面是一条正面的评论：", "下面是一条好评：", "请写一条正面的评论：", "下面是一条买家的正面评价：",
              "写一条好评：", "下面是一条满意的评论：", "下面是一条推荐的评论：", "下面是一条正面的商品评论：")


def write_rl_prompts(out: Path) -> Path:
    """The RL stage's prompts: the reward model's prompt and its variants, each with a few different openings."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "rl_prompts.jsonl"
    openings = ("", "这个", "质量", "物流", "东西", "价格")
    with open(path, "w") as f:
        for prompt in RL_PROMPTS:
            for opening in openings:
                f.write(json.dumps({"prompt": prompt + opening}, ensure_ascii=False) + "\n")
    return path


def label_accuracy(checkpoint: str, sft_file: Path, eval_fraction: float, seed: int, seq_len: int) -> float:
    """Held-out accuracy of the answered label: the model's answer is whichever of 正面 / 负面 it gives the
    higher log-probability after the prompt (decoding constrained to the two labels)."""
    params, model_cfg, tok_path = load_params(checkpoint)
    _, held = split_heldout(load_sft(sft_file), eval_fraction, seed)
    pairs = []
    for conv in held:
        truth = conv[-1]["content"]
        other = LABELS[1] if truth == LABELS[0] else LABELS[0]
        pairs.append({"prompt": conv[:-1], "chosen": truth, "rejected": other, "margin": 0.0})
    encoded = encode_pairs(pairs, load_tokenizer(tok_path), template=TEMPLATE, seq_len=seq_len, overlong="truncate_prompt")
    logprobs = jax.jit(functools.partial(pair_logprobs, cfg=model_cfg))
    correct = 0
    for start in range(0, len(encoded), 32):
        lp = np.asarray(logprobs(params, pair_batch(encoded[start:start + 32], seq_len)))   # (pairs, 2)
        correct += int(np.sum(lp[:, 0] > lp[:, 1]))
    return correct / len(encoded)


def review_questions(n: int = 120, skip: int = 1200) -> tuple[list[Question], list[Question]]:
    """A held-out multiple-choice set from reviews the SFT and preference stages never see (their first
    `skip` of each class): "这条评论的情感是" with options 正面 / 负面; returns (questions, shots)."""
    pos = _short_reviews("reviews_pos", skip + n, 1)[skip:]
    neg = _short_reviews("reviews_neg", skip + n, 2)[skip:]
    items = [(r, "A") for r in pos] + [(r, "B") for r in neg]
    random.Random(3).shuffle(items)
    qs = [Question("reviews", str(i), f"评论：{r}\n这条评论的情感是", LABELS, ans, f"builtin:reviews:{i}")
          for i, (r, ans) in enumerate(items)]
    return qs[4:], qs[:4]


def evaluate_model(checkpoint: Path, heldout_text: str, samples: bool = True) -> dict:
    """Sliding-window perplexity and bits per character on held-out text, the review multiple-choice accuracy
    (2-shot, C-Eval prompt form), and a few sampled continuations."""
    params, cfg, tok_path = load_params(str(checkpoint))
    tok = load_tokenizer(tok_path)
    ppl = text_perplexity(params, cfg, tok, heldout_text)
    questions, shots = review_questions()
    mcq = evaluate_questions(params, cfg, tok, {"reviews": questions}, {"reviews": shots}, shots=2,
                             mapping={"reviews": {"name": "商品评论", "category": "Other"}}, style="ceval")
    out = {"perplexity": ppl.perplexity, "bits_per_character": ppl.bits_per_char, "bits_per_byte": ppl.bits_per_byte,
           "review_mcq_accuracy": mcq["overall"]["accuracy"], "review_mcq_questions": len(questions)}
    if samples:
        prompts = ["今天", "中国经济", "这个手机", "The function"]
        texts = generate_text(params, cfg, tok, prompts, SamplingParams(max_new_tokens=30, temperature=0.8,
                                                                         top_p=0.95, seed=0))
        out["samples"] = {p: t for p, t in zip(prompts, texts)}
    return out


def run_quickstart(workdir: str, steps: int = PRETRAIN_STEPS, vocab_size: int = 0, post_steps: int = 120,
                   stages=STAGES) -> dict:
    t0 = time.time()
    root = Path(workdir)
    logging.info("quickstart: %s, %d devices; workdir %s", jax.devices()[0].device_kind, jax.device_count(), root)
    report: dict = {}
    # 1) pretraining
    cfg = quickstart_config(str(root / "pretrain"), steps, vocab_size)
    result = train(cfg)
    _, heldout = lm_documents(cfg)
    chars = sum(len(d) for d in heldout)
    report["pretrain"] = {
        "steps": result["step"], "heldout_documents": len(heldout), "heldout_tokens": int(result["eval/tokens"]),
        "heldout_characters": chars, "heldout_loss": result["eval/loss"],
        "heldout_perplexity": result["eval/perplexity"], "bits_per_token": result["eval/loss"] / math.log(2),
        # Bits per character compare across tokenizers: held-out NLL in bits over held-out characters.
        "bits_per_character": result["eval/loss"] * result["eval/tokens"] / math.log(2) / chars,
        "train_loss": result.get("train/loss"),
        # How many tokens the run's own tokenizer spends per character of held-out Chinese and English.
        "tokenizer": tokens_per_char_by_language(Path(cfg.workdir) / "tokenizer.model", heldout)}
    report["pretrain"]["evaluation"] = evaluate_model(root / "pretrain", "\n".join(heldout))
    sft_file, pairs_file = write_review_data(root / "data")
    if "sft" in stages:   # 2) instruction tuning
        sft_cfg = _post_config("sft", root / "sft", root / "pretrain", sft_file, post_steps, seq_len=128)
        result = train(sft_cfg)
        report["sft"] = {"steps": result["step"], "heldout_answer_loss": result["eval/loss"],
                         "heldout_label_accuracy": label_accuracy(str(root / "sft"), sft_file, 0.1, 0, 128),
                         "evaluation": evaluate_model(root / "sft", "\n".join(heldout), samples=False)}
    base = root / ("sft" if "sft" in stages else "pretrain")
    if "reward" in stages:   # 3) reward model
        rm_cfg = _post_config("reward", root / "reward", base, pairs_file, post_steps, reward=RewardConfig(center=0.01))
        result = train(rm_cfg)
        report["reward"] = {k: result[f"eval/{k}"] for k in ("accuracy", "gap_mean", "gap_var")}
        report["reward"]["plots"] = str(root / "reward" / "plots" / "reward_gap_curve.png")
    if "dpo" in stages:   # 4) DPO with LoRA: adapters on the frozen SFT model, which is also the reference
        dpo_cfg = _post_config("dpo", root / "dpo", base, pairs_file, max(post_steps // 2, 1),
                               dpo=DPOConfig(beta=0.1), lora=LoraConfig(rank=16, alpha=32.0),
                               optim=OptimConfig(lr=2e-3, warmup_steps=5, weight_decay=0.0))
        result = train(dpo_cfg)
        report["dpo"] = {k: result[f"eval/{k}"] for k in ("accuracy", "reward_margin", "loss")}
        trained = sum(x.size for x in jax.tree.leaves(result["state"]["params"]))
        report["dpo"]["lora"] = {"rank": 16, "trained_parameters": int(trained),
                                 "trained_share": trained / report_parameters(base)}
    # 5) GRPO against the reward model of stage 3. beta 0.1 and lr 2e-4 keep the KL small: with beta 0.04 and lr
    # 3e-4 the policy found garbage the tiny reward model scores high (KL ~5) within 20 steps.
    if "rl" in stages and "reward" in stages:
        prompts_file = write_rl_prompts(root / "data")
        rl_steps = max(post_steps // 6, 1)
        rl_cfg = _post_config("rl", root / "rl", base, prompts_file, rl_steps, seq_len=64,
                              reward=RewardConfig(model=str(root / "reward")),
                              rl=RLConfig(group_size=4, max_new_tokens=16, beta=0.1, eval_prompts=16),
                              optim=OptimConfig(lr=2e-4, warmup_steps=2, decay="constant", weight_decay=0.0))
        # held-out prompts scored at the start and the end only (each evaluation samples and scores them)
        result = train(dataclasses.replace(rl_cfg, data=dataclasses.replace(rl_cfg.data, eval_fraction=0.25),
                                           train=dataclasses.replace(rl_cfg.train, eval_every=rl_steps)))
        rows = [json.loads(line) for line in (root / "rl" / "eval" / "rl_rewards.jsonl").read_text().splitlines()]
        report["rl"] = {"reward_before": rows[0]["eval/reward"], "reward_after": rows[-1]["eval/reward"],
                        "kl": result.get("train/kl"), "steps": result["step"],
                        "samples": str(root / "rl" / "eval" / "samples.jsonl")}
    report["seconds"] = time.time() - t0
    out = root / "eval" / "quickstart.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(_summary(report, root, out))
    return report


def report_parameters(checkpoint: Path) -> int:
    """Parameters of the model a checkpoint holds."""
    from jaxllm.weights import describe_checkpoint
    from jaxllm.model.spec import count_params
    return count_params(describe_checkpoint(str(checkpoint))["model_cfg"])


def _summary(report: dict, root: Path, out: Path) -> str:
    p = report["pretrain"]
    lines = ["", "quickstart finished",
             f"  pretrain  held-out loss {p['heldout_loss']:.4f} nats/token (perplexity {p['heldout_perplexity']:.2f}), "
             f"{p['bits_per_character']:.4f} bits/character over {p['heldout_characters']} characters; "
             f"loss curve {root / 'pretrain' / 'plots' / 'loss.png'}",
             "  tokenizer " + ", ".join(f"{t['tokens_per_char']:.3f} tokens/character on held-out "
                                       f"{dict(zh='Chinese', en='English')[lang]} ({t['characters']} characters, "
                                       f"{t['byte_fallback_share']:.2%} byte-fallback tokens)"
                                       for lang, t in p["tokenizer"].items())]
    e = p["evaluation"]
    lines.append(f"  eval      sliding-window perplexity {e['perplexity']:.2f}, {e['bits_per_character']:.4f} "
                 f"bits/character; review multiple choice (2-shot) accuracy {e['review_mcq_accuracy']:.3f} "
                 f"over {e['review_mcq_questions']} questions")
    lines += [f"  sample    {prompt!r} -> {text!r}" for prompt, text in e.get("samples", {}).items()]
    if "sft" in report:
        lines.append(f"  sft       held-out label accuracy {report['sft']['heldout_label_accuracy']:.3f} "
                     f"(answer loss {report['sft']['heldout_answer_loss']:.4f}); review multiple choice "
                     f"{report['sft']['evaluation']['review_mcq_accuracy']:.3f}")
    if "reward" in report:
        r = report["reward"]
        lines.append(f"  reward    held-out accuracy {r['accuracy']:.3f}, gap mean {r['gap_mean']:.3f} "
                     f"var {r['gap_var']:.3f}; plots {r['plots']}")
    if "dpo" in report:
        d = report["dpo"]
        lines.append(f"  dpo       implicit-reward accuracy {d['accuracy']:.3f}, margin {d['reward_margin']:.4f} "
                     f"(LoRA rank {d['lora']['rank']}: {d['lora']['trained_parameters']:,} trained parameters, "
                     f"{100 * d['lora']['trained_share']:.1f}% of the model)")
    if "rl" in report:
        r = report["rl"]
        lines.append(f"  rl        GRPO against the reward model: held-out reward {r['reward_before']:.3f} -> "
                     f"{r['reward_after']:.3f} in {r['steps']} steps, KL to the SFT model {r['kl']:.4f}; samples "
                     f"{r['samples']}")
    lines += [f"  report    {out}  ({report['seconds']:.0f} s)", ""]
    return "\n".join(lines)
