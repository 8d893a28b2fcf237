"""GRPO: the loss and its pieces against hand-computed values, the k3 KL against the exact KL, a tiny policy
learning a rule reward with its KL bounded, and an exact resume mid-run."""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import Config, DataConfig, ModelConfig, OptimConfig, RewardConfig, RLConfig, TrainConfig
from jaxllm.metrics import read_metrics
from jaxllm.objectives.rl import group_advantages, k3_kl, policy_loss_sums, rows_of
from jaxllm.trainer import train
from test_post_training import base_checkpoint, review_pairs  # noqa: F401,F811 (module fixtures)

LOW_IDS = 64   # the rule below rewards completion tokens with ids under this (about 4% of the vocabulary)


def low_ids(prompts, completions, completion_ids, **fields):
    """A dense rule reward: the share of a completion's tokens whose id is < LOW_IDS."""
    return [float(np.mean([t < LOW_IDS for t in ids])) if ids else 0.0 for ids in completion_ids]


def test_group_advantages_by_hand():
    rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]         # two prompts, G = 4
    a = group_advantages(rewards, 4, scale=True)
    np.testing.assert_allclose(a[:4], np.array([1, -1, -1, 1]) * 0.5 / (0.5 + 1e-4), rtol=1e-6)   # mean 0.5, std 0.5
    np.testing.assert_allclose(a[4:], [0, 0, 0, 0])                # a group with equal rewards teaches nothing
    np.testing.assert_allclose(group_advantages(rewards, 4, scale=False)[:4], [0.5, -0.5, -0.5, 0.5])


def test_k3_is_an_unbiased_estimate_of_the_exact_kl_on_a_small_vocabulary():
    p = jax.nn.softmax(jnp.array([2.0, 0.5, -1.0, 0.0, 1.0]))
    q = jax.nn.softmax(jnp.array([1.0, 1.0, 0.0, -0.5, 0.3]))
    exact = float(jnp.sum(p * (jnp.log(p) - jnp.log(q))))
    expected_k3 = float(jnp.sum(p * k3_kl(jnp.log(p), jnp.log(q))))          # E_{x~p}[k3(x)]
    assert expected_k3 == pytest.approx(exact, rel=1e-5)
    samples = jax.random.categorical(jax.random.key(0), jnp.log(p), shape=(200_000,))
    mc = float(jnp.mean(k3_kl(jnp.log(p)[samples], jnp.log(q)[samples])))
    assert mc == pytest.approx(exact, rel=0.02)
    assert float(jnp.min(k3_kl(jnp.log(p), jnp.log(q)))) >= 0.0                 # never negative


def test_clipped_loss_and_aggregations_by_hand():
    # two completions: row 0 has 2 completion tokens, row 1 has 1; advantages +1 and -2
    logp = jnp.log(jnp.array([[0.5, 0.6, 1.0], [0.9, 1.0, 1.0]]))   # masked positions: any finite value
    old = jnp.log(jnp.array([[0.25, 0.6, 1.0], [0.5, 1.0, 1.0]]))     # ratios 2.0, 1.0 | 1.8
    ref = logp                                                         # k3 = 0 where the reference agrees
    batch = {"loss_mask": jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), "old_logp": old, "ref_logp": ref,
             "advantage": jnp.array([1.0, -2.0])}
    kw = dict(beta=0.1, clip_low=0.2, clip_high=0.28, max_new_tokens=4)
    entropy = jnp.zeros_like(logp)
    # per token: -min(r·A, clip(r)·A): row 0: -min(2, 1.28) = -1.28, -min(1, 1) = -1; row 1: -min(-3.6, -2.56) = 3.6
    tokens = [-1.28, -1.0, 3.6]
    loss, sums = policy_loss_sums(logp, entropy, batch, aggregation="token", **kw)
    assert float(loss / sums["count"]) == pytest.approx(sum(tokens) / 3, rel=1e-5)
    assert float(sums["clip_fraction"] / sums["count"]) == pytest.approx(2 / 3)   # ratios 2.0 and 1.8 clipped
    loss, sums = policy_loss_sums(logp, entropy, batch, aggregation="sequence", **kw)
    assert float(loss / sums["count"]) == pytest.approx(((-1.28 - 1.0) / 2 + 3.6) / 2, rel=1e-5)
    loss, sums = policy_loss_sums(logp, entropy, batch, aggregation="dr_grpo", **kw)
    assert float(loss / sums["count"]) == pytest.approx(sum(tokens) / 4 / 2, rel=1e-5)
    # the KL term: a reference that gives the sampled tokens half the probability adds beta·k3 per token
    batch["ref_logp"] = logp + math.log(0.5)
    k3 = 0.5 - math.log(0.5) - 1
    loss_kl, _ = policy_loss_sums(logp, entropy, batch, aggregation="token", **kw)
    assert float(loss_kl - policy_loss_sums(logp, entropy, dict(batch, ref_logp=ref), aggregation="token",
                                            **kw)[0]) == pytest.approx(3 * 0.1 * k3, rel=1e-5)


