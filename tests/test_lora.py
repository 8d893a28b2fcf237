"""LoRA and QLoRA: adapters start at the base, train alone on a frozen (bf16 / int8 / NF4) base, resume exactly,
export merged or as a PEFT adapter that peft loads onto the transformers base, and DPO's reference is the base."""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.weights import export_hf, load_adapters, load_params
from jaxllm.config import DPOConfig, LoraConfig, ModelConfig, RewardConfig
from jaxllm.metrics import read_metrics
from jaxllm.model import lora, quantize
from jaxllm.model.spec import init_from_specs, init_params, param_specs
from jaxllm.model.transformer import forward
from jaxllm.trainer import train
from test_post_training import base_checkpoint, review_pairs, run_cfg, sft_records  # noqa: F401,F811 (fixtures)

TINY = ModelConfig.preset("tiny", vocab_size=300, max_seq_len=64)


def _adapters(cfg: ModelConfig, lc: LoraConfig, key, b_std: float = 0.0) -> dict:
    """Adapters as initialised (b_std 0) or as after training (B random)."""
    ad = init_from_specs(lora.lora_specs(param_specs(cfg), lc), key)
    if b_std:
        ad = jax.tree_util.tree_map_with_path(
            lambda p, x: x + b_std * jax.random.normal(jax.random.key(7), x.shape) if "lora_b" in str(p) else x, ad)
    return ad


def test_adapters_start_exactly_at_the_base_and_merge_to_the_adapted_forward():
    params = init_params(TINY, jax.random.key(0))
    lc = LoraConfig(rank=4, alpha=8.0)
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, TINY.vocab_size)
    base_logits = forward(params, tokens, TINY)
    at_init = forward(lora.combine(_adapters(TINY, lc, jax.random.key(1)), params, lora.scale(lc)), tokens, TINY)
    assert jnp.array_equal(at_init, base_logits)                     # B = 0: exactly the base
    trained = _adapters(TINY, lc, jax.random.key(1), b_std=0.05)
    adapted = forward(lora.combine(trained, params, lora.scale(lc)), tokens, TINY)
    assert float(jnp.abs(adapted - base_logits).max()) > 0.05           # the adapters do something
    merged = lora.merge(params, trained, lora.scale(lc))
    assert jax.tree.structure(merged) == jax.tree.structure(params)    # a plain decoder tree again
    np.testing.assert_allclose(forward(merged, tokens, TINY), adapted, atol=2e-5)
    # W + (alpha/r)·A·B by hand for one projection of layer 1
    a, b = trained["layers"]["attn"]["q_lora_a"][1], trained["layers"]["attn"]["q_lora_b"][1]
    np.testing.assert_allclose(merged["layers"]["attn"]["q"][1],
                               params["layers"]["attn"]["q"][1] + 2.0 * jnp.einsum("dr,rhk->dhk", a, b), atol=1e-6)


@pytest.mark.parametrize("kind, tolerance", [("int8", 0.02), ("nf4", 0.15)])
def test_quantized_base_forward_stays_near_the_bf16_forward(kind, tolerance):
    cfg = dataclasses.replace(TINY, d_model=128, mlp_dim=256, head_dim=32)     # dims that blocks of 64 divide
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 32), 0, cfg.vocab_size)
    bf16 = forward(quantize.frozen_base(params, "bfloat16", "none"), tokens, cfg)
    quantized_base = quantize.frozen_base(params, "bfloat16", kind)
    quantized = forward(quantized_base, tokens, cfg)
    # relative to the logits' spread: int8 per channel ~0.3%, NF4 in blocks of 64 a few percent
    rel = float(jnp.abs(quantized - bf16).max() / jnp.abs(bf16).max())
    assert rel < tolerance, rel
    full = quantize.nbytes(quantize.frozen_base(params, "bfloat16", "none"))
    assert quantize.nbytes(quantized_base) < full                      # and it is smaller
    w = quantized_base["layers"]["mlp"]["up"]
    assert w.qvalue.dtype == (jnp.int8 if kind == "int8" else jnp.uint4)


