"""GRPO and PPO: the losses and their pieces (group advantages, GAE, per-token rewards, the clipped value loss)
against hand-computed values, the k3 KL against the exact KL, several passes per rollout batch against
sequential updates, tiny policies learning a rule reward with their KL bounded, and an exact resume mid-run."""
from __future__ import annotations

import dataclasses
import http.server
import json
import math
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import Config, DataConfig, ModelConfig, OptimConfig, RewardConfig, RLConfig, TrainConfig
from jaxllm.metrics import interval_throughput, read_metrics
from jaxllm.objectives.rl_rewards import RewardSources, parse_rating
from jaxllm.objectives.rl import (gae, group_advantages, k3_kl, multi_pass_train_step, policy_loss_sums,
                                  ppo_rewards, rl_loss, rollout_flops, rows_of, value_loss_sums, whiten)
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
             "advantage": jnp.array([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])}
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


def test_gae_by_hand_and_monte_carlo_returns_at_lambda_one():
    mask = np.array([[0, 1, 1, 1, 0]], np.float32)         # completion predicted at positions 1..3
    rewards = np.array([[0.0, 0.1, -0.2, 1.0, 0.0]])
    values = np.array([[9.0, 0.5, 0.4, 0.3, 9.0]])          # off the mask: never read
    adv, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=3: 1.0 + 0 - 0.3 = 0.7;  t=2: -0.2 + 0.9·0.3 - 0.4 + 0.72·0.7 = 0.174;  t=1: 0.1 + 0.9·0.4 - 0.5 + 0.72·0.174
    np.testing.assert_allclose(adv[0], [0, 0.08528, 0.174, 0.7, 0], atol=1e-6)
    np.testing.assert_allclose(returns[0], [0, 0.58528, 0.574, 1.0, 0], atol=1e-6)
    _, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)   # returns = the rewards still to come
    np.testing.assert_allclose(returns[0], [0, 0.9, 0.8, 1.0, 0], atol=1e-6)


def test_ppo_rewards_put_the_score_on_the_last_token_and_the_kl_penalty_on_each():
    mask = np.array([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], np.float32)
    old = np.array([[0.0, -1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, 0.0, 0.0, 0.0]])
    ref = np.array([[0.0, -1.5, -1.0, -0.7, 0.0], [-1.0, -3.0, 0.0, 0.0, 0.0]])
    r = ppo_rewards(np.array([2.0, -1.0]), old, ref, mask, beta=0.1)
    np.testing.assert_allclose(r, [[0, -0.05, 0.1, -0.02 + 2.0, 0], [0, -0.2 - 1.0, 0, 0, 0]], atol=1e-6)
    w = whiten(np.array([[5.0, 1.0, 2.0, 3.0]]), np.array([[0, 1, 1, 1]], np.float32))
    np.testing.assert_allclose(w, [[0, -math.sqrt(1.5), 0, math.sqrt(1.5)]], atol=1e-6)   # std of 1,2,3: sqrt(2/3)


def test_clipped_value_loss_by_hand():
    batch = {"loss_mask": jnp.array([[1.0, 1.0, 0.0]]), "old_values": jnp.array([[0.5, 0.1, 0.0]]),
             "returns": jnp.array([[2.0, -1.0, 0.0]])}
    values = jnp.array([[1.0, 0.0, 7.0]])
    # token 0: max((1 - 2)², (0.5 + 0.2 - 2)²) = 1.69; token 1: max(1, (0.1 - 0.1 + 1)²) = 1; halves, mean of 2
    loss, sums = value_loss_sums(values, batch, value_clip=0.2, aggregation="token", max_new_tokens=3)
    assert float(loss) / 2 == pytest.approx((0.845 + 0.5) / 2, rel=1e-6)
    assert float(sums["value_clip_fraction"]) / 2 == pytest.approx(0.5)   # token 0's prediction was clipped


