"""KV-cache generation against step-by-step full forward passes, plus sampling determinism and stops."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.model import generate as gen
from jaxllm.model.padding import pad_sequences
from jaxllm.model.spec import init_params
from jaxllm.model.transformer import decode_step, forward, prefill

VOCAB = 512     # the size of conftest's trained tokenizer, so the stop-string test reuses this model


@pytest.fixture(scope="module")
def model():
    # A large init so logits are far apart: greedy argmax is then robust to float reassociation.
    cfg = ModelConfig.preset("tiny", vocab_size=VOCAB, init_std=0.3, attention_impl="xla", max_seq_len=128)
    return init_params(cfg, jax.random.key(0)), cfg


@functools.partial(jax.jit, static_argnames=("cfg",))
def _log_softmax_forward(params, tokens, cfg):
    return jax.nn.log_softmax(forward(params, tokens, cfg), axis=-1)


def reference_greedy(params, cfg, prompt, n, width=32):
    """Greedy decoding by re-running the full forward pass (no cache) on the growing sequence; returns the
    tokens and their log-probabilities. The sequence sits at the start of a fixed-width row (causal attention:
    what follows it cannot change its logits), so the reference compiles once instead of once per length."""
    seq, logprobs = list(prompt), []
    for _ in range(n):
        row = jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32)
        lp = np.asarray(_log_softmax_forward(params, row, cfg)[0, len(seq) - 1])
        seq.append(int(np.argmax(lp)))
        logprobs.append(float(lp[seq[-1]]))
    return seq[len(prompt):], logprobs


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_kv_cache_greedy_equals_full_forward_for_mixed_prompt_lengths(model, position):
    params, cfg = model
    cfg = dataclasses.replace(cfg, position=position)
    prompts = prompts_of([3, 7, 20])
    out = gen.generate(params, cfg, prompts, gen.SamplingParams(max_new_tokens=10))
    for p, c in zip(prompts, out):
        tokens, logprobs = reference_greedy(params, cfg, p, 10)
        assert c.tokens == tokens and c.finish_reason == "length"
        # Reported logprobs are the model's own log-softmax at each step.
        np.testing.assert_allclose(c.logprobs, logprobs, atol=1e-4)


@pytest.mark.parametrize("overrides", [dict(position="rope", num_kv_heads=2), dict(position="alibi", num_kv_heads=2),
                                       dict(position="rope", num_kv_heads=1, scan_layers=False)],
                         ids=["gqa-rope", "gqa-alibi", "mqa-unrolled"])
def test_cached_decode_token_by_token_equals_training_forward(overrides):
    """prefill + decode_step (the cached path) against forward (the training path) on the same sequences: the
    logits of every fed token agree, for left-padded prompts of different lengths."""
    cfg = ModelConfig.preset("tiny", vocab_size=VOCAB, num_heads=4, attention_impl="xla", **overrides)
    params = init_params(cfg, jax.random.key(0))
    seqs = prompts_of([12, 12], seed=5)
    prompt_lens, steps = [2, 5], 7
    want = np.asarray(forward(params, jnp.asarray(seqs), cfg))                # (batch, 12, vocab)
    tokens, seg, pos = pad_sequences([s[:n] for s, n in zip(seqs, prompt_lens)], 5, side="left")
    logits, cache = jax.jit(prefill, static_argnames=("cfg", "cache_len"))(params, tokens, seg, pos, cfg=cfg,
                                                                           cache_len=16)
    step_fn = jax.jit(decode_step, static_argnames=("cfg",))
    for t in range(steps + 1):
        for i, n in enumerate(prompt_lens):
            np.testing.assert_allclose(np.asarray(logits[i]), want[i, n - 1 + t], atol=1e-4, rtol=1e-4)
        if t < steps:
            fed = np.asarray([s[n + t] for s, n in zip(seqs, prompt_lens)], np.int32)
            logits, cache = step_fn(params, cache, fed, np.asarray(prompt_lens, np.int32) + t, 5 + t, cfg=cfg)


def test_decode_step_compiles_once_per_shape_not_per_token(model):
    params, cfg = model
    prompts = prompts_of([5, 9], seed=1)
    gen.generate(params, cfg, prompts, gen.SamplingParams(max_new_tokens=3))
    before = gen.decode_compilations()
    gen.generate(params, cfg, prompts, gen.SamplingParams(max_new_tokens=20))   # same cache bucket (64)
    assert gen.decode_compilations() == before


def test_seeded_sampling_is_deterministic_and_top_k_1_is_greedy(model):
    params, cfg = model
    prompts = prompts_of([4, 11], seed=2)
    sp = gen.SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
    a = [c.tokens for c in gen.generate(params, cfg, prompts, sp)]
    b = [c.tokens for c in gen.generate(params, cfg, prompts, sp)]
    c = [c.tokens for c in gen.generate(params, cfg, prompts, dataclasses.replace(sp, seed=8))]
    assert a == b and a != c
    # A request's draws do not depend on what else shares its batch.
    alone = gen.generate(params, cfg, prompts[1:], [sp])[0].tokens
    together = gen.generate(params, cfg, prompts, [dataclasses.replace(sp, seed=3), sp])[1].tokens
    assert alone == together
    greedy = [c.tokens for c in gen.generate(params, cfg, prompts, gen.SamplingParams(max_new_tokens=12))]
    top1 = [c.tokens for c in gen.generate(params, cfg, prompts, dataclasses.replace(sp, top_k=1))]
    tiny_p = [c.tokens for c in gen.generate(params, cfg, prompts, dataclasses.replace(sp, top_p=1e-6))]
    assert top1 == greedy and tiny_p == greedy


def test_sample_tokens_truncates_to_top_k_and_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
    n = logits.shape[0]
    ones = jnp.ones((n,), jnp.float32)
    seeds, rows = jnp.zeros((n,), jnp.uint32), jnp.arange(n, dtype=jnp.uint32)
    tok, *_ = gen.sample_tokens(logits, seeds, rows, 0, ones, jnp.full((n,), 2, jnp.int32), ones)
    counts = np.bincount(np.asarray(tok), minlength=4) / n
    assert counts[2:].sum() == 0 and abs(counts[0] - 0.625) < 0.03          # renormalised over the top 2
    tok, *_ = gen.sample_tokens(logits, seeds, rows, 0, ones, jnp.zeros((n,), jnp.int32), 0.79 * ones)
    counts = np.bincount(np.asarray(tok), minlength=4) / n
    assert counts[2:].sum() == 0                                              # 0.5 + 0.3 >= 0.79


def test_stop_ids_and_stop_strings(model, tokenizer_path):
    from jaxllm.tokenizer import Tokenizer
    tok = Tokenizer(tokenizer_path)
    params, cfg = model
    assert tok.vocab_size == cfg.vocab_size
    prompt = tok.encode("The module", add_bos=True)
    free = gen.generate(params, cfg, [prompt], gen.SamplingParams(max_new_tokens=12), tokenizer=tok)[0]
    assert free.text == tok.decode(prompt + free.tokens)[len(tok.decode(prompt)):]
    # Stop id: the third generated token ends the row and is not part of the output.
    stop_id = free.tokens[2]
    first = free.tokens.index(stop_id)
    out = gen.generate(params, cfg, [prompt], gen.SamplingParams(max_new_tokens=12, stop_ids=(stop_id,)),
                       tokenizer=tok)[0]
    assert out.tokens == free.tokens[:first] and out.finish_reason == "stop"
    # Stop string: a piece of the free text; output is cut right before it, streamed text never shows it.
    needle = free.text.strip()[2:5]
    assert needle
    streamed = []
    out = gen.generate(params, cfg, [prompt], gen.SamplingParams(max_new_tokens=12, stop_strings=(needle,)),
                       tokenizer=tok, on_token=lambda i, c: streamed.append(c.text))[0]
    assert out.finish_reason == "stop" and out.text == free.text[:free.text.find(needle)]
    assert all(needle not in t for t in streamed)


def test_score_tokens_matches_forward(model):
    params, cfg = model
    seqs = prompts_of([6, 13], seed=4)
    scored = gen.score_tokens(params, cfg, seqs)
    width = 16
    lp = jax.nn.log_softmax(forward(params, jnp.asarray([s + [0] * (width - len(s)) for s in seqs], jnp.int32), cfg))
    for i, (s, r) in enumerate(zip(seqs, scored)):
        expected = np.asarray(lp[i])[np.arange(len(s) - 1), s[1:]]
        assert r["logprobs"][0] is None
        np.testing.assert_allclose(r["logprobs"][1:], expected, atol=1e-4)


def test_over_long_prompt_is_refused(model):
    params, cfg = model
    with pytest.raises(ValueError, match="context is 128"):
        gen.generate(params, cfg, [[1] * 128])


def test_generate_command_prints_seeded_continuations(model, tokenizer_path, tmp_path, capsys):
    from jaxllm.weights import save_params
    from jaxllm.cli import main
    params, cfg = model
    ckpt = save_params(str(tmp_path / "ckpt"), params, cfg, tokenizer_path)
    argv = ["generate", f"--checkpoint={ckpt}", "--prompt=The module", "--prompt=A class", "--max_new_tokens=5",
            "--seed=3"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and first.count("--- ") == 2 and "The module" in first


def test_generate_text_continues_plain_prompts(model, tokenizer_path):
    from jaxllm.tokenizer import Tokenizer
    tok = Tokenizer(tokenizer_path)
    params, cfg = model
    sp = gen.SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.95, seed=2)
    texts = gen.generate_text(params, cfg, tok, ["The module", "A class"], sp)
    ids = [tok.encode(p, add_bos=True) for p in ("The module", "A class")]
    direct = gen.generate(params, cfg, ids, dataclasses.replace(sp, stop_ids=(tok.eos_id,)), tokenizer=tok)
    assert texts == [c.text for c in direct]
    assert texts == gen.generate_text(params, cfg, tok, ["The module", "A class"], sp)      # seeded
