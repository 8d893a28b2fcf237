"""What an objective brings to the shared trainer: its loss, its data, its parameters and its report.

One objective = one loss (losses.py / steps.py) + one pipeline (data/) + the pieces below; the trainer looks
an objective up by `cfg.objective` and never branches on it. A new objective adds a builder to OBJECTIVES.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from jaxllm.checkpoint import load_params
from jaxllm.config import Config, ConfigError
from jaxllm.data import load_documents, lm_pipeline, mixture_stats, split_heldout, total_lanes
from jaxllm.data.mixture import from_config as mixture_from_config
from jaxllm.data.chat_pipeline import encode_pairs, encode_sft, pair_arrays, preference_pipeline, sft_pipeline
from jaxllm.data.formats import load_pairs, load_sft
from jaxllm.metrics import record_gap_distribution
from jaxllm.model.heads import pair_logprobs, pair_rewards, reward_model_specs
from jaxllm.model.spec import init_from_specs, param_specs
from jaxllm.steps import dpo_loss, dpo_loss_cached, lm_loss, reward_loss


@dataclasses.dataclass
class Objective:
    loss_fn: Callable                      # (params, batch, frozen) -> (loss_sum, sums incl. "count")
    specs: dict                            # ParamSpec tree of the trained parameters (decoder + any heads)
    train_batches: Any                     # checkpointable iterator of per-process numpy batches
    eval_batches: Callable[[], Iterable]   # a fresh pass over the held-out batches
    report: Callable[[dict], dict]         # summed eval sums -> {"eval/...": value}
    # Parameters that exist only in this objective (a reward head) are added to loaded decoder weights.
    extend_params: Callable[[dict, jax.Array], dict] = lambda params, key: params
    frozen: dict = dataclasses.field(default_factory=dict)   # read by the loss, never trained or saved
    # (step, params, put_batch, workdir) -> extra metrics; put_batch makes a host batch a global array.
    eval_hook: Callable[..., dict] | None = None
    # () -> {"data/...": value}: per-source tokens and epochs so far, merged into the metrics at log steps.
    data_stats: Callable[[], dict] | None = None


def lm_documents(cfg: Config) -> tuple[list[str], list[str]]:
    """Training and held-out documents of an LM run."""
    data = cfg.data
    docs = load_documents(data.sources, jsonl_field=data.jsonl_field, text_split=data.text_split)
    if data.eval_sources:
        return docs, load_documents(data.eval_sources, jsonl_field=data.jsonl_field, text_split=data.text_split)
    return split_heldout(docs, data.eval_fraction, cfg.train.seed)


def lm_report(sums: dict) -> dict:
    loss = sums["loss"] / sums["count"]
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": sums["count"]}


def build_lm(cfg: Config, tokenizer, *, batch_size: int, process_index: int, process_count: int) -> Objective:
    """Next-token prediction on packed rows of a (weighted) mixture of sources."""
    mixture, eval_records = mixture_from_config(cfg.data, cfg.train.seed, tokenizer)
    pipeline = functools.partial(lm_pipeline, tokenizer=tokenizer, seq_len=cfg.data.seq_len, batch_size=batch_size,
                                 add_bos=cfg.data.add_bos, add_eos=cfg.data.add_eos, process_index=process_index,
                                 process_count=process_count, max_doc_chars=cfg.data.max_doc_chars)
    train_batches = pipeline(mixture, seed=cfg.train.seed, workers=cfg.data.workers)
    lanes = total_lanes(batch_size, process_count)
    return Objective(
        loss_fn=functools.partial(lm_loss, model_cfg=cfg.model, z_loss=cfg.train.z_loss),
        specs=param_specs(cfg.model),
        train_batches=train_batches,
        eval_batches=lambda: pipeline(eval_records, seed=0, shuffle=False, repeat=False),
        report=lm_report,
        data_stats=lambda: mixture_stats(mixture, train_batches.get_state(), lanes),
    )


# ---------------------------------------------------------------------------------------------------------
# Post-training: records from data.train (and data.eval, or a held-out share of data.train).

def _records(cfg: Config, loader) -> tuple[list, list]:
    if not cfg.data.train:
        raise ConfigError(f"objective {cfg.objective!r} needs record files: --config.data.train=<file>[,...]")
    records = loader(cfg.data.train)
    if cfg.data.eval:
        return records, loader(cfg.data.eval)
    return split_heldout(records, cfg.data.eval_fraction, cfg.train.seed)


def build_sft(cfg: Config, tokenizer, *, batch_size: int, process_index: int, process_count: int) -> Objective:
    """Instruction tuning: next-token loss on the assistant's tokens only, samples packed whole."""
    data = cfg.data
    load = functools.partial(load_sft, fmt=data.format, on_error=data.on_error)
    train_convs, eval_convs = _records(cfg, load)
    encode = functools.partial(encode_sft, tokenizer=tokenizer, template=data.template, seq_len=data.seq_len,
                               overlong=data.overlong)
    train_samples, eval_samples = encode(train_convs), encode(eval_convs)
    pipeline = functools.partial(sft_pipeline, seq_len=data.seq_len, batch_size=batch_size, pack=data.pack,
                                 process_index=process_index, process_count=process_count)
    return Objective(
        loss_fn=functools.partial(lm_loss, model_cfg=cfg.model),
        specs=param_specs(cfg.model),
        train_batches=pipeline(train_samples, seed=cfg.train.seed),
        eval_batches=lambda: pipeline(eval_samples, seed=0, shuffle=False, repeat=False),
        report=lm_report,
    )