def test_lora_sft_trains_only_adapters_resumes_exactly_and_exports_merged(tmp_path, review_pairs, base_checkpoint):
    records = sft_records(tmp_path, review_pairs)
    lc = LoraConfig(rank=8, alpha=16.0, base_dtype="float32")
    kw = dict(data=dict(template="alpaca_zh"), lora=lc)
    # a constant rate, so that the 10-step half follows the same schedule; adapters on a random tiny base want
    # a larger one than full fine-tuning
    constant_lr = lambda cfg: dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, decay="constant",  # noqa
                                                                                 lr=1e-2))
    straight = constant_lr(run_cfg(tmp_path / "straight", "sft", base_checkpoint, records,
                                   train=dict(steps=12, eval_every=6, log_every=1), **kw))
    train(straight)
    half = constant_lr(run_cfg(tmp_path / "resumed", "sft", base_checkpoint, records,
                               train=dict(steps=6, eval_every=6, log_every=1, save_every=6), **kw))
    train(half)
    train(dataclasses.replace(half, train=dataclasses.replace(half.train, steps=12)))
    losses = lambda d: [r["train/loss"] for r in read_metrics(str(d / "metrics.jsonl")) if "train/loss" in r]  # noqa
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")          # bit-identical after resume
    evals = [r["eval/loss"] for r in read_metrics(str(tmp_path / "straight" / "metrics.jsonl")) if "eval/loss" in r]
    # A random tiny base (init std 0.02) gives logits near uniform that adapters alone can move only a little
    # (the head is frozen); the reward and DPO tests below show adapters learning a task.
    assert evals[-1] < evals[0] - 0.05

    # The checkpoint holds the adapters only; the base is init_from's, untouched.
    saved = load_adapters(tmp_path / "straight" / "checkpoints" / "12")
    leaves = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(saved)[0]]
    assert leaves and all("_lora_" in name for name in leaves), leaves
    base, _, _ = load_params(base_checkpoint)
    merged, _, _ = load_params(str(tmp_path / "straight"))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), merged,
                 lora.merge(base, saved, lora.scale(lc)))
    assert jnp.array_equal(merged["embed"]["embedding"], base["embed"]["embedding"])    # not adapted
    assert not jnp.array_equal(merged["layers"]["attn"]["q"], base["layers"]["attn"]["q"])


def test_peft_loads_the_exported_adapter_onto_the_transformers_base(tmp_path, review_pairs, base_checkpoint):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    records = sft_records(tmp_path, review_pairs)
    cfg = run_cfg(tmp_path / "run", "sft", base_checkpoint, records, data=dict(template="alpaca_zh"),
                  lora=LoraConfig(rank=4, alpha=8.0, base_dtype="float32", targets=("q", "v", "o", "down")),
                  train=dict(steps=8, eval_every=0, log_every=4))
    train(cfg)
    export_hf(base_checkpoint, str(tmp_path / "hf_base"))
    export_hf(str(tmp_path / "run"), str(tmp_path / "adapter"), adapter_only=True)
    export_hf(str(tmp_path / "run"), str(tmp_path / "hf_merged"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["down_proj", "o_proj", "q_proj", "v_proj"]

    params, model_cfg, _ = load_params(str(tmp_path / "run"))          # base + adapters, merged by jaxllm
    tokens = np.random.default_rng(0).integers(3, model_cfg.vocab_size, (2, 24))
    ours = np.asarray(forward(params, jnp.asarray(tokens), model_cfg))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base", dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = adapted(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_merged", dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.as_tensor(tokens)).logits.numpy(), ours, atol=1e-4)


def test_lora_dpo_reference_is_the_base_and_the_margin_grows(tmp_path, review_pairs, base_checkpoint):
    pairs_file, _ = review_pairs
    cfg = run_cfg(tmp_path, "dpo", base_checkpoint, pairs_file, data=dict(template="chat"),
                  dpo=DPOConfig(beta=0.1, reference="online"), lora=LoraConfig(rank=8, alpha=32.0),
                  train=dict(steps=30, eval_every=30))
    result = train(cfg)
    rows = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "eval/reward_margin" in r]
    # policy = base + zero adapters = reference: implicit rewards exactly zero, loss log 2 (bf16 base both sides)
    assert rows[0]["step"] == 0 and rows[0]["eval/reward_margin"] == 0.0
    assert rows[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result["eval/reward_margin"] > 0.05 and result["eval/accuracy"] > 0.6


def test_qlora_reward_model_matches_the_bf16_lora_run(tmp_path, review_pairs, base_checkpoint):
    pairs_file, _ = review_pairs
    accuracy = {}
    for kind in ("none", "nf4"):
        cfg = run_cfg(tmp_path / kind, "reward", base_checkpoint, pairs_file, data=dict(template="chat"),
                      reward=RewardConfig(center=0.01), lora=LoraConfig(rank=8, alpha=32.0, quantize_base=kind),
                      train=dict(steps=30, eval_every=30, eval_at_start=False))
        accuracy[kind] = train(cfg)["eval/accuracy"]
    assert accuracy["none"] > 0.7
    assert accuracy["nf4"] > accuracy["none"] - 0.05, accuracy      # QLoRA within a few points


def test_full_finetuning_in_bfloat16_parameters_and_first_moment(tmp_path, review_pairs, base_checkpoint):
    records = sft_records(tmp_path, review_pairs)
    cfg = run_cfg(tmp_path / "run", "sft", base_checkpoint, records, data=dict(template="alpaca_zh"),
                  train=dict(steps=20, eval_every=20))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, param_dtype="bfloat16"),
                              optim=dataclasses.replace(cfg.optim, mu_dtype="bfloat16"))
    state = train(cfg)["state"]
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.bfloat16)}   # init_from cast
    mu, nu = (optax.tree.get(state["opt_state"], name) for name in ("mu", "nu"))
    assert mu["layers"]["attn"]["q"].dtype == jnp.bfloat16 and nu["layers"]["attn"]["q"].dtype == jnp.float32
    evals = [r["eval/loss"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if "eval/loss" in r]
    assert evals[-1] < evals[0] - 0.5
