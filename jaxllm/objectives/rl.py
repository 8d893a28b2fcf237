"""Reinforcement learning from rewards on the policy's own samples: GRPO (Shao et al. 2024), with the DAPO and
Dr. GRPO variants as options.

Each step (`Rollouts.__call__`, the trainer's rollout hook, before the train step):
  1. G completions of each prompt from the current parameters with the project's KV-cache generator (jitted,
     temperature / top-p, stop at the template's end marker or max_new_tokens); randomness from the step and
     process, so a resumed run samples exactly what it would have.
  2. Rewards per completion from each source: a jaxllm reward model (reward.model, scored in this process) and
     Python functions (reward.functions, "module:function"); combined with reward.weights, each logged.
  3. Advantages normalised within each prompt's group: (r - mean) / std (rl.scale_rewards=False: r - mean).
  4. Per-token log-probabilities of the sampled tokens under the rollout parameters ("old", before the update)
     and the reference (init_from, or with LoRA the frozen base: steps.reference_params), from one forward pass
     each with the training forward's numerics.
The loss (`grpo_loss`, the shared train step's) per completion token t:
    -min(ratio·A, clip(ratio, 1 - clip_low, 1 + clip_high)·A) + beta · k3,    ratio = exp(logp - old_logp),
    k3 = exp(ref - logp) - (ref - logp) - 1  (Schulman's unbiased, always >= 0 estimate of KL(policy || ref)),
aggregated per rl.aggregation (token / sequence / dr_grpo). With one update per rollout batch the ratio is 1 in
value and the clip only matters through its gradient, as in GRPO's usual single-pass setting.
"""
from __future__ import annotations

import functools
import importlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import steps
from jaxllm.config import Config, ConfigError, ModelConfig
from jaxllm.data import split_heldout
from jaxllm.data.formats import load_prompts
from jaxllm.data.templates import encode_prompt, run_template, stop_markers
from jaxllm.model.generate import SamplingParams, generate
from jaxllm.model.spec import param_specs
from jaxllm.model.transformer import forward
from jaxllm.objectives import Objective

ROLLOUT_ARRAYS = ("old_logp", "ref_logp", "advantage")


# ----------------------------------------------------------------------------------------------------
# The loss.

def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token estimate of KL(policy || reference) from the sampled token's log-probabilities."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def group_advantages(rewards: np.ndarray, group_size: int, scale: bool = True, eps: float = 1e-4) -> np.ndarray:
    """(rows,) rewards of consecutive groups of `group_size` completions of one prompt -> advantages."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)                  # (prompts, G)
    a = r - r.mean(axis=1, keepdims=True)
    if scale:
        a = a / (r.std(axis=1, keepdims=True) + eps)
    return a.reshape(-1).astype(np.float32)


def token_logprobs(params, batch: dict, cfg: ModelConfig, with_entropy: bool = False):
    """log p(target) at every position (rows, length); with_entropy also the policy's entropy there."""
    logits = forward(params, batch["tokens"], cfg, segment_ids=batch["segment_ids"], positions=batch["positions"])
    logp_all = jax.nn.log_softmax(logits, axis=-1)                              # (rows, length, vocab)
    logp = jnp.take_along_axis(logp_all, batch["targets"][..., None], axis=-1)[..., 0]   # (rows, length)
    if not with_entropy:
        return logp
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def _aggregate(per_token: jax.Array, mask: jax.Array, how: str, max_new_tokens: int) -> tuple[jax.Array, jax.Array]:
    """(sum, count) such that sum / count is the loss as `how` averages it (steps divides once by count)."""
    if how == "token":           # every completion token weighs the same (DAPO)
        return jnp.sum(per_token * mask), jnp.sum(mask)
    per_row = jnp.sum(per_token * mask, axis=1)                                  # (rows,)
    rows = jnp.sum(mask, axis=1) > 0
    if how == "sequence":        # each completion's own mean, then the mean over completions (GRPO)
        return jnp.sum(per_row / jnp.maximum(jnp.sum(mask, axis=1), 1.0)), jnp.sum(rows)
    return jnp.sum(per_row) / max_new_tokens, jnp.sum(rows)   # dr_grpo: a constant normaliser, no length bias


