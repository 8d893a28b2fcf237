"""Reinforcement learning from rewards on the policy's own samples: GRPO (Shao et al. 2024), with the DAPO and
Dr. GRPO variants as options, and PPO (Schulman et al. 2017, as RLHF uses it) with a value head and GAE.

Each step (`Rollouts.__call__`, the trainer's rollout hook, before the train step):
  1. G completions of each prompt from the current parameters with the project's KV-cache generator (jitted,
     temperature / top-p, stop at the template's end marker or max_new_tokens) on the training mesh: the
     global batch is split over the mesh's batch axes (each device group samples its rows, in one or many
     processes) and row i of the global batch draws with the key (seed of the step, i), so a resumed run samples
     exactly what it would have, and 2 processes x 4 devices sample what 1 x 8 does.
  2. Rewards per completion from each source (rl_rewards.py): a jaxllm reward model (reward.model, scored in
     this process), Python functions (reward.functions, "module:function") and an OpenAI-compatible judge
     (reward.judge_url); combined with reward.weights, each logged. Each process scores its share of the rows
     (the judge is asked once per completion); the scores are gathered to every process.
  3. Per-token log-probabilities of the sampled tokens under the rollout parameters ("old", before the update)
     and the reference (init_from, or with LoRA the frozen base: steps.reference_params), from one forward pass
     each with the training forward's numerics; PPO also records the value head's predictions. Steps 3 and 4
     see the whole global batch on every process (PPO whitens over all of it); each process then hands the
     trainer its own rows.
  4. Advantages, per completion token. GRPO: the completion's reward normalised within its prompt's group,
     (r - mean) / std (rl.scale_rewards=False: r - mean). PPO: GAE (rl.gamma, rl.lam) over per-token rewards
     (the score at the last token, -beta·(old_logp - ref_logp) at every token), whitened over the batch.
The loss (`rl_loss`) per completion token t:
    -min(ratio·A, clip(ratio, 1 - clip_low, 1 + clip_high)·A) + beta · k3,    ratio = exp(logp - old_logp),
    k3 = exp(ref - logp) - (ref - logp) - 1  (Schulman's unbiased, always >= 0 estimate of KL(policy || ref)),
aggregated per rl.aggregation (token / sequence / dr_grpo). PPO has its KL in the reward instead (beta = 0
here) and adds value_coef x the clipped value loss. A train step makes rl.epochs passes over the rollout batch
in rl.minibatches slices (`multi_pass_train_step`, each update the shared steps.train_step); with one update
the ratio is 1 in value and the clip only matters through its gradient, as in GRPO's usual single-pass setting.
"""
from __future__ import annotations

import functools
import json
import logging
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import distributed, sharding, steps, storage
from jaxllm.config import Config, ConfigError, ModelConfig
from jaxllm.data import split_heldout
from jaxllm.data.formats import load_prompts
from jaxllm.data.templates import encode_prompt, run_template, stop_markers
from jaxllm.model.generate import SamplingParams, generate
from jaxllm.model.heads import reward_model_specs
from jaxllm.model.spec import forward_flops_per_token, generation_flops, init_from_specs, param_specs
from jaxllm.model.transformer import hidden_states, logits_from_hidden
from jaxllm.objectives import Objective
from jaxllm.objectives.rl_rewards import RewardSources

HEADS = ("reward_head", "value_head")   # entries of a checkpoint that are not the language model

# ----------------------------------------------------------------------------------------------------
# The loss.

def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token estimate of KL(policy || reference) from the sampled token's log-probabilities."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float):
    """Generalised advantage estimation over each row's completion positions (mask, contiguous per row), all
    (rows, length): delta_t = r_t + gamma·V_{t+1} - V_t (V after the last token = 0),
    A_t = delta_t + gamma·lam·A_{t+1}. Returns (advantages, returns = A + V), zero off the mask."""
    rows, length = mask.shape
    advantages = np.zeros((rows, length), np.float64)
    next_value, running = np.zeros(rows), np.zeros(rows)
    for t in reversed(range(length)):
        on = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = np.where(on, delta + gamma * lam * running, 0.0)
        next_value = np.where(on, values[:, t], 0.0)
        advantages[:, t] = running
    return advantages.astype(np.float32), ((advantages + values) * mask).astype(np.float32)


