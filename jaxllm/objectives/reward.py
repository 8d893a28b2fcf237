"""A Bradley-Terry reward model: the decoder plus a scalar head read at the last real token
(model/heads.py), trained on (chosen, rejected) pairs; held-out gap plots; `score` for new texts."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxllm import steps
from jaxllm.config import Config, ModelConfig
from jaxllm.data.chat_pipeline import encode_response, encoded_pairs_of_run, preference_pipelines
from jaxllm.data.templates import ChatTemplate
from jaxllm.metrics import record_gap_distribution
from jaxllm.model.heads import last_token_rewards, pair_rewards, reward_model_specs
from jaxllm.model.padding import pad_sequences
from jaxllm.model.spec import init_from_specs
from jaxllm.objectives import Objective


def bradley_terry(r_chosen: jax.Array, r_rejected: jax.Array, margin: jax.Array, weight: jax.Array,
                  center: float = 0.0) -> dict:
    """Pairwise reward-model loss −log σ(r_c − r_r − margin), summed over pairs with weight 1 (0 = padding).

    center > 0 adds center·(r_c + r_r)², which pins the rewards' mean near zero (the loss is invariant to a
    shift, so otherwise it drifts). Also sums of accuracy and of the gap and its square, for its variance."""
    gap = r_chosen - r_rejected
    per_pair = -jax.nn.log_sigmoid(gap - margin) + center * jnp.square(r_chosen + r_rejected)
    return {"loss": jnp.sum(per_pair * weight), "accuracy": jnp.sum((gap > 0) * weight),
            "gap": jnp.sum(gap * weight), "gap_sq": jnp.sum(jnp.square(gap) * weight), "count": jnp.sum(weight)}


def reward_loss(params, batch, frozen=None, *, model_cfg: ModelConfig, center: float = 0.0, use_margin: bool = True):
    """Bradley-Terry on (chosen, rejected) pairs; batch arrays are (batch, 2, length), margin (batch,)."""
    rewards = pair_rewards(params, batch, model_cfg)                          # (batch, 2)
    margin = batch["margin"] if use_margin else jnp.zeros_like(batch["margin"])
    sums = bradley_terry(rewards[:, 0], rewards[:, 1], margin, batch["weight"], center)
    return sums["loss"], sums


train_step = functools.partial(steps.train_step, loss_fn=reward_loss)
eval_step = functools.partial(steps.eval_step, loss_fn=reward_loss)


def reward_report(sums: dict) -> dict:
    n = sums["count"]
    mean = sums["gap"] / n
    return {"eval/loss": sums["loss"] / n, "eval/accuracy": sums["accuracy"] / n, "eval/gap_mean": mean,
            "eval/gap_var": max(sums["gap_sq"] / n - mean * mean, 0.0)}


def make_objective(cfg: Config, tokenizer, *, batch_size: int, process_index: int, process_count: int) -> Objective:
    """The reward model starts from init_from's decoder (pretrained or SFT) with a fresh head."""
    train_pairs, eval_pairs = encoded_pairs_of_run(cfg, tokenizer)
    train_batches, eval_batches = preference_pipelines(cfg, train_pairs, eval_pairs, batch_size=batch_size,
                                                       process_index=process_index, process_count=process_count)
    specs = reward_model_specs(cfg.model)
    head_specs = {"reward_head": specs["reward_head"]}

    def extend(params, key):   # a decoder checkpoint gets a fresh head; a reward model keeps its own
        return {**params, **init_from_specs(head_specs, key)} if "reward_head" not in params else params

    return Objective(
        train_step=train_step, eval_step=eval_step,
        loss_settings=dict(model_cfg=cfg.model, center=cfg.reward.center, use_margin=cfg.reward.use_margin),
        specs=specs, train_batches=train_batches, eval_batches=eval_batches, report=reward_report,
        extend_params=extend, eval_hook=functools.partial(reward_gap_plots, cfg=cfg, eval_batches=eval_batches),
    )


def reward_gap_plots(step: int, params, put_batch, workdir: str, *, cfg: Config, eval_batches) -> dict:
    """Per-pair gaps r_chosen − r_rejected on the held-out pairs: a histogram PNG for this step, and the
    curve of their mean and variance over all evaluations so far (history in eval/reward_gaps.jsonl)."""
    rewards_of = jax.jit(functools.partial(pair_rewards, cfg=cfg.model))
    gaps = []
    for batch in eval_batches():
        global_batch = put_batch(batch)
        # The global arrays span every process's rows: gather them whole, so each process plots all the pairs
        # (device_get cannot read the other hosts' shards).
        rewards = np.asarray(multihost_utils.process_allgather(rewards_of(params, global_batch), tiled=True))
        keep = np.asarray(multihost_utils.process_allgather(global_batch["weight"], tiled=True)) > 0
        gaps.append((rewards[:, 0] - rewards[:, 1])[keep])
    gaps = np.concatenate(gaps)
    if jax.process_index() == 0:
        record_gap_distribution(workdir, step, gaps, bins=cfg.reward.histogram_bins)
    return {}


def score(params, cfg: ModelConfig, tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
          template: ChatTemplate | str, seq_len: int = 512, batch_size: int = 8) -> np.ndarray:
    """Rewards of a trained reward model for (prompt, response) texts: (n,) float32. Each text is encoded as
    in training (the prompt a user turn of `template`, the model's: InferenceModel.template; cut from the left
    if it must be) and read at its last token."""
    encoded = [encode_response([{"role": "user", "content": p}], r, tokenizer, template, seq_len=seq_len,
                               overlong="truncate_prompt")
               for p, r in zip(prompts, responses)]
    if any(e is None for e in encoded):
        raise ValueError("some texts do not fit in seq_len even with the prompt cut; raise seq_len")
    rewards_of = jax.jit(functools.partial(last_token_rewards, cfg=cfg))
    out = []
    for start in range(0, len(encoded), batch_size):
        chunk = [e["ids"] for e in encoded[start:start + batch_size]]
        # (batch_size, seq_len) each; a short last chunk is filled with padding rows: one compiled program
        tokens, segment_ids, positions = pad_sequences(chunk, seq_len, side="right", batch=batch_size)
        out.append(np.asarray(rewards_of(params, tokens, segment_ids, positions))[:len(chunk)])
    return np.concatenate(out).astype(np.float32)