def _pairs(cfg: Config, tokenizer) -> tuple[list, list]:
    load = functools.partial(load_pairs, on_error=cfg.data.on_error)
    train_pairs, eval_pairs = _records(cfg, load)
    encode = functools.partial(encode_pairs, tokenizer=tokenizer, template=cfg.data.template,
                               seq_len=cfg.data.seq_len, overlong=cfg.data.overlong)
    return encode(train_pairs), encode(eval_pairs)


def _pair_pipelines(cfg, train_pairs, eval_pairs, batch_size, process_index, process_count):
    pipeline = functools.partial(preference_pipeline, seq_len=cfg.data.seq_len, batch_size=batch_size,
                                 process_index=process_index, process_count=process_count)
    return (pipeline(train_pairs, seed=cfg.train.seed),
            lambda: pipeline(eval_pairs, seed=0, shuffle=False, repeat=False))


def build_reward(cfg: Config, tokenizer, *, batch_size: int, process_index: int, process_count: int) -> Objective:
    """A Bradley-Terry reward model: the decoder plus a scalar head read at the last real token."""
    train_pairs, eval_pairs = _pairs(cfg, tokenizer)
    train_batches, eval_batches = _pair_pipelines(cfg, train_pairs, eval_pairs, batch_size, process_index,
                                                  process_count)
    specs = reward_model_specs(cfg.model)
    head_specs = {"reward_head": specs["reward_head"]}

    def extend(params, key):   # a decoder checkpoint (pretrained or SFT) gets a fresh head
        return {**params, **init_from_specs(head_specs, key)} if "reward_head" not in params else params

    def report(sums):
        n = sums["count"]
        mean = sums["gap"] / n
        return {"eval/loss": sums["loss"] / n, "eval/accuracy": sums["accuracy"] / n, "eval/gap_mean": mean,
                "eval/gap_var": max(sums["gap_sq"] / n - mean * mean, 0.0)}

    return Objective(
        loss_fn=functools.partial(reward_loss, model_cfg=cfg.model, center=cfg.reward.center,
                                  use_margin=cfg.reward.use_margin),
        specs=specs, train_batches=train_batches, eval_batches=eval_batches, report=report, extend_params=extend,
        eval_hook=functools.partial(reward_gap_plots, cfg=cfg, eval_batches=eval_batches),
    )


def reward_gap_plots(step: int, params, put_batch, workdir: str, *, cfg: Config, eval_batches) -> dict:
    """Per-pair gaps r_chosen − r_rejected on the held-out pairs: a histogram PNG for this step, and the
    curve of their mean and variance over all evaluations so far (history in eval/reward_gaps.jsonl)."""
    score = jax.jit(functools.partial(pair_rewards, cfg=cfg.model))
    gaps = []
    for batch in eval_batches():
        rewards = np.asarray(jax.device_get(score(params, put_batch(batch))))
        keep = np.asarray(batch["weight"]) > 0
        gaps.append((rewards[:, 0] - rewards[:, 1])[keep])
    gaps = np.concatenate(gaps)
    if jax.process_index() == 0:
        record_gap_distribution(workdir, step, gaps, bins=cfg.reward.histogram_bins)
    return {}