def ppo_rewards(scores: np.ndarray, old_logp: np.ndarray, ref_logp: np.ndarray, mask: np.ndarray,
                beta: float) -> np.ndarray:
    """Per-token rewards of PPO from RLHF (Ziegler et al. 2019): -beta·(old_logp - ref_logp) at every
    completion token (the KL penalty), plus each completion's score at its last token. (rows, length)."""
    rewards = -beta * (old_logp - ref_logp) * mask
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)              # (rows,) last completion position
    rewards[np.arange(len(scores)), last] += scores
    return rewards


def whiten(x: np.ndarray, mask: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """x normalised to mean 0, std 1 over the masked entries; zero off the mask."""
    on = mask > 0
    return np.where(on, (x - x[on].mean()) / (x[on].std() + eps), 0.0).astype(np.float32)


def group_advantages(rewards: np.ndarray, group_size: int, scale: bool = True, eps: float = 1e-4) -> np.ndarray:
    """(rows,) rewards of consecutive groups of `group_size` completions of one prompt -> advantages."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)                  # (prompts, G)
    a = r - r.mean(axis=1, keepdims=True)
    if scale:
        a = a / (r.std(axis=1, keepdims=True) + eps)
    return a.reshape(-1).astype(np.float32)


def policy_outputs(params, batch: dict, cfg: ModelConfig, with_values: bool = False):
    """(log p(target), the policy's entropy, the value head's prediction or None) at every position, each
    (rows, length) float32, from one forward pass."""
    h = hidden_states(params, batch["tokens"], cfg, batch["segment_ids"], batch["positions"])  # (rows, length, embed)
    logp_all = jax.nn.log_softmax(logits_from_hidden(params, h, cfg), axis=-1)       # (rows, length, vocab)
    logp = jnp.take_along_axis(logp_all, batch["targets"][..., None], axis=-1)[..., 0]   # (rows, length)
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    if not with_values:
        return logp, entropy, None
    head = params["value_head"]
    values = jnp.einsum("rld,d->rl", h.astype(jnp.float32), head["kernel"].astype(jnp.float32))   # (rows, length)
    return logp, entropy, values + head["bias"].astype(jnp.float32)


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
    from the policy's log-probabilities of the sampled tokens (rows, length) and per-token advantages
    batch["advantage"] (rows, length): (loss sum, sums incl. count)."""
    mask = batch["loss_mask"]
    ratio = jnp.exp(logp - batch["old_logp"])
    advantage = batch["advantage"]
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = -jnp.minimum(ratio * advantage, clipped * advantage)
    kl = k3_kl(logp, batch["ref_logp"])
    loss, count = _aggregate(pg + beta * kl, mask, aggregation, max_new_tokens)
    mean = lambda x: _aggregate(x, mask, aggregation, max_new_tokens)[0]  # noqa: E731  (same weighting)
    sums = {"loss": loss, "count": count, "kl": mean(kl), "entropy": mean(entropy),
            "clip_fraction": mean((jnp.abs(ratio - clipped) > 0).astype(jnp.float32))}
    return loss, sums


def value_loss_sums(values, batch: dict, *, value_clip: float, aggregation: str,
                    max_new_tokens: int) -> tuple[jax.Array, dict]:
    """PPO's clipped value loss 0.5·max((V - R)², (V_old + clip(V - V_old, ±value_clip) - R)²) over the
    completion tokens, weighted as the policy loss is: (loss sum, sums)."""
    mask, old, returns = batch["loss_mask"], batch["old_values"], batch["returns"]
    clipped = old + jnp.clip(values - old, -value_clip, value_clip)
    per_token = 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(clipped - returns))
    mean = lambda x: _aggregate(x, mask, aggregation, max_new_tokens)[0]  # noqa: E731
    loss = mean(per_token)
    return loss, {"value_loss": loss, "value_clip_fraction": mean((values != clipped).astype(jnp.float32))}


