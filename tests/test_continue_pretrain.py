"""Continued pretraining with an expanded tokenizer, end to end: a tiny Hugging Face Llama whose vocabulary is
a small English SentencePiece model, a Chinese model merged into that tokenizer, stage 1 (new rows only) and
stage 2 (everything), export back to Hugging Face."""
from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from jaxllm.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from jaxllm.model.convert import from_hf
from jaxllm.tokenizer import Tokenizer, train_tokenizer
from jaxllm.tokenizer.expand import expand_tokenizer
from jaxllm.trainer import train

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tokenizer_path, english_corpus, tmp_path_factory):
    from conftest import SHARED_DATA
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is absent (developer and CI machines have it beside the checkout)")
    root = tmp_path_factory.mktemp("cpt")
    novel = [x.strip() for x in (SHARED_DATA / "text/zh/novels/hongloumeng.txt").read_text(encoding="utf-8-sig")
             .splitlines() if x.strip()]
    zh = train_tokenizer(novel[:1500], out_dir=root / "zh", vocab_size=3200, character_coverage=0.995)
    merged = expand_tokenizer(tokenizer_path, root / "merged", add=[zh.path])
    # Mixed training text: Chinese the base tokenizer spells in bytes, and the English it was trained on.
    corpus = root / "zh.txt"
    corpus.write_text("\n".join(novel[1500:2300]) + "\n", encoding="utf-8")
    base_vocab = Tokenizer(tokenizer_path).vocab_size                        # 512
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=base_vocab, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128)
    hf_dir = root / "hf"
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(hf_dir, safe_serialization=True)
    shutil.copyfile(tokenizer_path, hf_dir / "tokenizer.model")
    return {"root": root, "hf": hf_dir, "merged": merged, "base_vocab": base_vocab,
            "sources": (str(corpus), str(english_corpus))}


def run_config(setup, workdir, *, steps, init_from, trainable, lr, tokenizer="", resize="mean") -> Config:
    return Config(model=ModelConfig.preset("tiny"),
                  data=DataConfig(sources=setup["sources"], seq_len=64, eval_fraction=0.02),
                  optim=OptimConfig(lr=lr, warmup_steps=0, decay="constant", weight_decay=0.0, trainable=trainable),
                  train=TrainConfig(steps=steps, batch_size=8, log_every=1, eval_every=0, eval_batches=2,
                                    save_every=0, async_checkpointing=False),
                  workdir=str(workdir), init_from=str(init_from), tokenizer=tokenizer, resize_method=resize).validate()


def losses(workdir) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_larger_tokenizer_without_resize_is_an_error_naming_both_sizes(setup):
    cfg = run_config(setup, setup["root"] / "err", steps=1, init_from=setup["hf"], trainable="all", lr=1e-3,
                     tokenizer=setup["merged"].path, resize="none")
    with pytest.raises(ValueError, match=f"{setup['merged'].vocab_size} pieces.*{setup['base_vocab']} vocabulary rows"):
        train(cfg)