def tiny_rollout_batch(rows: int = 8, length: int = 12, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    batch = rows_of([list(rng.integers(3, 200, 4)) for _ in range(rows)],
                    [list(rng.integers(3, 200, 1 + i % 5)) for i in range(rows)], length)
    shape = (rows, length)
    batch.update(old_logp=rng.normal(-5.0, 0.3, shape).astype(np.float32),
                 ref_logp=rng.normal(-5.0, 0.3, shape).astype(np.float32),
                 advantage=rng.normal(size=shape).astype(np.float32) * batch["loss_mask"],
                 old_values=rng.normal(size=shape).astype(np.float32), returns=rng.normal(size=shape).astype(np.float32))
    return {k: jnp.asarray(v) for k, v in batch.items()}


def test_several_passes_equal_sequential_updates_on_the_slices():
    """epochs=2 x minibatches=2 is four shared train steps on rows [0:4], [4:8], [0:4], [4:8], all against the
    rollout's old_logp; the state's step counts one (rollout) step."""
    import optax
    from jaxllm.model.spec import init_from_specs, param_specs
    from jaxllm.model.heads import reward_model_specs
    from jaxllm.steps import init_train_state, train_step
    cfg = ModelConfig(vocab_size=256, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
    specs = {**param_specs(cfg), "value_head": reward_model_specs(cfg)["reward_head"]}
    tx = optax.adam(1e-3)
    state = jax.jit(lambda k: init_train_state(init_from_specs(specs, k), tx))(jax.random.key(0))
    batch = tiny_rollout_batch()
    settings = dict(model_cfg=cfg, beta=0.1, clip_low=0.2, clip_high=0.2, aggregation="token", max_new_tokens=5,
                    value_coef=0.5, value_clip=0.2, tx=tx)
    passes, metrics = jax.jit(lambda s, b: multi_pass_train_step(s, b, loss_fn=rl_loss, epochs=2, minibatches=2,
                                                                 **settings))(state, batch)
    one = jax.jit(lambda s, b: train_step(s, b, loss_fn=rl_loss, **settings))
    expected, losses = state, []
    for rows in (slice(0, 4), slice(4, 8)) * 2:
        expected, m = one(expected, {k: v[rows] for k, v in batch.items()})
        losses.append(float(m["loss"]))
    assert int(passes["step"]) == 1 and int(expected["step"]) == 4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), passes["params"],
                 expected["params"])
    assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-4)