def rl_loss(params, batch, frozen=None, *, model_cfg: ModelConfig, value_coef: float = 0.0,
            value_clip: float = 0.2, **settings):
    """policy_loss_sums of the policy `params` on a rollout batch (settings: beta, clip_low, clip_high,
    aggregation, max_new_tokens); with value_coef > 0 (PPO) plus value_coef x its value head's loss."""
    logp, entropy, values = policy_outputs(params, batch, model_cfg, with_values=value_coef > 0)
    loss, sums = policy_loss_sums(logp, entropy, batch, **settings)
    if value_coef > 0:
        v_loss, v_sums = value_loss_sums(values, batch, value_clip=value_clip, aggregation=settings["aggregation"],
                                         max_new_tokens=settings["max_new_tokens"])
        loss = loss + value_coef * v_loss
        sums.update(v_sums, loss=loss)
    return loss, sums


def multi_pass_train_step(state: dict, batch: dict, frozen=None, *, loss_fn, epochs: int = 1, minibatches: int = 1,
                          **step_settings):
    """`epochs` passes over one batch of rollouts, each pass one `steps.train_step` per consecutive slice
    (`minibatches` of them): epochs x minibatches optimizer updates, the ratio always against the rollout's
    old_logp. Metrics are the mean over the updates; state["step"] counts train steps (rollout batches), the
    optimizer's own count the updates."""
    update = functools.partial(steps.train_step, loss_fn=loss_fn, **step_settings)
    if epochs * minibatches == 1:
        return update(state, batch, frozen)
    # (rows, ...) -> (minibatches, rows / minibatches, ...)
    slices = jax.tree.map(lambda x: x.reshape(minibatches, x.shape[0] // minibatches, *x.shape[1:]), batch)

    def one_pass(st, _):
        return jax.lax.scan(lambda s, mb: update(s, mb, frozen), st, slices)

    new, metrics = jax.lax.scan(one_pass, state, None, length=epochs)           # metrics (epochs, minibatches)
    return {**new, "step": state["step"] + 1}, jax.tree.map(jnp.mean, metrics)


def _eval_step(params, batch, frozen=None, *, epochs=1, minibatches=1, **settings):   # passes: training only
    return steps.eval_step(params, batch, frozen, loss_fn=rl_loss, **settings)


train_step = functools.partial(multi_pass_train_step, loss_fn=rl_loss)
eval_step = _eval_step


# ----------------------------------------------------------------------------------------------------
# Prompts and rollouts.

class PromptBatches:
    """Checkpointable iterator over the global batches of prompts (the same on every process: the rollout splits
    the rows over the mesh), a fresh permutation per epoch from the seed; yields {"prompt": (prompts,) indices
    into the prompt list}."""

    def __init__(self, count: int, per_step: int, seed: int):
        self.count, self.per_step, self.seed = count, per_step, seed
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
        return {"prompt": np.asarray(picked, np.int32)}

    def get_state(self) -> dict:
        return dict(self.state)

    def set_state(self, state: dict) -> None:
        self.state = {"epoch": int(state["epoch"]), "position": int(state["position"])}


@functools.partial(jax.jit, static_argnames=("cfg", "with_values"))
def _logprobs_values(params, batch, cfg, with_values):
    logp, _, values = policy_outputs(params, batch, cfg, with_values)   # the entropy is not computed (unused)
    return logp, values


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


def rollout_flops(cfg: ModelConfig, prompt_lens: Sequence[int], completion_lens: Sequence[int], seq_len: int) -> float:
    """Model FLOPs of one rollout batch (PaLM's accounting, as the train step's): sampling each completion with
    the KV cache after its prompt, and the two forward passes (the rollout policy's log-probabilities, with PPO's
    values, and the reference's) over the rows padded to seq_len. A reward model's scoring is not counted."""
    sampling = sum(generation_flops(cfg, p, n) for p, n in zip(prompt_lens, completion_lens))
    return sampling + 2 * len(prompt_lens) * seq_len * forward_flops_per_token(cfg, seq_len)


class Rollouts:
    """The rollout hook: prompts -> a batch of scored completions with advantages and log-probabilities."""

    def __init__(self, cfg: Config, prompts: list[dict], prompt_ids: list[list[int]], tokenizer, rewards,
                 stop_ids: tuple[int, ...], mesh):
        self.cfg, self.prompts, self.prompt_ids, self.tokenizer = cfg, prompts, prompt_ids, tokenizer
        self.rewards, self.stop_ids, self.mesh = rewards, stop_ids, mesh
        self.place = functools.partial(sharding.put_batch, mesh, cfg.mesh.rules)   # whole host batch -> global
        self.stats: dict = {}
        self.work = (0.0, 0.0)   # cumulative (model FLOPs, seconds) of the rollouts: Objective.side_work

    def sample(self, params, indices: Sequence[int], seed: int, temperature: float, group: int):
        """(prompt ids, completion ids incl. a final stop id, completion texts) of `group` samples per prompt, the
        whole batch on every process (indices: the same on every process)."""
        rl = self.cfg.rl
        prompts = [self.prompt_ids[i] for i in indices for _ in range(group)]
        sampling = SamplingParams(max_new_tokens=rl.max_new_tokens, temperature=temperature, top_p=rl.top_p,
                                  stop_ids=self.stop_ids, seed=seed)
        done = generate(params, self.cfg.model, prompts, sampling, tokenizer=self.tokenizer, place=self.place)
        completions = [c.tokens + ([c.stop_id] if c.stop_id is not None else []) for c in done]
        return prompts, completions, [c.text for c in done]

    def score(self, indices, group: int, texts: list[str], completions: list[list[int]]):
        """(total, each source's) rewards of every row, on every process: each process scores an equal share."""
        records = [self.prompts[i] for i in indices for _ in range(group)]
        n, nproc = len(records), jax.process_count()
        share = -(-n // nproc)
        mine = slice(min(n, jax.process_index() * share), min(n, (jax.process_index() + 1) * share))
        records, texts, completions = records[mine], texts[mine], completions[mine]
        if records:
            names = sorted({k for r in records for k in r["fields"]})
            fields = {k: [r["fields"].get(k) for r in records] for k in names}
            total, each = self.rewards([r["messages"][-1]["content"] for r in records], texts, completions, fields)
        else:   # more processes than rows: nothing to score here
            total, each = np.zeros(0, np.float32), {k: np.zeros(0, np.float32) for k in self.rewards.sources}
        gather = lambda x: distributed.gather_rows(np.pad(x, (0, share - len(x))))[:n]  # noqa: E731  (equal shapes)
        if nproc == 1:
            return total, each
        # every process's share, in process order: rows [0, share), [share, 2·share), ...
        return gather(total), {k: gather(v) for k, v in each.items()}

    def __call__(self, step: int, params, frozen, host: dict) -> dict:
        rl, g = self.cfg.rl, self.cfg.rl.group_size
        indices = [int(i) for i in host["prompt"]]   # the global batch's prompts, the same on every process
        seed = int(np.random.default_rng([self.cfg.train.seed, step]).integers(2 ** 31))
        jax.block_until_ready(params)   # the previous update's tail belongs to the train step's time, not to ours
        t0 = time.perf_counter()
        prompts, completions, texts = self.sample(params, indices, seed, rl.temperature, g)
        sample_s = time.perf_counter() - t0
        total, each = self.score(indices, g, texts, completions)
        batch = rows_of(prompts, completions, self.cfg.data.seq_len)
        ppo = rl.algorithm == "ppo"
        device_batch = {k: self.place(v) for k, v in batch.items()}   # split over the mesh like the train batch
        old_logp, old_values = _logprobs_values(params, device_batch, cfg=self.cfg.model, with_values=ppo)
        # The reference: init_from, or with LoRA the frozen base (steps.reference_params).
        ref_logp, _ = _logprobs_values(steps.reference_params(frozen), device_batch, cfg=self.cfg.model,
                                       with_values=False)
        batch["old_logp"], batch["ref_logp"] = distributed.to_host(old_logp), distributed.to_host(ref_logp)
        mask = batch["loss_mask"]
        if ppo:   # per-token rewards, GAE from the value head, advantages whitened over the batch's tokens
            rewards = ppo_rewards(total, batch["old_logp"], batch["ref_logp"], mask, rl.beta)
            batch["old_values"] = distributed.to_host(old_values) * mask
            advantages, batch["returns"] = gae(rewards, batch["old_values"], mask, rl.gamma, rl.lam)
            batch["advantage"] = whiten(advantages, mask)
        else:     # one advantage per completion, normalised within its prompt's group, on each of its tokens
            batch["advantage"] = group_advantages(total, g, rl.scale_rewards)[:, None] * mask   # (rows, length)
        on = mask > 0
        lengths = np.asarray([len(c) for c in completions])
        raw = advantages[on] if ppo else batch["advantage"][on]
        seconds = time.perf_counter() - t0
        self.work = (self.work[0] + rollout_flops(self.cfg.model, [len(p) for p in prompts], lengths,
                                                  self.cfg.data.seq_len), self.work[1] + seconds)
        self.stats = {"rollout/reward_mean": float(total.mean()), "rollout/reward_std": float(total.std()),
                      "rollout/advantage_mean": float(raw.mean()), "rollout/advantage_std": float(raw.std()),
                      "rollout/advantage_abs_mean": float(np.abs(batch["advantage"][on]).mean()),
                      "rollout/response_length": float(lengths.mean()),
                      "rollout/tokens_per_s": float(lengths.sum() / max(sample_s, 1e-9)),   # sampling only
                      # sampling, scoring and the old / reference log-probabilities: the step's rollout part
                      "rollout/seconds": seconds,
                      **{f"rollout/reward_{k}_mean": float(v.mean()) for k, v in each.items()},
                      **{f"rollout/reward_{k}_std": float(v.std()) for k, v in each.items()}}
        if ppo:
            self.stats.update({"rollout/value_mean": float(batch["old_values"][on].mean()),
                               "rollout/return_mean": float(batch["returns"][on].mean())})
        own = sharding.process_rows(self.mesh, self.cfg.mesh.rules, len(prompts))   # this process's rows
        return {k: v[own] for k, v in batch.items()}

    def layout(self) -> dict:
        """A batch of __call__'s layout (zeros): this process's rows."""
        n, length = self.cfg.train.batch_size // jax.process_count(), self.cfg.data.seq_len
        batch = rows_of([[0]] * n, [[0]] * n, length)
        per_token = ("old_logp", "ref_logp", "advantage") + (("old_values", "returns")
                                                             if self.cfg.rl.algorithm == "ppo" else ())
        batch.update({k: np.zeros((n, length), np.float32) for k in per_token})
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
        root = storage.as_path(workdir)
        storage.append_text(root / "eval" / "samples.jsonl", "".join(
            json.dumps({"step": step, "prompt": rollouts.prompts[i]["messages"][-1]["content"], "completion": text,
                        "reward": float(r)}, ensure_ascii=False) + "\n"
            for i, text, r in zip([i for i in held for _ in range(EVAL_SAMPLES)], texts, total)))
        storage.append_text(root / "eval" / "rl_rewards.jsonl", json.dumps({"step": step, **out}) + "\n")
        plot_reward_curve(root / "eval" / "rl_rewards.jsonl", root / "plots" / "rl_reward_curve.png")
    return out


def plot_reward_curve(history, out) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from jaxllm.metrics import save_figure
    rows = [json.loads(line) for line in storage.as_path(history).read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in sorted({k for r in rows for k in r if k.startswith("eval/reward")}):
        ax.plot([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r], marker="o",
                label=key.removeprefix("eval/"))
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward of held-out prompts")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out, dpi=100)
    plt.close(fig)


def make_objective(cfg: Config, tokenizer, *, batch_size: int, process_index: int, process_count: int) -> Objective:
    """GRPO from init_from (the SFT model), which is also the frozen reference."""
    rl = cfg.rl
    if cfg.train.batch_size % (rl.group_size * process_count):
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) counts completions: it must be a multiple "
                          f"of rl.group_size ({rl.group_size}) x processes ({process_count})")
    rows = cfg.train.batch_size // process_count
    if rows % rl.minibatches or (rows // rl.minibatches) % cfg.optim.grad_accum_steps:
        raise ConfigError(f"rl.minibatches ({rl.minibatches}) must divide each process's {rows} rows of "
                          f"train.batch_size into slices that optim.grad_accum_steps ({cfg.optim.grad_accum_steps}) "
                          f"divides")
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
    mesh = sharding.make_mesh(cfg.mesh)     # the run's mesh (the same devices in the same order as the trainer's)
    rollouts = Rollouts(cfg, prompts, ids, tokenizer, RewardSources(cfg), stop_ids, mesh)
    # THE REFERENCE (one place): the init_from model; with LoRA the trainer's frozen base, read without adapters
    # (steps.reference_params), so the weights are not held twice.
    frozen = {}
    if not cfg.lora.rank:
        from jaxllm.weights import load_params_on_mesh
        reference, _, _ = load_params_on_mesh(cfg.init_from, mesh, cfg.mesh.rules)
        frozen = {"reference": {k: v for k, v in reference.items() if k not in HEADS}}
    held = list(range(len(train_records), len(prompts)))[:rl.eval_prompts]
    ppo = rl.algorithm == "ppo"
    specs = param_specs(cfg.model)
    if ppo:   # a scalar value head on the policy's hidden states, shaped like a reward model's head
        specs["value_head"] = reward_model_specs(cfg.model)["reward_head"]

    def extend(params, key):   # init_from's decoder (a reward head dropped) and, for PPO, a fresh value head
        params = {k: v for k, v in params.items() if k in specs}
        if ppo and "value_head" not in params:
            params["value_head"] = init_from_specs({"value_head": specs["value_head"]}, key)["value_head"]
        return params

    return Objective(
        train_step=train_step, eval_step=eval_step,
        loss_settings=dict(model_cfg=cfg.model, beta=0.0 if ppo else rl.beta, clip_low=rl.clip_low,
                           clip_high=rl.clip_high, aggregation=rl.aggregation, max_new_tokens=rl.max_new_tokens,
                           value_coef=rl.value_coef if ppo else 0.0, value_clip=rl.value_clip,
                           epochs=rl.epochs, minibatches=rl.minibatches),
        specs=specs, extend_params=extend, updates_per_step=rl.epochs * rl.minibatches, passes_per_step=rl.epochs,
        side_work=lambda: rollouts.work,
        train_batches=PromptBatches(len(train_records), cfg.train.batch_size // rl.group_size, cfg.train.seed),
        eval_batches=lambda: iter(()), report=lambda sums: {},
        frozen=frozen, rollout=rollouts, batch_layout=rollouts.layout,
        eval_hook=functools.partial(evaluation, rollouts=rollouts, held=held),
        data_stats=lambda: dict(rollouts.stats))