def policy_loss_sums(logp, entropy, batch: dict, *, beta: float, clip_low: float, clip_high: float,
                     aggregation: str, max_new_tokens: int) -> tuple[jax.Array, dict]:
    """The clipped policy-gradient loss with a k3 KL penalty over the completion tokens (batch["loss_mask"]),
    from the policy's log-probabilities of the sampled tokens (rows, length): (loss sum, sums incl. count)."""
    mask = batch["loss_mask"]
    ratio = jnp.exp(logp - batch["old_logp"])
    advantage = batch["advantage"][:, None]                                      # (rows, 1)
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = -jnp.minimum(ratio * advantage, clipped * advantage)
    kl = k3_kl(logp, batch["ref_logp"])
    loss, count = _aggregate(pg + beta * kl, mask, aggregation, max_new_tokens)
    mean = lambda x: _aggregate(x, mask, aggregation, max_new_tokens)[0]  # noqa: E731  (same weighting)
    sums = {"loss": loss, "count": count, "kl": mean(kl), "entropy": mean(entropy),
            "clip_fraction": mean((jnp.abs(ratio - clipped) > 0).astype(jnp.float32))}
    return loss, sums


def grpo_loss(params, batch, frozen=None, *, model_cfg: ModelConfig, **settings):
    """policy_loss_sums of the policy `params` on a rollout batch (settings: beta, clip_low, clip_high,
    aggregation, max_new_tokens)."""
    logp, entropy = token_logprobs(params, batch, model_cfg, with_entropy=True)  # (rows, length) each
    return policy_loss_sums(logp, entropy, batch, **settings)


train_step = functools.partial(steps.train_step, loss_fn=grpo_loss)
eval_step = functools.partial(steps.eval_step, loss_fn=grpo_loss)


# ----------------------------------------------------------------------------------------------------
# Rewards.