def test_rows_put_the_loss_on_completion_tokens_and_their_stop_id():
    rows = rows_of([[1, 5, 6]], [[7, 8, 2]], 8)
    assert rows["tokens"][0].tolist() == [1, 5, 6, 7, 8, 2, 0, 0]
    # positions 2..4 predict 7, 8 and the stop id 2
    assert rows["loss_mask"][0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert rows["targets"][0][2:5].tolist() == [7, 8, 2]


def test_rollout_flops_by_hand():
    cfg = ModelConfig(vocab_size=256, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
    D, H, K, Dh, F, V, L = 16, 2, 1, 8, 32, 256, 2
    # matmul parameters: per layer q, k, v, o, gate, up, down (norms are not matmuls but PaLM's N counts every
    # parameter but the embedding lookup: 2 norms per layer, the final norm, the head)
    n = L * (D * H * Dh + 2 * D * K * Dh + H * Dh * D + 3 * D * F + 2 * D) + D + D * V
    attn = 4 * L * H * Dh                        # per token per attended position
    # a 3-token prompt and a 2-token completion: 4 tokens go through the model, attending over 1, 2, 3, 4 positions;
    # a 5-token prompt and a 1-token completion: 5 tokens, over 1..5. Then 2 forward passes over 2 rows x 12.
    sampling = 4 * 2 * n + attn * (1 + 2 + 3 + 4) + 5 * 2 * n + attn * (1 + 2 + 3 + 4 + 5)
    passes = 2 * 2 * 12 * (2 * n + attn * 12)
    assert rollout_flops(cfg, [3, 5], [2, 1], seq_len=12) == pytest.approx(sampling + passes, rel=1e-12)


def test_step_throughput_counts_every_pass_and_the_rollout_by_hand():
    # 2 steps of 2 passes over 100 tokens in 3 s, 1 s of it rollouts worth 500 FLOPs; 10 FLOPs per train token
    t = interval_throughput(steps=2, batch_tokens=100, passes=2, flops_per_token=10.0, side_flops=500.0,
                            side_seconds=1.0, elapsed=3.0, num_devices=2, peak_tflops=1e-12)   # 1 FLOP/s a device
    assert t["tokens_per_s"] == pytest.approx(400 / 2)     # train tokens over the train step's 2 s
    assert t["mfu"] == pytest.approx((400 * 10 + 500) / 3 / 2)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rl") / "prompts.jsonl"
    starts = ["下面是一条正面的评论：", "写一条评论：", "这个商品", "评价一下：", "质量", "物流", "价格", "服务"]
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": starts[i % len(starts)] + str(i)}, ensure_ascii=False) + "\n")
    return path


def rl_config(workdir, init_from, prompts, steps: int, rl: dict | None = None, weights: tuple = (),
              **train_kw) -> Config:
    return Config(objective="rl", workdir=str(workdir), init_from=str(init_from), model=ModelConfig.preset("tiny"),
                  data=DataConfig(train=(str(prompts),), seq_len=48, eval_fraction=0.2, template="chat"),
                  optim=OptimConfig(lr=1e-2, warmup_steps=0, decay="constant", weight_decay=0.0),
                  train=TrainConfig(**{**dict(steps=steps, batch_size=32, log_every=1, eval_every=steps,
                                              eval_batches=0, save_every=0, async_checkpointing=False), **train_kw}),
                  rl=RLConfig(**{**dict(group_size=8, max_new_tokens=8, beta=0.2), **(rl or {})}),
                  reward=RewardConfig(functions=("test_rl:low_ids",), weights=weights)).validate()


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


def test_ppo_with_a_value_head_learns_the_rule_reward_with_a_bounded_kl(tmp_path, prompts_file, base_checkpoint):
    """PPO, 2 passes x 2 minibatches per rollout batch, the rule's score x 4 (a score of 0 or 1/8 per completion
    would drown in the per-token KL penalty): the sampled reward passes 0.3 (random: ~0.05) within 16 steps,
    the KL to the reference below 2 nats/token until then. (Measured: step 11, KL <= 1.03; left to run, this
    large learning rate collapses the policy onto the rule, KL ~6: the bound is asserted up to the crossing.)"""
    ppo = dict(algorithm="ppo", group_size=1, beta=0.1, epochs=2, minibatches=2)
    train(rl_config(tmp_path, base_checkpoint, prompts_file, steps=16, rl=ppo, weights=(4.0,)))
    rows = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "rollout/reward_mean" in r]
    rule = [r["rollout/reward_low_ids_mean"] for r in rows]
    assert np.mean(rule[:3]) < 0.1, rule
    crossing = next((i for i, x in enumerate(rule) if x > 0.3), None)
    assert crossing is not None, rule
    kls = [r["train/kl"] for r in rows[:crossing + 1]]
    assert max(kls) < 2.0, kls
    assert all(r["train/value_loss"] > 0 for r in rows) and "rollout/return_mean" in rows[0]


def test_rl_resumes_exactly_mid_run(tmp_path, prompts_file, base_checkpoint):
    """PPO with 2 x 2 updates per step and a warmup over 6 updates: the resumed run's value head, optimizer count
    and rollouts continue exactly (GRPO's rollouts take the same road)."""
    ppo = dict(algorithm="ppo", group_size=2, epochs=2, minibatches=2)

    def config(workdir, steps, **kw):
        c = rl_config(workdir, base_checkpoint, prompts_file, steps=steps, rl=ppo, **kw)
        return dataclasses.replace(c, optim=dataclasses.replace(c.optim, warmup_steps=6))
    train(config(tmp_path / "straight", 4))
    half = config(tmp_path / "resumed", 2, save_every=2)
    train(half)
    train(dataclasses.replace(half, train=dataclasses.replace(half.train, steps=4)))

    def losses(d):
        return [(r["train/loss"], r["train/value_loss"], r["rollout/reward_mean"], r["lr"])
                for r in read_metrics(str(d / "metrics.jsonl")) if "train/loss" in r]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    # tokens/s counts both passes over the 32 x 48 rows, over the step's time less its rollout
    for r in [r for r in read_metrics(str(tmp_path / "straight" / "metrics.jsonl")) if "tokens_per_s" in r]:
        assert r["tokens_per_s"] * (r["step_seconds"] - r["rollout/seconds"]) == pytest.approx(2 * 32 * 48, rel=1e-3)
    # the logged lr is the schedule's at each step's last update: update 3 of a 6-update warmup, then the peak
    assert [x[3] for x in losses(tmp_path / "straight")] == pytest.approx([1e-2 * 3 / 6, 1e-2, 1e-2, 1e-2])


class _Judge(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint standing in for a judge model: 9 for an answer with 好, "2/10" for
    one without, no rating for an empty one."""
    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Judge.requests.append(body)
        answer = body["messages"][-1]["content"].split("[Answer]\n", 1)[1]
        reply = "9" if "好" in answer else "Rating: 2/10" if answer else "I cannot rate this."
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply},
                                        "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_judge_endpoint_and_functions_combine_with_weights_each_reported():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = Config(reward=RewardConfig(functions=("test_rl:low_ids",), weights=(2.0, 0.5),
                                         judge_url=f"http://127.0.0.1:{server.server_port}/v1", judge_model="j"))
        cfg.reward.validate()
        total, each = RewardSources(cfg)(["问", "问", "问"], ["很好", "一般", ""], [[5, 70], [70], []], {})
    finally:
        server.shutdown()
    np.testing.assert_allclose(each["judge"], [0.9, 0.2, 0.0])          # the empty answer's reply has no rating
    np.testing.assert_allclose(each["low_ids"], [0.5, 0.0, 0.0])
    np.testing.assert_allclose(total, 2.0 * each["low_ids"] + 0.5 * each["judge"])
    assert {r["model"] for r in _Judge.requests} == {"j"} and all(r["temperature"] == 0 for r in _Judge.requests)
    assert parse_rating("8/10") == 8 and parse_rating("Rating: 7.5") == 7.5 and parse_rating("11") is None