def test_rows_put_the_loss_on_completion_tokens_and_their_stop_id():
    rows = rows_of([[1, 5, 6]], [[7, 8, 2]], 8)
    assert rows["tokens"][0].tolist() == [1, 5, 6, 7, 8, 2, 0, 0]
    # positions 2..4 predict 7, 8 and the stop id 2
    assert rows["loss_mask"][0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert rows["targets"][0][2:5].tolist() == [7, 8, 2]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rl") / "prompts.jsonl"
    starts = ["下面是一条正面的评论：", "写一条评论：", "这个商品", "评价一下：", "质量", "物流", "价格", "服务"]
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": starts[i % len(starts)] + str(i)}, ensure_ascii=False) + "\n")
    return path


def rl_config(workdir, init_from, prompts, steps: int, **train_kw) -> Config:
    return Config(objective="rl", workdir=str(workdir), init_from=str(init_from), model=ModelConfig.preset("tiny"),
                  data=DataConfig(train=(str(prompts),), seq_len=48, eval_fraction=0.2, template="chat"),
                  optim=OptimConfig(lr=1e-2, warmup_steps=0, decay="constant", weight_decay=0.0),
                  train=TrainConfig(**{**dict(steps=steps, batch_size=32, log_every=1, eval_every=steps,
                                              eval_batches=0, save_every=0, async_checkpointing=False), **train_kw}),
                  rl=RLConfig(group_size=8, max_new_tokens=8, beta=0.2),
                  reward=RewardConfig(functions=("test_rl:low_ids",))).validate()


def test_a_tiny_policy_learns_a_rule_reward_with_a_bounded_kl(tmp_path, prompts_file, base_checkpoint):
    result = train(rl_config(tmp_path, base_checkpoint, prompts_file, steps=30, eval_at_start=True))
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    rewards = [r["rollout/reward_mean"] for r in rows if "rollout/reward_mean" in r]
    # random tiny policy: ~4% of tokens are rewarded; after 30 GRPO steps the sampled completions earn 7x that
    assert np.mean(rewards[:3]) < 0.1 and np.mean(rewards[-3:]) > 0.3, rewards
    kls = [r["train/kl"] for r in rows if "train/kl" in r]
    assert max(kls) < 2.0, kls                   # beta = 0.2 keeps the policy within 2 nats/token of its reference
    evals = [r for r in rows if "eval/reward" in r]
    assert evals[0]["step"] == 0 and evals[-1]["eval/reward"] > evals[0]["eval/reward"]
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 30} and all("completion" in s for s in samples)
    assert (tmp_path / "plots" / "rl_reward_curve.png").stat().st_size > 0
    assert result["step"] == 30


def test_rl_resumes_exactly_mid_run(tmp_path, prompts_file, base_checkpoint):
    straight = rl_config(tmp_path / "straight", base_checkpoint, prompts_file, steps=4)
    train(straight)
    half = rl_config(tmp_path / "resumed", base_checkpoint, prompts_file, steps=2, save_every=2)
    train(half)
    train(dataclasses.replace(half, train=dataclasses.replace(half.train, steps=4)))

    def losses(d):
        return [(r["train/loss"], r["rollout/reward_mean"]) for r in read_metrics(str(d / "metrics.jsonl"))
                if "train/loss" in r]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