class RewardSources:
    """Every configured reward, each a function (prompts, completions, completion_ids, **fields) -> (n,)."""

    def __init__(self, cfg: Config):
        self.sources: dict[str, Callable] = {}
        if cfg.reward.model:
            self.sources["reward_model"] = reward_model_scorer(cfg.reward.model, cfg)
        for name in cfg.reward.functions:
            self.sources[name.rsplit(":", 1)[1]] = import_function(name)
        if not self.sources:
            raise ConfigError("objective 'rl' needs a reward: --config.reward.model=<reward run> and/or "
                              "--config.reward.functions=\"('module:function',)\"")
        self.weights = dict(zip(self.sources, cfg.reward.weights or [1.0] * len(self.sources)))

    def __call__(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                 fields: dict[str, list]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(the weighted sum, each source's rewards)."""
        each = {}
        for name, fn in self.sources.items():
            values = np.asarray(fn(prompts, completions, completion_ids=completion_ids, **fields), np.float32)
            if values.shape != (len(completions),):
                raise ValueError(f"reward {name!r} returned shape {values.shape} for {len(completions)} completions")
            each[name] = values
        total = sum(self.weights[name] * values for name, values in each.items())
        return np.asarray(total, np.float32), each


def import_function(name: str) -> Callable:
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward.functions: cannot import {name!r} ({e})") from None


def reward_model_scorer(path: str, cfg: Config) -> Callable:
    """A jaxllm reward model (its own tokenizer and chat template) scoring completions in this process."""
    from jaxllm.inference import load_for_inference
    from jaxllm.objectives.reward import score
    model = load_for_inference(path)
    if "reward_head" not in model.params:
        raise ConfigError(f"reward.model={path} is not a reward model (no reward_head); train one with "
                          f"configs/reward.py")
    template = model.template or "chat"

    def rewards(prompts, completions, **_):
        return score(model.params, model.cfg, model.tokenizer, prompts, completions, template=template,
                     seq_len=cfg.data.seq_len)
    return rewards


# ----------------------------------------------------------------------------------------------------
# Prompts and rollouts.

class PromptBatches:
    """Checkpointable iterator over this process's share of each global batch of prompts: a fresh permutation
    per epoch from the seed; yields {"prompt": (prompts,) indices into the prompt list}."""

    def __init__(self, count: int, per_step: int, seed: int, process_index: int, process_count: int):
        self.count, self.per_step, self.seed = count, per_step, seed
        self.share = per_step // process_count
        self.offset = process_index * self.share
        self.state = {"epoch": 0, "position": 0}

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.count)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        picked, epoch, position = [], self.state["epoch"], self.state["position"]
        while len(picked) < self.per_step:          # the global batch, wrapping into the next epoch
            order = self._order(epoch)
            take = min(self.per_step - len(picked), self.count - position)
            picked.extend(order[position:position + take])
            position += take
            if position == self.count:
                epoch, position = epoch + 1, 0
        self.state = {"epoch": epoch, "position": position}
        return {"prompt": np.asarray(picked[self.offset:self.offset + self.share], np.int32)}

    def get_state(self) -> dict:
        return dict(self.state)

    def set_state(self, state: dict) -> None:
        self.state = {"epoch": int(state["epoch"]), "position": int(state["position"])}


@functools.partial(jax.jit, static_argnames=("cfg",))
def _logprobs(params, batch, cfg):
    return token_logprobs(params, batch, cfg)


def rows_of(prompts: Sequence[list[int]], completions: Sequence[list[int]], seq_len: int) -> dict:
    """Right-padded training rows prompt + completion: targets are the next tokens; the loss mask covers the
    positions whose target is a completion token (its stop token included)."""
    n = len(prompts)
    out = {k: np.zeros((n, seq_len), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    out["loss_mask"] = np.zeros((n, seq_len), np.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids = list(p) + list(c)
        length = len(ids)
        out["tokens"][i, :length] = ids
        out["targets"][i, :length - 1] = ids[1:]
        out["segment_ids"][i, :length] = 1
        out["positions"][i, :length] = np.arange(length)
        out["loss_mask"][i, len(p) - 1:length - 1] = 1.0
    return out


class Rollouts:
    """The rollout hook: prompts -> a batch of scored completions with advantages and log-probabilities."""

    def __init__(self, cfg: Config, prompts: list[dict], prompt_ids: list[list[int]], tokenizer, rewards,
                 stop_ids: tuple[int, ...], process_index: int):
        self.cfg, self.prompts, self.prompt_ids, self.tokenizer = cfg, prompts, prompt_ids, tokenizer
        self.rewards, self.stop_ids, self.process_index = rewards, stop_ids, process_index
        self.stats: dict = {}

    def sample(self, params, indices: Sequence[int], seed: int, temperature: float, group: int):
        """(prompt ids, completion ids incl. a final stop id, completion texts) of `group` samples per prompt."""
        rl = self.cfg.rl
        prompts = [self.prompt_ids[i] for i in indices for _ in range(group)]
        sampling = SamplingParams(max_new_tokens=rl.max_new_tokens, temperature=temperature, top_p=rl.top_p,
                                  stop_ids=self.stop_ids, seed=seed)
        done = generate(params, self.cfg.model, prompts, sampling, tokenizer=self.tokenizer)
        completions = [c.tokens + ([c.stop_id] if c.stop_id is not None else []) for c in done]
        return prompts, completions, [c.text for c in done]

    def score(self, indices, group: int, texts: list[str], completions: list[list[int]]):
        records = [self.prompts[i] for i in indices for _ in range(group)]
        prompt_texts = [r["messages"][-1]["content"] for r in records]
        names = sorted({k for r in records for k in r["fields"]})
        fields = {k: [r["fields"].get(k) for r in records] for k in names}
        return self.rewards(prompt_texts, texts, completions, fields)

    def __call__(self, step: int, params, frozen, host: dict) -> dict:
        rl, g = self.cfg.rl, self.cfg.rl.group_size
        indices = [int(i) for i in host["prompt"]]
        seed = int(np.random.default_rng([self.cfg.train.seed, step, self.process_index]).integers(2 ** 31))
        t0 = time.perf_counter()
        prompts, completions, texts = self.sample(params, indices, seed, rl.temperature, g)
        sample_s = time.perf_counter() - t0
        total, each = self.score(indices, g, texts, completions)
        batch = rows_of(prompts, completions, self.cfg.data.seq_len)
        batch["advantage"] = group_advantages(total, g, rl.scale_rewards)
        device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
        batch["old_logp"] = np.asarray(_logprobs(params, device_batch, cfg=self.cfg.model))
        batch["ref_logp"] = np.asarray(_logprobs(steps.reference_params(frozen), device_batch, cfg=self.cfg.model))
        lengths = np.asarray([len(c) for c in completions])
        self.stats = {"rollout/reward_mean": float(total.mean()), "rollout/reward_std": float(total.std()),
                      "rollout/advantage_abs_mean": float(np.abs(batch["advantage"]).mean()),
                      "rollout/response_length": float(lengths.mean()),
                      "rollout/tokens_per_s": float(lengths.sum() / max(sample_s, 1e-9)),   # sampling only
                      **{f"rollout/reward_{k}_mean": float(v.mean()) for k, v in each.items()},
                      **{f"rollout/reward_{k}_std": float(v.std()) for k, v in each.items()}}
        return batch

    def layout(self) -> dict:
        """A batch of __call__'s layout (zeros): this process's rows."""
        n = self.cfg.train.batch_size // jax.process_count()
        batch = rows_of([[0]] * n, [[0]] * n, self.cfg.data.seq_len)
        batch.update(old_logp=np.zeros((n, self.cfg.data.seq_len), np.float32),
                     ref_logp=np.zeros((n, self.cfg.data.seq_len), np.float32), advantage=np.zeros((n,), np.float32))
        return batch


EVAL_SAMPLES = 2   # completions per held-out prompt at each evaluation


def evaluation(step: int, params, put_batch, workdir: str, *, rollouts: Rollouts, held: list[int]) -> dict:
    """Held-out prompts, EVAL_SAMPLES completions each sampled as in training with a fixed seed (the objective
    is the expected reward of the policy's samples, which a greedy completion does not measure): rewards logged,
    samples.jsonl appended, the reward curve (eval/rl_rewards.jsonl) drawn as plots/rl_reward_curve.png."""
    del put_batch
    if not held:
        return {}
    _, completions, texts = rollouts.sample(params, held, seed=0, temperature=rollouts.cfg.rl.temperature,
                                            group=EVAL_SAMPLES)
    total, each = rollouts.score(held, EVAL_SAMPLES, texts, completions)
    out = {"eval/reward": float(total.mean()), **{f"eval/reward_{k}": float(v.mean()) for k, v in each.items()}}
    if jax.process_index() == 0:
        root = Path(workdir)
        (root / "eval").mkdir(parents=True, exist_ok=True)
        with open(root / "eval" / "samples.jsonl", "a") as f:
            for i, text, r in zip([i for i in held for _ in range(EVAL_SAMPLES)], texts, total):
                f.write(json.dumps({"step": step, "prompt": rollouts.prompts[i]["messages"][-1]["content"],
                                    "completion": text, "reward": float(r)}, ensure_ascii=False) + "\n")
        with open(root / "eval" / "rl_rewards.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **out}) + "\n")
        plot_reward_curve(root / "eval" / "rl_rewards.jsonl", root / "plots" / "rl_reward_curve.png")
    return out


def plot_reward_curve(history: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in sorted({k for r in rows for k in r if k.startswith("eval/reward")}):
        ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], marker="o",
                label=key.removeprefix("eval/"))
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward of held-out prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def make_objective(cfg: Config, tokenizer, *, batch_size: int, process_index: int, process_count: int) -> Objective:
    """GRPO from init_from (the SFT model), which is also the frozen reference."""
    rl = cfg.rl
    if cfg.train.batch_size % (rl.group_size * process_count):
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) counts completions: it must be a multiple "
                          f"of rl.group_size ({rl.group_size}) x processes ({process_count})")
    if not cfg.data.train:
        raise ConfigError("objective 'rl' needs prompt files: --config.data.train=<prompts.jsonl>")
    records = load_prompts(cfg.data.train, on_error=cfg.data.on_error)
    train_records, held_records = ((records, load_prompts(cfg.data.eval, on_error=cfg.data.on_error))
                                   if cfg.data.eval else split_heldout(records, cfg.data.eval_fraction, cfg.train.seed))
    prompts = train_records + held_records
    template = run_template(cfg.data.template, cfg.init_from)
    budget = cfg.data.seq_len - rl.max_new_tokens
    if budget < 1:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) must exceed rl.max_new_tokens ({rl.max_new_tokens})")
    ids = [encode_prompt(p["messages"], template, tokenizer) for p in prompts]
    cut = sum(len(x) > budget for x in ids)
    if cut:
        logging.warning("%d of %d prompts are longer than data.seq_len - rl.max_new_tokens = %d tokens: cut from "
                        "the left", cut, len(ids), budget)
    ids = [x[-budget:] for x in ids]
    stop_ids, _ = stop_markers(template, tokenizer)
    rollouts = Rollouts(cfg, prompts, ids, tokenizer, RewardSources(cfg), stop_ids, process_index)
    reference_from_init = not cfg.lora.rank   # with LoRA the frozen base is the reference (the trainer's)
    frozen = {}
    if reference_from_init:
        from jaxllm import sharding
        from jaxllm.checkpoint import load_params_on_mesh
        reference, _, _ = load_params_on_mesh(cfg.init_from, sharding.make_mesh(cfg.mesh), cfg.mesh.rules)
        frozen = {"reference": {k: v for k, v in reference.items() if k != "reward_head"}}
    held = list(range(len(train_records), len(prompts)))[:rl.eval_prompts]
    return Objective(
        train_step=train_step, eval_step=eval_step,
        loss_settings=dict(model_cfg=cfg.model, beta=rl.beta, clip_low=rl.clip_low, clip_high=rl.clip_high,
                           aggregation=rl.aggregation, max_new_tokens=rl.max_new_tokens),
        specs=param_specs(cfg.model),
        train_batches=PromptBatches(len(train_records), cfg.train.batch_size // rl.group_size, cfg.train.seed,
                                    process_index, process_count),
        eval_batches=lambda: iter(()), report=lambda sums: {},
        frozen=frozen, rollout=rollouts, batch_layout=rollouts.layout,
        eval_hook=functools.partial(evaluation, rollouts=rollouts, held=held),
        data_stats=lambda: dict(rollouts.stats))