def build_dpo(cfg: Config, tokenizer, *, batch_size: int, process_index: int, process_count: int) -> Objective:
    """DPO: the policy starts from init_from, which is also the frozen reference."""
    if not cfg.init_from:
        raise ConfigError("objective 'dpo' needs init_from (the SFT model, which is also the reference)")
    train_pairs, eval_pairs = _pairs(cfg, tokenizer)
    reference, _, _ = load_params(cfg.init_from)
    reference = {k: v for k, v in reference.items() if k != "reward_head"}
    d = cfg.dpo
    loss_kw = dict(model_cfg=cfg.model, beta=d.beta, kind=d.loss, label_smoothing=d.label_smoothing)
    if d.reference == "cached":
        for pairs in (train_pairs, eval_pairs):
            attach_reference_logprobs(pairs, reference, cfg, batch_size)
        loss_fn, frozen = functools.partial(dpo_loss_cached, **loss_kw), {}
    else:
        loss_fn, frozen = functools.partial(dpo_loss, **loss_kw), {"reference": reference}
    train_batches, eval_batches = _pair_pipelines(cfg, train_pairs, eval_pairs, batch_size, process_index,
                                                  process_count)

    def report(sums):
        n = sums["count"]
        return {f"eval/{k}": sums[k] / n for k in ("loss", "accuracy", "reward_margin", "reward_chosen",
                                                    "reward_rejected")}

    return Objective(loss_fn=loss_fn, specs=param_specs(cfg.model), train_batches=train_batches,
                     eval_batches=eval_batches, report=report, frozen=frozen)


def attach_reference_logprobs(pairs: list[dict], reference, cfg: Config, batch_size: int) -> None:
    """Computes the reference model's (chosen, rejected) log-probabilities once, into each pair."""
    logprobs = jax.jit(functools.partial(pair_logprobs, cfg=cfg.model))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        arrays = [pair_arrays(p, cfg.data.seq_len) for p in chunk]
        batch = {k: np.stack([a[k] for a in arrays]) for k in ("tokens", "targets", "loss_mask", "segment_ids",
                                                               "positions")}
        values = np.asarray(jax.device_get(logprobs(reference, batch)))
        for pair, value in zip(chunk, values):
            pair["ref_logp"] = value.tolist()
    logging.info("reference log-probabilities cached for %d pairs", len(pairs))


def score(params, cfg, tokenizer, prompts: Sequence[str], responses: Sequence[str], *, template: str = "alpaca",
          seq_len: int = 512, batch_size: int = 8) -> np.ndarray:
    """Rewards of a trained reward model for (prompt, response) texts: (n,) float32."""
    pairs = [{"prompt": [{"role": "user", "content": p}], "chosen": r, "rejected": r, "margin": 0.0}
             for p, r in zip(prompts, responses)]
    encoded = encode_pairs(pairs, tokenizer, template=template, seq_len=seq_len, overlong="truncate_prompt")
    if len(encoded) != len(pairs):
        raise ValueError("some texts do not fit in seq_len even with the prompt cut; raise seq_len")
    fn = jax.jit(functools.partial(pair_rewards, cfg=cfg))
    out = []
    for start in range(0, len(encoded), batch_size):
        arrays = [pair_arrays(p, seq_len) for p in encoded[start:start + batch_size]]
        batch = {k: np.stack([a[k] for a in arrays]) for k in ("tokens", "segment_ids", "positions")}
        out.append(np.asarray(fn(params, batch))[:, 0])
    return np.concatenate(out).astype(np.float32)


OBJECTIVES: dict[str, Callable[..., Objective]] = {"lm": build_lm, "sft": build_sft, "reward": build_reward,
                                                   "dpo": build_dpo}


def build(cfg: Config, tokenizer, **kw) -> Objective:
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective {cfg.objective!r} is unknown; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[cfg.objective](cfg, tokenizer, **kw)