def test_stage_one_trains_only_new_rows_then_stage_two_trains_all_and_exports(setup):
    merged, old = setup["merged"], setup["base_vocab"]
    hf_params, _ = from_hf(setup["hf"])
    stage1 = setup["root"] / "stage1"

    # Stage 1, in two runs: the second resumes from the resized config that the first wrote.
    cfg = run_config(setup, stage1, steps=4, init_from=setup["hf"], trainable="new_rows", lr=1e-2,
                     tokenizer=merged.path)
    train(cfg)
    saved = json.loads((stage1 / "config.json").read_text())
    padded = -(-merged.vocab_size // 128) * 128
    assert (saved["model"]["vocab_size"], saved["model"]["valid_vocab_size"]) == (padded, merged.vocab_size)
    assert saved["optim"]["new_rows_from"] == old
    result = train(dataclasses_replace_steps(cfg, 8))
    assert result["step"] == 8
    params = jax.device_get(result["state"]["params"])

    # Frozen: every parameter but the embedding and head, and their old rows, bit for bit.
    for name in ("layers", "final_norm"):
        jax.tree.map(np.testing.assert_array_equal, params[name], jax.device_get(hf_params[name]))
    np.testing.assert_array_equal(params["embed"]["embedding"][:old], hf_params["embed"]["embedding"])
    np.testing.assert_array_equal(params["lm_head"]["kernel"][:, :old], hf_params["lm_head"]["kernel"])
    # New rows learned: they all started at the mean of the old rows.
    new_rows = params["embed"]["embedding"][old:merged.vocab_size]
    start = np.asarray(hf_params["embed"]["embedding"]).mean(0)
    moved = np.abs(new_rows - start).max(axis=1) > 1e-3                     # (new tokens,)
    assert moved.sum() > 100, moved.sum()                                    # the tokens the batches used
    assert np.abs(params["lm_head"]["kernel"][:, old:merged.vocab_size] -
                  np.asarray(hf_params["lm_head"]["kernel"]).mean(1, keepdims=True)).max() > 1e-3
    assert not np.any(params["embed"]["embedding"][merged.vocab_size:])          # padding rows stay zero
    stage1_losses = losses(stage1)
    assert stage1_losses[-1] < stage1_losses[0]

    # Stage 2: everything trains, from stage 1's workdir (its tokenizer and resized config come with it).
    stage2 = setup["root"] / "stage2"
    result = train(run_config(setup, stage2, steps=8, init_from=stage1, trainable="all", lr=3e-3))
    stage2_losses = losses(stage2)
    assert stage2_losses[-1] < stage2_losses[0] < stage1_losses[0]
    assert not np.array_equal(jax.device_get(result["state"]["params"]["layers"]["mlp"]["up"]),
                              hf_params["layers"]["mlp"]["up"])

    # Export: transformers loads the model and the merged tokenizer; logits of real tokens match ours.
    from jaxllm.weights import export_hf
    from jaxllm.model.transformer import forward
    out = export_hf(str(stage2), str(setup["root"] / "export"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "宝玉笑道：the module imports 林黛玉"
    ids = Tokenizer(merged.path).encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()[0, :, :merged.vocab_size]
    ours_cfg = json.loads((stage2 / "config.json").read_text())["model"]
    from jaxllm.config import model_config_from_dict
    ours = forward(result["state"]["params"], np.asarray([ids]), model_config_from_dict(ours_cfg))
    np.testing.assert_allclose(np.asarray(ours)[0, :, :merged.vocab_size], theirs, atol=2e-4, rtol=2e-4)


def test_chinese_llama_lora_stage_trains_adapters_and_the_resized_embedding_on_a_frozen_base(setup):
    """Chinese-LLaMA's LoRA pretraining: the expanded vocabulary's embedding and head train whole beside adapters
    on a frozen base; without lora.train_embeddings the resize is refused (new rows would stay random)."""
    import dataclasses
    from jaxllm.weights import load_adapters, load_params
    from jaxllm.config import LoraConfig
    from jaxllm.model import lora
    merged, old = setup["merged"], setup["base_vocab"]
    cfg = run_config(setup, setup["root"] / "lora", steps=6, init_from=setup["hf"], trainable="all", lr=1e-2,
                     tokenizer=merged.path)
    with pytest.raises(ValueError, match="lora.train_embeddings=True"):
        train(dataclasses.replace(cfg, lora=LoraConfig(rank=4, base_dtype="float32")))
    lc = LoraConfig(rank=4, alpha=8.0, base_dtype="float32", train_embeddings=True)
    train(dataclasses.replace(cfg, lora=lc, allow_config_change=True))
    assert losses(setup["root"] / "lora")[-1] < losses(setup["root"] / "lora")[0]
    trained = load_adapters(setup["root"] / "lora" / "checkpoints" / "6")
    assert set(trained) == {"layers", "embed", "lm_head"}
    assert trained["embed"]["embedding"].shape[0] >= merged.vocab_size              # the resized rows
    hf_params, _ = from_hf(setup["hf"])
    params, _, _ = load_params(str(setup["root"] / "lora"))                       # base + adapters, merged
    np.testing.assert_array_equal(params["embed"]["embedding"], trained["embed"]["embedding"])
    np.testing.assert_array_equal(params["final_norm"]["scale"], hf_params["final_norm"]["scale"])   # frozen
    expected_up = lora.merge({"layers": hf_params["layers"]}, {"layers": trained["layers"]}, lora.scale(lc))
    np.testing.assert_allclose(params["layers"]["mlp"]["up"], expected_up["layers"]["mlp"]["up"], atol=1e-6)
    assert np.abs(params["embed"]["embedding"][old:merged.vocab_size]
                  - np.asarray(hf_params["embed"]["embedding"]).mean(0)).max() > 1e-3   # new rows learned


def dataclasses_replace_steps(cfg: Config, steps: int) -> Config:
    import dataclasses
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


def test_shipped_config_stages(tmp_path):
    """Stage 2 trains everything with a smaller peak learning rate and a longer warmup than stage 1."""
    from jaxllm.cli import load_config
    one = load_config(["--config=configs/continue_pretrain.py:stage=1", f"--config.workdir={tmp_path}"])
    two = load_config(["--config=configs/continue_pretrain.py:stage=2,model=125m", f"--config.workdir={tmp_path}"])
    assert (one.optim.trainable, two.optim.trainable) == ("new_rows", "all")
    assert two.optim.lr < one.optim.lr and two.optim.warmup_steps > one.optim.warmup_steps
    assert one.resize_method == "mean" and one.resize_pad_to_multiple == 128


def test_new_rows_optimizer_moves_only_new_rows_even_with_weight_decay_and_keeps_no_frozen_moments():
    import optax

    from jaxllm.model.spec import init_params
    from jaxllm.optim import make_optimizer
    cfg = ModelConfig(vocab_size=10, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, mlp_dim=16)
    params = init_params(cfg, jax.random.key(0))
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    tx = make_optimizer(OptimConfig(lr=0.1, warmup_steps=0, decay="constant", weight_decay=0.5,
                                    decay_embeddings=True, trainable="new_rows", new_rows_from=7), total_steps=10)
    state = tx.init(params)
    # Adam moments exist for the embedding and head only: 2 x (10x8 + 8x10) numbers, not 2 x the whole model.
    assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 2 * 160
    updates, _ = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    jax.tree.map(np.testing.assert_array_equal, new["layers"], params["layers"])
    np.testing.assert_array_equal(new["embed"]["embedding"][:7], params["embed"]["embedding"][:7])
    np.testing.assert_array_equal(new["lm_head"]["kernel"][:, :7], params["lm_head"]["kernel"][:, :7])
    assert np.all(new["embed"]["embedding"][7:] != params["embed"]["embedding"][7:])
    assert np.all(new["lm_head"]["kernel"][:, 7:] != params["lm_head"]["kernel"][:, 7:])
